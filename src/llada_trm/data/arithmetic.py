"""A generated arithmetic task: lines ``a op b = c`` and short chains of them, with controlled difficulty.

Where the GSM8K-style task (`data.synthetic`) wraps each operation in a story, this one asks for the
arithmetic alone ("What is (4817 + 2795) * 3?"), answered in the other task's calculator annotations
(``4817+2795=<<4817+2795=7612>>7612``, one line per operation, then ``#### n``), so that what a model must
compute is the carries. Difficulty is each operand's digit count (1 to 5) and the problem's carries and
borrows (`carries`), which `answer_carries` reads back from a reference answer so that an evaluation can
group accuracy by them. Splits use the other task's hash rule (`synthetic.question_split`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from llada_trm.schema import Int, NonNegInt, Section, to_float, to_int

from .gsm8k import DataError, GSM8KRecord
from .synthetic import SyntheticTaskConfig, draw_split, generate_problems

ARITHMETIC_OPERATIONS = ("+", "-", "*")
MAX_DIGITS = 5
MAX_CHAIN = 4

Digits = Annotated[int, BeforeValidator(to_int), Field(ge=1, le=MAX_DIGITS)]
ChainLength = Annotated[int, BeforeValidator(to_int), Field(ge=1, le=MAX_CHAIN)]


class ArithmeticTaskConfig(Section):
    """Difficulty knobs of the arithmetic task (the run config's `data.arithmetic`).

    Every drawn operand (the first number and each line's second one) has between ``min_digits`` and
    ``max_digits`` digits, uniformly; a chain has ``min_chain``..``max_chain`` lines. A subtraction never goes
    below 0 (its operands are swapped, or a chained one redrawn). ``min_carries`` / ``max_carries`` (null =
    unbounded) keep only problems whose carry + borrow count (`carries`, summed over the lines) lies in
    range: equal values ask for exactly that many.
    """

    model_config = ConfigDict(frozen=True)

    min_digits: Digits = 1
    max_digits: Digits = 5
    operations: Annotated[tuple[Literal["+", "-", "*"], ...], Field(min_length=1)] = ("+", "-")
    min_chain: ChainLength = 1
    max_chain: ChainLength = 1
    min_carries: NonNegInt = 0
    max_carries: NonNegInt | None = None
    seed: Int = 0
    test_fraction: Annotated[float, BeforeValidator(to_float), Field(gt=0.0, lt=1.0)] = 0.1

    @model_validator(mode="after")
    def _consistent(self) -> ArithmeticTaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) must not exceed max_digits ({self.max_digits})")
        if self.min_chain > self.max_chain:
            raise ValueError(f"min_chain ({self.min_chain}) must not exceed max_chain ({self.max_chain})")
        if self.max_carries is not None and self.min_carries > self.max_carries:
            raise ValueError(
                f"min_carries ({self.min_carries}) must not exceed max_carries ({self.max_carries})"
            )
        return self


# ----------------------------------------------------------------------------------------------------
# carries and borrows
# ----------------------------------------------------------------------------------------------------


def _digits(n: int) -> list[int]:
    """Digits of ``n`` >= 0, least significant first."""
    return [int(d) for d in reversed(str(n))]


def _add_carries(a: int, b: int) -> int:
    x, y = _digits(a), _digits(b)
    count = carry = 0
    for i in range(max(len(x), len(y))):
        total = (x[i] if i < len(x) else 0) + (y[i] if i < len(y) else 0) + carry
        carry = int(total >= 10)
        count += carry
    return count


def _sub_borrows(a: int, b: int) -> int:
    x, y = _digits(a), _digits(b)
    count = borrow = 0
    for i in range(len(x)):
        difference = x[i] - (y[i] if i < len(y) else 0) - borrow
        borrow = int(difference < 0)
        count += borrow
    return count


def _mul_carries(a: int, b: int) -> int:
    """Schoolbook long multiplication: the carries of each partial product ``a * digit`` plus those of
    adding the shifted partial products (left to right, as written)."""
    count, total = 0, 0
    x = _digits(a)
    for shift, digit in enumerate(_digits(b)):
        carry = 0
        for d in x:
            carry = (d * digit + carry) // 10
            count += int(carry > 0)
        partial = a * digit * 10**shift
        count += _add_carries(total, partial)
        total += partial
    return count


def carries(a: int, op: str, b: int) -> int:
    """How many carries (``+``, ``*``) or borrows (``-``, ``a >= b``) the schoolbook method of ``a op b``
    makes: 999+1 has 3, 1000-1 has 3 borrows, 123+456 none."""
    if a < 0 or b < 0:
        raise ValueError(f"carries are counted for non-negative operands, got {a} {op} {b}")
    if op == "+":
        return _add_carries(a, b)
    if op == "-":
        if a < b:
            raise ValueError(f"borrows are counted for a >= b, got {a} - {b}")
        return _sub_borrows(a, b)
    if op == "*":
        return _mul_carries(a, b)
    raise ValueError(f"operation must be one of {', '.join(ARITHMETIC_OPERATIONS)}, got {op!r}")


# ----------------------------------------------------------------------------------------------------
# problems, and reading them back
# ----------------------------------------------------------------------------------------------------

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_LINE = re.compile(r"^(?P<a>\d+)(?P<op>[-+*])(?P<b>\d+)=<<(?P=a)(?P=op)(?P=b)=(?P<c>\d+)>>(?P=c)$")


@dataclass(frozen=True)
class ArithmeticLine:
    """One answer line ``a op b = c`` and its carry (or borrow) count."""

    a: int
    op: str
    b: int
    c: int

    @property
    def carries(self) -> int:
        return carries(self.a, self.op, self.b)

    def text(self) -> str:
        """The calculator annotation of the GSM8K-style task: ``4817+2795=<<4817+2795=7612>>7612``."""
        return f"{self.a}{self.op}{self.b}=<<{self.a}{self.op}{self.b}={self.c}>>{self.c}"


@dataclass(frozen=True)
class ArithmeticProblem:
    """A generated problem: its record (question and answer) and the carries it takes, line by line."""

    record: GSM8KRecord
    lines: tuple[ArithmeticLine, ...]

    @property
    def carries(self) -> int:
        """Carries and borrows over every line: the problem's difficulty, as the config filters it."""
        return sum(line.carries for line in self.lines)

    @property
    def max_digits(self) -> int:
        """Digits of the longest number the problem writes (operands and results)."""
        return max(len(str(n)) for line in self.lines for n in (line.a, line.b, line.c))


def _question(lines: tuple[ArithmeticLine, ...]) -> str:
    """``What is 12 + 5 - 3?``: left to right, with parentheses where ``*`` follows a sum or difference."""
    expression, compound = str(lines[0].a), False
    for line in lines:
        if line.op == "*" and compound:
            expression = f"({expression})"
        expression = f"{expression} {line.op} {line.b}"
        compound = line.op != "*"
    return f"What is {expression}?"


def _problem(lines: tuple[ArithmeticLine, ...]) -> ArithmeticProblem:
    answer = "\n".join([*(line.text() for line in lines), f"#### {lines[-1].c}"])
    return ArithmeticProblem(GSM8KRecord(_question(lines), answer), lines)


def parse_arithmetic(answer: str) -> list[ArithmeticLine]:
    """The lines of a generated arithmetic answer, each checked (exact result, chained on the previous
    result, ``####`` the last one); `DataError` (one line) for any other text."""
    *texts, final = answer.split("\n")
    lines: list[ArithmeticLine] = []
    for text in texts:
        match = _LINE.match(text)
        if match is None:
            raise DataError(f"not an arithmetic answer line (a op b=<<a op b=c>>c): {text!r}")
        line = ArithmeticLine(int(match["a"]), match["op"], int(match["b"]), int(match["c"]))
        if line.c != _APPLY[line.op](line.a, line.b) or (lines and line.a != lines[-1].c):
            raise DataError(f"arithmetic answer line is not the previous result computed exactly: {text!r}")
        lines.append(line)
    if not lines or final != f"#### {lines[-1].c}":
        raise DataError(f"an arithmetic answer ends in '#### <last result>': {answer!r}")
    return lines


def answer_carries(answer: str) -> int:
    """The carries and borrows of a generated arithmetic answer (a prediction's ``reference``)."""
    return sum(line.carries for line in parse_arithmetic(answer))


# ----------------------------------------------------------------------------------------------------
# drawing problems
# ----------------------------------------------------------------------------------------------------


def _operand(config: ArithmeticTaskConfig, rng: random.Random, at_most: int | None = None) -> int | None:
    """A number of min_digits..max_digits digits (uniform digit count, then uniform value), at most
    ``at_most``; None when no such number exists."""
    high_digits = config.max_digits if at_most is None else min(config.max_digits, len(str(at_most)))
    if high_digits < config.min_digits:
        return None
    digits = rng.randint(config.min_digits, high_digits)
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    if at_most is not None:
        high = min(high, at_most)
    return rng.randint(low, high) if low <= high else None


def _sample_lines(config: ArithmeticTaskConfig, rng: random.Random) -> tuple[ArithmeticLine, ...] | None:
    """One chain of lines, or None when a chained subtraction has no operand small enough (caller redraws)."""
    length = rng.randint(config.min_chain, config.max_chain)
    a = _operand(config, rng)
    lines = []
    for index in range(length):
        op = rng.choice(config.operations)
        b = _operand(config, rng, a if (op == "-" and index > 0) else None)
        if a is None or b is None:
            return None
        if op == "-" and index == 0 and a < b:
            a, b = b, a
        c = _APPLY[op](a, b)
        lines.append(ArithmeticLine(a, op, b, c))
        a = c
    return tuple(lines)


def generate_arithmetic(
    config: ArithmeticTaskConfig, n: int, split: str = "train", seed: int | None = None
) -> list[ArithmeticProblem]:
    """``n`` problems of ``split`` whose carries lie in [min_carries, max_carries], deterministic for ``seed``
    (or config.seed); a larger request extends a smaller one (its first problems are the same).

    Validation and test problems are distinct (each counts once). Training problems are drawn with repeats,
    as the configured distribution gives them: its small-operand strata hold few distinct problems (100
    one-digit sums), and drawing the training split without repeats starved them (one-digit sums were 0.4%
    of 20,000 distinct training problems instead of 1/9), taking away the easy facts a model learns first
    (docs/results/arith_backbone_attempts.md). The splits stay disjoint by the hash rule either way.
    """
    seed = config.seed if seed is None else seed
    rng = random.Random(f"llada-trm/arithmetic/{seed}/{split}")

    def draw() -> ArithmeticProblem | None:
        lines = _sample_lines(config, rng)
        if lines is None:
            return None
        problem = _problem(lines)
        count, top = problem.carries, config.max_carries
        return problem if config.min_carries <= count and (top is None or count <= top) else None

    problems = draw_split(
        draw, lambda problem: problem.record.question, n, split, config.test_fraction, repeats=True
    )
    if len(problems) < n:
        top = "+" if config.max_carries is None else f"-{config.max_carries}"
        carries_range = f"{config.min_carries}{top}"
        raise DataError(
            f"could only generate {len(problems)} of {n} {split} arithmetic problems (digits "
            f"{config.min_digits}-{config.max_digits}, chain {config.min_chain}-{config.max_chain}, carries "
            f"{carries_range}, operations {''.join(config.operations)}); widen the task (more digits, longer "
            "chains, a wider carries range) or ask for fewer"
        )
    return problems


def generate_task_records(
    task: SyntheticTaskConfig | ArithmeticTaskConfig, n: int, split: str = "train"
) -> list[GSM8KRecord]:
    """Records of either generated task, chosen by the type of its config section."""
    if isinstance(task, ArithmeticTaskConfig):
        return [problem.record for problem in generate_arithmetic(task, n, split)]
    return generate_problems(task, n, split)
