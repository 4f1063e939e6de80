"""Answer extraction for GSM8K, as lm-evaluation-harness scores it.

Strict: the number after `#### ` (GSM8K's own answer format). Flexible: the last number anywhere in the
completion, for models that answer correctly without the format. Numbers are compared after removing `$`,
`,` and a trailing `.`, so "1,750." matches "1750".
"""

from __future__ import annotations

import re

__all__ = ["extract_flexible", "extract_strict", "is_correct", "normalize_number"]

_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str | None) -> str | None:
    """Canonical text of a number: no `$`, no thousands separators, no trailing dot or `.0`s."""
    if text is None:
        return None
    value = text.strip().replace("$", "").replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value or None


def extract_strict(completion: str) -> str | None:
    """The first `#### n` answer of a completion (None when the format is missing)."""
    match = _STRICT.search(completion)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(completion: str) -> str | None:
    """The last number in a completion (None when it has none)."""
    matches = _FLEXIBLE.findall(completion)
    for groups in reversed(matches):
        value = normalize_number(next(g for g in groups if g))
        if value and any(ch.isdigit() for ch in value):
            return value
    return None


def is_correct(completion: str, reference_answer: str, *, flexible: bool = False) -> bool:
    """Whether the completion's answer equals the reference's `#### n` (strict, or last number)."""
    target = extract_strict(reference_answer)
    predicted = extract_flexible(completion) if flexible else extract_strict(completion)
    return target is not None and predicted == target
