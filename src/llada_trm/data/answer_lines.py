"""The answer lines of generated problems: how a step is written, and how a reference answer is read back.

The generator (`data.synthetic`) writes every step with `result_line`; `parse_solution` matches a line,
renders it back with `result_line` and requires the same text, so the two sides cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .gsm8k import DataError

__all__ = ["SolutionStep", "State", "cap", "parse_solution", "result_line"]


@dataclass(frozen=True)
class State:
    """The running amount: ``value`` of ``noun`` held by ``subject`` ('Tom' or 'each cousin')."""

    value: int
    subject: str
    noun: str
    kind: str  # "item", "container" or "money"


def cap(text: str) -> str:
    """The text with its first letter upper-cased (a sentence's subject)."""
    return text[:1].upper() + text[1:]


def calc(x: int, op: str, b: int, y: int, money: bool) -> str:
    """GSM8K's calculator annotation, e.g. ``3*4=<<3*4=12>>12`` (``$`` before ``<<`` for money)."""
    return f"{x}{op}{b}={'$' if money else ''}<<{x}{op}{b}={y}>>{y}"


def result_line(
    subject: str, verb: str, x: int, op: str, b: int, y: int, state: State, tail: str = ""
) -> str:
    """The answer line of one step: ``Tom has 3*4=<<3*4=12>>12 apples.``"""
    money = state.kind == "money"
    noun = "" if money else f" {state.noun}"
    return f"{cap(subject)} {verb} {calc(x, op, b, y, money)}{noun}{tail}."


# ----------------------------------------------------------------------------------------------------
# the ground truth of a generated problem, read back from its own reference answer
# ----------------------------------------------------------------------------------------------------

_SOLUTION_LINE = re.compile(
    r"^(?P<subject>.+) (?P<verb>\S+) (?P<x>\d+)(?P<op>[-+*/])(?P<b>\d+)=(?P<money>\$?)<<"
    r"(?P=x)(?P=op)(?P=b)=(?P<y>\d+)>>(?P=y)(?: (?P<rest>.*?))?\.$"
)
_TAILS = {"+": " now", "-": " left"}
_RESULTS: dict[str, Callable[[int, int], int]] = {
    "+": lambda x, b: x + b, "-": lambda x, b: x - b, "*": lambda x, b: x * b, "/": lambda x, b: x // b,
}


@dataclass(frozen=True)
class SolutionStep:
    """One reference step: ``subject verb x op b = y`` about ``noun`` ("" when the amount is dollars)."""

    subject: str
    verb: str
    x: int
    op: str
    b: int
    y: int
    noun: str
    money: bool


def parse_solution(answer: str) -> list[SolutionStep]:
    """The steps of a generated problem, read from its reference answer (every line but ``#### n``).

    Exact by construction rather than by a second record field: every operand, operator, result, subject
    and noun is written verbatim into the answer by ``result_line``, and each parsed line is rendered back
    with ``result_line`` and must equal the original, so a parse either reproduces the generator's step or
    raises (a GSM8K record that was not generated here, or a vocabulary word that breaks the line shape).
    Each step must also start from the previous result and compute exactly, as generated ones do.
    """
    *lines, final = answer.split("\n")
    steps = []
    for line in lines:
        match = _SOLUTION_LINE.match(line)
        if match is None:
            raise DataError(f"not a generated answer line (subject verb x op b=<<x op b=y>>y ...): {line!r}")
        op, rest = match["op"], f" {match['rest'] or ''}"
        tail = _TAILS.get(op, "")
        noun = (rest[: -len(tail)] if tail and rest.endswith(tail) else rest).strip()
        step = SolutionStep(match["subject"], match["verb"], int(match["x"]), op, int(match["b"]),
                            int(match["y"]), noun, bool(match["money"]))  # fmt: skip
        state = State(step.y, step.subject, noun, "money" if step.money else "item")
        rendered = result_line(step.subject, step.verb, step.x, op, step.b, step.y, state, tail)
        if rendered != line or (step.money and noun):
            raise DataError(f"answer line does not match the generator's layout: {line!r}")
        chained = not steps or step.x == steps[-1].y
        if not chained or step.y != _RESULTS[op](step.x, step.b) or (op == "/" and step.x % step.b):
            raise DataError(f"answer line is not the running amount computed exactly: {line!r}")
        steps.append(step)
    if not steps or final != f"#### {steps[-1].y}":
        raise DataError(f"a generated answer ends in '#### <last result>': {answer!r}")
    return steps
