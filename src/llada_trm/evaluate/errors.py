"""Error analysis of the generated task: where each wrong answer first leaves the reference, entity
copying and line arithmetic. The categories and what is counted are defined in docs/comparison.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from llada_trm.data.gsm8k import DataError
from llada_trm.data.synthetic import OPERATIONS, SolutionStep, parse_solution
from llada_trm.evaluate.extraction import extract_strict, is_correct
from llada_trm.evaluate.statistics import mcnemar_exact, proportion

CATEGORIES = (
    "wrong_operand",
    "wrong_result",
    "result_not_carried",
    "wrong_step_count",
    "format_broken",
    "other",
)
_NUMBER = r"-?\d+(?:\.\d+)?"
_ANNOTATION = re.compile(rf"<<\s*({_NUMBER})\s*([-+*/])\s*({_NUMBER})\s*=\s*({_NUMBER})\s*>>")
_SUBJECT = re.compile(r"^\s*(?P<subject>.*?)\s+\S+\s+[-\d.,+*/=\s$]*$")
_LEAD_NUMBER = re.compile(r"^\s*-?[\d.,]*")
_TAIL_WORDS = ("now", "left")


@dataclass(frozen=True)
class AnswerLine:
    """One ``<<a op b=c>>`` line of a completion: who it names, the calculation, and the noun after it."""

    subject: str
    a: Fraction
    op: str
    b: Fraction
    c: Fraction
    noun: str


@dataclass(frozen=True)
class Deviation:
    """The first place a completion leaves the reference: a category ("none" when it never does), the
    0-based step it happened at (None when not tied to a step) and a one-line detail."""

    category: str
    step: int | None
    detail: str


def _parse_line(line: str) -> AnswerLine | None:
    match = _ANNOTATION.search(line)
    if match is None:
        return None
    subject = _SUBJECT.match(line[: match.start()])
    rest = _LEAD_NUMBER.sub("", line[match.end() :]).strip().rstrip(".").strip()
    words = rest.split()
    if words and words[-1].lower() in _TAIL_WORDS:
        words = words[:-1]
    a, op, b, c = match.groups()
    return AnswerLine(
        subject["subject"] if subject else "", Fraction(a), op, Fraction(b), Fraction(c), " ".join(words)
    )


def parse_answer_lines(completion: str) -> list[AnswerLine | None]:
    """The completion's lines that hold ``<<``, in order; None for one whose annotation is not a op b=c."""
    return [_parse_line(line) for line in completion.split("\n") if "<<" in line]


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _operands_match(line: AnswerLine, step: SolutionStep) -> bool:
    if (line.a, line.b) == (step.x, step.b):
        return True
    return step.op in "+*" and (line.b, line.a) == (step.x, step.b)


def _step_deviation(line: AnswerLine | None, step: SolutionStep, i: int, previous: Fraction | None):
    """The category of step ``i`` (None when the line is right); ``previous`` is the prior line's c."""
    if line is None:
        return Deviation("format_broken", i, "a <<...>> annotation that is not 'a op b=c'")
    shown = f"{_fmt(line.a)}{line.op}{_fmt(line.b)}={_fmt(line.c)}"
    if previous is not None:
        first = (line.a, line.b) if line.op in "+*" else (line.a,)
        if previous not in first:
            return Deviation("result_not_carried", i, f"{shown} does not use the previous result {previous}")
    if not _operands_match(line, step):
        return Deviation("wrong_operand", i, f"{shown} instead of {step.x}{step.op}{step.b}")
    if line.op != step.op:
        return Deviation("other", i, f"wrong operator: {shown} instead of {step.x}{step.op}{step.b}")
    if line.c != step.y:
        return Deviation("wrong_result", i, f"{shown} instead of {step.y}")
    return None


