"""Answer extraction for GSM8K, exactly as lm-evaluation-harness's `gsm8k` task scores it.

Strict: the first `#### n` (GSM8K's own answer format). Flexible: the last number-like match anywhere in the
completion, for models that answer correctly without the format. Both use the harness's regexes, and a match
is normalised as the harness's `exact_match` normalises it (`regexes_to_ignore`): every `,` and `$` removed,
then one trailing `.`. Nothing else is rewritten, so `12.0` does NOT equal `12` and `5.50` stays `5.50`:
published GSM8K numbers come from the harness, and ours must be comparable with them (see docs/lm_eval.md).
"""

from __future__ import annotations

import re

_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_TRAILING_DOT = re.compile(r"\.$")


def normalize_number(text: str | None) -> str | None:
    """The text lm-eval's gsm8k `exact_match` compares: no `,`, no `$`, one trailing `.` dropped."""
    if text is None:
        return None
    value = _TRAILING_DOT.sub("", text.strip().replace(",", "").replace("$", ""))
    return value or None


def extract_strict(completion: str) -> str | None:
    """The first `#### n` answer of a completion (None when the format is missing)."""
    match = _STRICT.search(completion)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(completion: str) -> str | None:
    """The last match of the harness's number regex (None when there is none).

    Like the harness, the last match is taken even when it holds no digit (a trailing `...`): it then fails
    to equal any reference, as it does there.
    """
    matches = _FLEXIBLE.findall(completion)
    if not matches:
        return None
    return normalize_number(next(group for group in matches[-1] if group))


def is_correct(completion: str, reference_answer: str, *, flexible: bool = False) -> bool:
    """Whether the completion's answer equals the reference's `#### n` (strict, or last number)."""
    target = extract_strict(reference_answer)
    predicted = extract_flexible(completion) if flexible else extract_strict(completion)
    return target is not None and predicted == target
