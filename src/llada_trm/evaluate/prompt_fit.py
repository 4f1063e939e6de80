"""The one policy for prompts that do not fit, shared by `llada-trm eval` (and `compare`) and the lm-eval
backend: a prompt whose tokens plus `gen_length` exceed the model's positions is **skipped** — not sampled,
scored as wrong (so every problem stays in the denominator and paired comparisons keep their rows), and
counted in the summary. Cutting would change the question (or drop the chat template's header), and past
the backbone's positions the answers come out garbage; skipping says so in one count instead.

When no prompt fits there is nothing to evaluate: that is an error naming the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["POLICY", "PromptFit", "fit_prompts", "prompts_line"]

POLICY = (
    "prompts whose tokens + gen_length exceed the model's positions are skipped: not sampled, scored as "
    "wrong, counted"
)


@dataclass(frozen=True)
class PromptFit:
    """Which prompts fit (`kept`, in order) and which are skipped, against `limit` positions."""

    limit: int | None
    kept: list[int]
    skipped: list[int]

    @property
    def n(self) -> int:
        return len(self.kept) + len(self.skipped)

    def record(self) -> dict[str, object]:
        """The summary's entry: the policy, the limit, how many were skipped and which."""
        return {
            "policy": POLICY,
            "max_positions": self.limit,
            "n": self.n,
            "skipped": len(self.skipped),
            "skipped_indices": list(self.skipped),
        }

    def line(self, gen_length: int) -> str:
        return prompts_line(self.record(), gen_length)


def prompts_line(record: Mapping[str, Any], gen_length: int) -> str:
    """One line for a command's output (from a summary's `prompts` entry), stating the policy whatever the
    count."""
    skipped, n = int(record["skipped"]), record.get("n")
    if not skipped:
        return f"prompts: none skipped (policy: {POLICY})"
    return (
        f"prompts: {skipped}{'' if n is None else f' of {n}'} skipped, prompt + gen_length {gen_length} > "
        f"{record['max_positions']} positions, scored as wrong (policy: {POLICY}; lower gen_length to keep "
        "them)"
    )


def fit_prompts(
    lengths: Sequence[int], gen_length: int | Sequence[int], limit: int | None, *, where: Sequence[str] = ()
) -> PromptFit:
    """Split prompts of `lengths` tokens into those that fit `limit` positions with their `gen_length` (one
    for all, or one per prompt) and those skipped; None `limit` (unknown) keeps every prompt. Raises
    ValueError (one line) when none fits; `where` names the prompts (a file:line) for that message."""
    gens = [gen_length] * len(lengths) if isinstance(gen_length, int) else list(gen_length)
    if limit is None:
        return PromptFit(limit, list(range(len(lengths))), [])
    kept = [i for i, (n, g) in enumerate(zip(lengths, gens, strict=True)) if n + g <= limit]
    fitting = set(kept)
    skipped = [i for i in range(len(lengths)) if i not in fitting]
    if lengths and not kept:
        shortest = min(range(len(lengths)), key=lambda i: lengths[i])
        name = where[shortest] if shortest < len(where) and where[shortest] else f"prompt {shortest}"
        room = limit - lengths[shortest]
        fix = (
            f"lower gen_length (--gen-length) to at most {room} (a multiple of block_length)"
            if room >= 1
            else "the prompt alone fills the model's positions; shorten the questions"
        )
        raise ValueError(
            f"none of the {len(lengths)} prompts fits: the shortest ({name}, {lengths[shortest]} tokens) + "
            f"gen_length {gens[shortest]} = {lengths[shortest] + gens[shortest]} positions exceed the "
            f"model's {limit} (max_sequence_length); {fix}"
        )
    return PromptFit(limit, kept, skipped)