def first_deviation(completion: str, steps: Sequence[SolutionStep]) -> Deviation:
    """Walk ``completion`` against the reference ``steps``; the first deviation in reading order."""
    lines = parse_answer_lines(completion)
    if not any(line is not None for line in lines):
        return Deviation("format_broken", None, "no parsable <<a op b=c>> annotation")
    previous: Fraction | None = None
    for i, (line, step) in enumerate(zip(lines, steps, strict=False)):
        deviation = _step_deviation(line, step, i, previous)
        if deviation is not None:
            return deviation
        previous = line.c
    if len(lines) != len(steps):
        return Deviation(
            "wrong_step_count", min(len(lines), len(steps)), f"{len(lines)} lines for {len(steps)} steps"
        )
    final = extract_strict(completion)
    if final is None:
        return Deviation("format_broken", None, "every step right but no '#### n'")
    if final != str(steps[-1].y):
        return Deviation("other", None, f"final answer not the last result: #### {final} after {steps[-1].y}")
    return Deviation("none", None, "")


# ----------------------------------------------------------------------------------------------------
# a run's report
# ----------------------------------------------------------------------------------------------------


def _steps_of(prediction: Mapping[str, Any], position: int) -> list[SolutionStep]:
    try:
        return parse_solution(prediction["reference"])
    except (KeyError, DataError) as error:
        raise DataError(
            f"prediction {prediction.get('index', position)}: error analysis needs the generated task's "
            f"reference answer in 'reference' ({error}); run it on a synthetic evaluation"
        ) from None


def _is_correct(prediction: Mapping[str, Any]) -> bool:
    if "correct_strict" in prediction:
        return bool(prediction["correct_strict"])
    return is_correct(prediction["completion"], prediction["reference"])


def _word_in(word: str, text: str) -> bool:
    return bool(word) and re.search(rf"\b{re.escape(word)}", text, re.IGNORECASE) is not None


def _arithmetic_lines(completion: str, steps: Sequence[SolutionStep]) -> dict[int, tuple[str, bool]]:
    """Step index -> (operator, c right) for lines with the reference's operands and operator."""
    return {
        i: (step.op, line.c == step.y)
        for i, (line, step) in enumerate(zip(parse_answer_lines(completion), steps, strict=False))
        if line is not None and line.op == step.op and _operands_match(line, step)
    }


def _rate(k: int, n: int) -> dict[str, Any]:
    return proportion(k, n) if n else {"k": 0, "n": 0, "p": None, "low": None, "high": None}


