"""The run-time check that no problem is shared between splits (train, validation, test).

Generated splits are disjoint by construction (``synthetic.question_split``) and a GSM8K source by how its
slices are chosen, but a config can still put a problem in two of them (a validation slice of the test file
that the comparison also reports on). The check hashes every question, after normalising case and
whitespace so that a copy differing only in spacing still counts, and refuses any hash seen in two splits;
its record goes into comparison.json, so a reader can see that it ran.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from .gsm8k import DataError, GSM8KRecord

METHOD = "sha256 of the question text, case-folded, whitespace collapsed"


def question_hash(question: str) -> str:
    """SHA-256 (hex) of the normalised question: case-folded, runs of whitespace as one space, stripped."""
    normalised = " ".join(question.casefold().split())
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def check_disjoint(splits: Mapping[str, Sequence[GSM8KRecord]]) -> dict[str, Any]:
    """Raise `DataError` (one line) when two splits share a question; else the check's record for a report:
    {method, problems: {split: n}, distinct: {split: n}, overlaps: 0}."""
    hashes = {name: {question_hash(r.question) for r in records} for name, records in splits.items()}
    names = list(hashes)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = hashes[first] & hashes[second]
            if shared:
                example = next(r.question for r in splits[first] if question_hash(r.question) in shared)
                raise DataError(
                    f"the {first} and {second} splits share {len(shared)} problem(s), e.g. {example[:60]!r}: "
                    f"report only on problems never used for training, validation or choosing 'best' (for "
                    f"gsm8k a run validates on the last data.n_eval problems of train: evaluate on "
                    f"evaluation.split: test)"
                )
    return {
        "method": METHOD,
        "problems": {name: len(records) for name, records in splits.items()},
        "distinct": {name: len(h) for name, h in hashes.items()},
        "overlaps": 0,
    }
