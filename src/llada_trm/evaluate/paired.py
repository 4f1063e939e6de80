"""`llada-trm eval --against RUN`: two runs' predictions on the same problems, compared pairwise
(`statistics.paired_summary`); two files that did not answer the same problems in the same order are refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llada_trm.data.disjoint import question_hash
from llada_trm.data.gsm8k import DataError
from llada_trm.evaluate.statistics import paired_summary
from llada_trm.io import write_json
from llada_trm.text import read_utf8

ALPHA = 0.05
PREDICTIONS_FILE = "predictions.jsonl"


def verdict(p: float) -> str:
    """The words a report uses for a p-value: "significant" below ALPHA, else "not significant"."""
    return "significant" if p < ALPHA else "not significant"


def _find(source: Path) -> Path:
    """A predictions.jsonl: the file itself, inside an eval directory, or the one eval of a run directory."""
    if source.is_file():
        return source
    if (source / PREDICTIONS_FILE).is_file():
        return source / PREDICTIONS_FILE
    found = sorted(source.glob(f"eval/*/{PREDICTIONS_FILE}")) if source.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not source.exists():
        raise FileNotFoundError(f"--against {source}: no such predictions file or run directory")
    raise DataError(
        f"--against {source}: holds {len(found)} predictions files under eval/; name one "
        f"(e.g. {found[0] if found else source / PREDICTIONS_FILE})"
    )


def read_predictions(source: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """(the file read, its records) from a predictions.jsonl, an eval directory or a run directory."""
    path = _find(Path(source))
    records = []
    for number, line in enumerate(read_utf8(path, DataError).splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{number}: not a JSON line of a predictions file") from None
    if not records or any("question" not in r or "correct_strict" not in r for r in records):
        raise DataError(f"{path}: not a predictions file (records with 'question' and 'correct_strict')")
    return path, records


def align_predictions(questions_a: Sequence[str], questions_b: Sequence[str]) -> None:
    """DataError (one line) unless both lists hold the same problems in the same order (hash-compared)."""
    if len(questions_a) != len(questions_b):
        raise DataError(
            f"the two predictions answer {len(questions_a)} and {len(questions_b)} problems; a paired "
            "comparison needs the same problems: evaluate both on the same split and --limit"
        )
    for i, (a, b) in enumerate(zip(questions_a, questions_b, strict=True)):
        if question_hash(a) != question_hash(b):
            raise DataError(
                f"the two predictions differ at problem {i} ({a[:40]!r} vs {b[:40]!r}); a paired comparison "
                "needs the same problems in the same order: evaluate both on the same split and --limit"
            )


def paired_comparison(
    baseline: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]], *, seed: int = 0
) -> dict[str, Any]:
    """{strict, flexible}: `paired_summary` of the candidate against the baseline, each with its verdict."""
    align_predictions([p["question"] for p in baseline], [p["question"] for p in candidate])
    result = {}
    for kind in ("strict", "flexible"):
        key = f"correct_{kind}"
        summary = paired_summary([p[key] for p in baseline], [p[key] for p in candidate], seed=seed)
        result[kind] = summary | {"verdict": verdict(summary["p"])}
    return result


def describe_paired(summary: Mapping[str, Any], candidate: str, baseline: str) -> str:
    """One line: gained / lost, the difference with its interval, McNemar p and the verdict."""
    return (
        f"{candidate} vs {baseline}: +{summary['gained']} / -{summary['lost']} of {summary['n']}, difference "
        f"{100 * summary['diff']:+.1f} points [95% CI {100 * summary['ci_low']:+.1f}, "
        f"{100 * summary['ci_high']:+.1f}], McNemar p = {summary['p']:.3g}: {summary['verdict']}"
    )


def write_paired(
    against: tuple[Path, Sequence[Mapping[str, Any]]],
    predictions: Sequence[Mapping[str, Any]],
    name: str,
    out: Path,
) -> list[str]:
    """`eval --against`: compare `predictions` (the candidate, `name`) with `against` = (its file, its
    records), write out/paired.json, and return the lines to print."""
    path, baseline = against
    paired = paired_comparison(baseline, predictions)
    written = write_json(out / "paired.json", {"against": str(path), **paired})
    lines = [f"paired ({kind}): " + describe_paired(paired[kind], name, str(path)) for kind in paired]
    return [*lines, f"wrote {written}"]