def error_report(predictions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON-friendly error analysis of one run (a predictions.jsonl's records, in order).

    Each record needs ``completion`` and ``reference`` (the generated reference answer); ``question`` feeds
    the entity check and ``correct_strict`` (computed when absent) picks the wrong answers.
    """
    categories: Counter[str] = Counter({name: 0 for name in CATEGORIES})
    others: Counter[str] = Counter()
    wrong: list[dict[str, Any]] = []
    lines = person = thing = both = foreign = 0
    arithmetic = {op: [0, 0] for op in OPERATIONS}
    for position, prediction in enumerate(predictions):
        steps = _steps_of(prediction, position)
        completion = prediction["completion"]
        question = prediction.get("question", "")
        for line, step in zip(parse_answer_lines(completion), steps, strict=False):  # aligned by position
            if line is None:
                continue
            lines += 1
            same_person = line.subject.casefold() == step.subject.casefold()
            same_thing = line.noun.casefold() == step.noun.casefold()
            person, thing = person + same_person, thing + same_thing
            both += same_person and same_thing
            named = line.subject.split()[-1] if line.subject.split() else ""
            foreign += not _word_in(named, question)
        for op, right in _arithmetic_lines(completion, steps).values():
            arithmetic[op][0] += right
            arithmetic[op][1] += 1
        if _is_correct(prediction):
            continue
        deviation = first_deviation(completion, steps)
        category = "other" if deviation.category == "none" else deviation.category
        categories[category] += 1
        if category == "other":
            others[deviation.detail.split(":")[0] if deviation.detail else "no deviation found"] += 1
        wrong.append({"index": prediction.get("index", position), "category": category,
                      "step": deviation.step, "detail": deviation.detail})  # fmt: skip
    n_wrong = len(wrong)
    return {
        "problems": len(predictions),
        "wrong": n_wrong,
        "categories": dict(categories),
        "category_rates": {name: count / n_wrong if n_wrong else None for name, count in categories.items()},
        "other_details": dict(others),
        "entities": {
            "lines": lines,
            "person_copied": _rate(person, lines),
            "object_copied": _rate(thing, lines),
            "entity_copied": _rate(both, lines),  # person and object both: the backbone issue's target
            "person_not_in_question": _rate(foreign, lines),
        },
        "arithmetic": {
            **{op: _rate(k, n) for op, (k, n) in arithmetic.items()},
            "all": _rate(sum(k for k, _ in arithmetic.values()), sum(n for _, n in arithmetic.values())),
        },
        "wrong_answers": wrong,
    }


def paired_line_comparison(
    baseline: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Line-level arithmetic of two runs on the same problems: {lines, gained, lost, both_right, both_wrong,
    p, by_operator}.

    A line enters when both runs wrote step i of the problem with the reference's operands and operator, so
    both faced the same calculation; ``gained`` counts lines only the candidate computed right and ``p`` is
    the exact McNemar test. Lines of one problem share its difficulty, so p is a little optimistic.
    """
    if len(baseline) != len(candidate):
        raise ValueError(
            f"paired runs must answer the same problems, got {len(baseline)} and {len(candidate)}"
        )
    counts = {op: Counter() for op in OPERATIONS}
    for position, (a, b) in enumerate(zip(baseline, candidate, strict=True)):
        if a.get("question") != b.get("question") or a.get("reference") != b.get("reference"):
            raise ValueError(f"paired runs differ at problem {position}: align both on the same problems")
        steps = _steps_of(a, position)
        lines_a = _arithmetic_lines(a["completion"], steps)
        lines_b = _arithmetic_lines(b["completion"], steps)
        for i in lines_a.keys() & lines_b.keys():
            op, right_a = lines_a[i]
            right_b = lines_b[i][1]
            key = {(True, True): "both_right", (False, False): "both_wrong", (False, True): "gained"}
            counts[op][key.get((right_a, right_b), "lost")] += 1

    def summary(counter: Counter) -> dict[str, Any]:
        fields = {name: counter[name] for name in ("gained", "lost", "both_right", "both_wrong")}
        return {"lines": sum(fields.values()), **fields, "p": mcnemar_exact(fields["gained"], fields["lost"])}

    total = sum(counts.values(), Counter())
    return {**summary(total), "by_operator": {op: summary(counter) for op, counter in counts.items()}}


# ----------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (no trailing newline); an empty cell is written `| |`."""

    def line(cells: Sequence[str]) -> str:
        return "|" + "".join(f" {cell} |" if cell else " |" for cell in cells)

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def _cell_rate(rate: Mapping[str, Any]) -> str:
    if not rate["n"]:
        return "-"
    return f"{rate['p']:.1%} ({rate['k']}/{rate['n']})"


def errors_markdown(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """Two markdown tables, one column per run (``{"none": report, "slot": report}``): the first deviation
    of wrong answers, then entity copying and line arithmetic given the right operands."""
    if not reports:
        raise ValueError("errors_markdown needs at least one run's report")
    header = ["", *reports]
    first = [["wrong answers", *(f"{r['wrong']}/{r['problems']}" for r in reports.values())]]
    for name in CATEGORIES:
        cells = []
        for report in reports.values():
            count, wrong = report["categories"][name], report["wrong"]
            cells.append(f"{count} ({count / wrong:.0%})" if wrong else "0")
        first.append([name, *cells])
    second = []
    for label, key in (("person copied", "person_copied"), ("object copied", "object_copied"),
                       ("person not in question", "person_not_in_question")):  # fmt: skip
        second.append([label, *(_cell_rate(r["entities"][key]) for r in reports.values())])
    for op in (*OPERATIONS, "all"):
        label = f"arithmetic {op}" if op != "all" else "arithmetic, all lines"
        second.append([label, *(_cell_rate(r["arithmetic"][op]) for r in reports.values())])
    return (
        f"**First deviation of wrong answers**\n\n{markdown_table(header, first)}\n\n"
        f"**Answer lines**\n\n{markdown_table(header, second)}\n"
    )
