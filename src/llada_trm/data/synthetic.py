"""A generated GSM8K-style task: short multi-step word problems with answers in GSM8K's exact format.

The embedded default model is trained on these, so every answer looks like a GSM8K solution: one reasoning
line per arithmetic step with a ``<<a*b=c>>`` calculator annotation, then ``#### n``. A problem is a story
about one running amount (items, boxes or dollars): an opening sentence states it and each step changes it
with one operation, phrased by one of several templates (buying, giving away, prices, comparisons, sharing,
packing). A step's answer line is written by `result_line` and read back by `parse_solution`. Splits are
disjoint by construction (`question_split`); the train split is the one the embedded backbone was trained on.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from llada_trm.schema import Int, PosInt, Section, to_float, to_int

from .gsm8k import DataError, GSM8KRecord

OPERATIONS = ("+", "-", "*", "/")
SPLITS = ("train", "validation", "test")
MAX_STEPS = 8
_HASH_BUCKETS = 1_000_000
_MAX_MISSES = 5000
T = TypeVar("T")

DEFAULT_NAMES = (
    "Tom", "Ann", "Ben", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Ruby",
    "Noah", "Ella", "Liam", "Ava", "Owen", "Nora", "Eli", "Ivy", "Finn", "Lucy", "Jake", "Rosa",
)  # fmt: skip
DEFAULT_ITEMS = (
    "apples", "oranges", "marbles", "stickers", "pencils", "cookies", "books", "cards",
    "shells", "toys", "eggs", "stamps", "candies", "balloons", "flowers", "crayons",
)  # fmt: skip
DEFAULT_CONTAINERS = ("boxes", "bags", "jars", "baskets", "crates")
DEFAULT_GROUPS = (
    ("friends", "friend"), ("cousins", "cousin"), ("classmates", "classmate"),
    ("neighbors", "neighbor"), ("teammates", "teammate"), ("students", "student"),
)  # fmt: skip
DEFAULT_PURCHASES = ("book", "toy", "hat", "ticket", "ball", "kite", "game", "lunch box")
_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter"}


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


def result_line(
    subject: str, verb: str, x: int, op: str, b: int, y: int, state: State, tail: str = ""
) -> str:
    """The answer line of one step, in GSM8K's calculator annotation: ``Tom has 3*4=<<3*4=12>>12 apples.``
    (``$`` before ``<<`` for money, which is written without a noun)."""
    money, noun = ("$", "") if state.kind == "money" else ("", f" {state.noun}")
    return f"{cap(subject)} {verb} {x}{op}{b}={money}<<{x}{op}{b}={y}>>{y}{noun}{tail}."


# The ground truth of a generated problem, read back from its own reference answer: `parse_solution` renders
# each line back with `result_line` and requires the same text, so the writer and the reader cannot drift.

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

    Each parsed line is rendered back with ``result_line`` and must equal the original, and must start from
    the previous result and compute exactly, so a parse either reproduces the generator's step or raises
    (a record not generated here, or a vocabulary word that breaks the line shape).
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


Operation = Literal["+", "-", "*", "/"]
Words = Annotated[tuple[str, ...], Field(min_length=1)]


class SyntheticTaskConfig(Section):
    """Difficulty knobs and vocabulary of the generated task (the run config's `data.synthetic`).

    ``max_number`` bounds every number written in a question (the starting amount and each operand);
    ``max_result`` bounds every intermediate and final value, which keeps answers a few digits long.
    Frozen and hashable; lists (from YAML) are stored as tuples.
    """

    model_config = ConfigDict(frozen=True)

    min_steps: PosInt = 1
    max_steps: Annotated[int, BeforeValidator(to_int), Field(ge=1, le=MAX_STEPS)] = 4
    max_number: Annotated[int, BeforeValidator(to_int), Field(ge=2)] = 20
    max_result: PosInt = 1000
    operations: Annotated[tuple[Operation, ...], Field(min_length=1)] = OPERATIONS
    seed: Int = 0
    test_fraction: Annotated[float, BeforeValidator(to_float), Field(gt=0.0, lt=1.0)] = 0.1
    names: Words = DEFAULT_NAMES
    items: Words = DEFAULT_ITEMS
    containers: Words = DEFAULT_CONTAINERS
    groups: Annotated[tuple[tuple[str, ...], ...], Field(min_length=1)] = DEFAULT_GROUPS
    purchases: Words = DEFAULT_PURCHASES

    @model_validator(mode="after")
    def _consistent(self) -> SyntheticTaskConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if self.max_result < self.max_number:
            raise ValueError(f"max_result ({self.max_result}) must be >= max_number ({self.max_number})")
        if len(set(self.names)) < 2:
            raise ValueError("names needs at least two distinct names (problems involve a second person)")
        if any(len(group) != 2 for group in self.groups):
            raise ValueError("groups must be (plural, singular) pairs, e.g. ('friends', 'friend')")
        return self


def _bucket(question: str) -> int:
    return int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % _HASH_BUCKETS


def is_test_question(question: str, test_fraction: float) -> bool:
    """Held out from training (validation or test): the SHA-256 bucket is below ``test_fraction``."""
    return _bucket(question) < test_fraction * _HASH_BUCKETS


def question_split(question: str, test_fraction: float) -> str:
    """The split a question belongs to: "train", or the lower ("validation") or upper ("test") half of the
    held-out buckets."""
    bucket = _bucket(question)
    if bucket >= test_fraction * _HASH_BUCKETS:
        return "train"
    return "validation" if bucket < test_fraction * _HASH_BUCKETS / 2 else "test"


# ----------------------------------------------------------------------------------------------------
# one problem = an opening amount followed by ``steps`` moves
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Story:
    """The problem being written: its random stream and who appeared, so new people and groups are fresh."""

    config: SyntheticTaskConfig
    rng: random.Random
    used_names: set[str] = field(default_factory=set)
    used_groups: set[str] = field(default_factory=set)

    def other_person(self, subject: str) -> str:
        """A name not yet in the story (any name but the subject once all are used)."""
        fresh = [name for name in self.config.names if name not in self.used_names]
        pool = fresh or [name for name in self.config.names if name != subject]
        name = self.rng.choice(pool)
        self.used_names.add(name)
        return name

    def operand(self, high: int, accept: Callable[[int], bool] = lambda b: True) -> int | None:
        """A random operand in [2, min(high, max_number)] passing ``accept``; None when there is none."""
        candidates = [b for b in range(2, min(high, self.config.max_number) + 1) if accept(b)]
        return self.rng.choice(candidates) if candidates else None


@dataclass(frozen=True)
class _Step:
    sentence: str
    line: str
    state: State


def _add(story: _Story, st: State) -> _Step | None:
    b = story.operand(story.config.max_result - st.value)
    if b is None:
        return None
    s, what = st.subject, (f"${b}" if st.kind == "money" else f"{b} more {st.noun}")
    template = story.rng.randrange(3)
    if template == 0:
        sentence = f"{cap(s)} {'earns' if st.kind == 'money' else 'buys'} {what}."
    elif template == 1:
        sentence = f"{cap(s)} finds {what}."
    else:
        sentence = f"{story.other_person(s)} gives {s} {what}."
    y = st.value + b
    return _Step(sentence, result_line(s, "has", st.value, "+", b, y, st, " now"), replace(st, value=y))


def _subtract(story: _Story, st: State) -> _Step | None:
    b = story.operand(st.value - 2)  # keep every amount >= 2 so plural nouns stay grammatical
    if b is None:
        return None
    s, rng = st.subject, story.rng
    template = rng.randrange(3)
    if template == 0:
        what = f"${b}" if st.kind == "money" else f"{b} {st.noun}"
        sentence = f"{cap(s)} gives {what} to {story.other_person(s)}."
    elif st.kind == "money":
        sentence = f"{cap(s)} spends ${b} on a {rng.choice(story.config.purchases)}."
    else:
        sentence = f"{cap(s)} {'sells' if template == 1 else 'loses'} {b} of the {st.noun}."
    y = st.value - b
    return _Step(sentence, result_line(s, "has", st.value, "-", b, y, st, " left"), replace(st, value=y))


def _multiply(story: _Story, st: State) -> _Step | None:
    b = story.operand(story.config.max_result // st.value)
    if b is None:
        return None
    y = st.value * b
    s = st.subject
    if st.kind != "money" and story.rng.random() < 0.5:
        money = replace(st, value=y, noun="dollars", kind="money")
        sentence = f"{cap(s)} sells all the {st.noun} for ${b} each."
        return _Step(sentence, result_line(s, "makes", st.value, "*", b, y, money), money)
    other = story.other_person(s)
    what = "much money" if st.kind == "money" else f"many {st.noun}"
    sentence = f"{other} has {b} times as {what} as {s}."
    line = result_line(other, "has", st.value, "*", b, y, st)
    return _Step(sentence, line, replace(st, value=y, subject=other))


def _divide(story: _Story, st: State) -> _Step | None:
    x, rng = st.value, story.rng
    moves = []
    groups = [group for group in story.config.groups if group[0] not in story.used_groups]
    share = story.operand(x - 1, lambda b: x % b == 0)
    if groups and share is not None:
        moves.append("share")
    if st.kind == "item" and share is not None:
        moves.append("pack")
    fraction = story.operand(min(x - 1, max(_FRACTIONS)), lambda b: x % b == 0)
    if fraction is not None:
        moves.append("fraction")
    if not moves:
        return None
    move, s = rng.choice(moves), st.subject
    if move == "share":
        plural, singular = rng.choice(groups)
        story.used_groups.add(plural)
        what = "the money" if st.kind == "money" else f"the {st.noun}"
        sentence = f"{cap(s)} shares {what} equally among {share} {plural}."
        each = f"each {singular}"
        y = x // share
        line = result_line(each, "gets", x, "/", share, y, st)
        return _Step(sentence, line, replace(st, value=y, subject=each))
    if move == "pack":
        container = rng.choice(story.config.containers)
        packed = replace(st, value=x // share, noun=container, kind="container")
        sentence = f"{cap(s)} packs the {st.noun} into {container} of {share}."
        return _Step(sentence, result_line(s, "fills", x, "/", share, x // share, packed), packed)
    other = story.other_person(s)
    what = "much money" if st.kind == "money" else f"many {st.noun}"
    sentence = f"{other} has {_FRACTIONS[fraction]} as {what} as {s}."
    y = x // fraction
    line = result_line(other, "has", x, "/", fraction, y, st)
    return _Step(sentence, line, replace(st, value=y, subject=other))


_MOVES: dict[str, Callable[[_Story, State], _Step | None]] = {
    "+": _add,
    "-": _subtract,
    "*": _multiply,
    "/": _divide,
}


def _opening(story: _Story) -> tuple[str, State]:
    config, rng = story.config, story.rng
    owner = rng.choice(config.names)
    story.used_names.add(owner)
    value = rng.randint(2, config.max_number)
    if rng.random() < 0.3:
        state = State(value, owner, "dollars", "money")
        return rng.choice([f"{owner} has ${value}.", f"{owner} saves ${value}."]), state
    state = State(value, owner, rng.choice(config.items), "item")
    verb = rng.choice(["has", "buys", "collects"])
    return f"{owner} {verb} {value} {state.noun}.", state


def _sample_problem(config: SyntheticTaskConfig, rng: random.Random) -> GSM8KRecord | None:
    """One problem, or None when the drawn numbers leave no allowed operation feasible (caller redraws)."""
    story = _Story(config, rng)
    steps = rng.randint(config.min_steps, config.max_steps)
    opening, state = _opening(story)
    sentences, lines = [opening], []
    for _ in range(steps):
        step = None
        for op in rng.sample(config.operations, len(config.operations)):
            step = _MOVES[op](story, state)
            if step is not None:
                break
        if step is None:
            return None
        sentences.append(step.sentence)
        lines.append(step.line)
        state = step.state
    what = "dollars" if state.kind == "money" else state.noun
    sentences.append(f"How many {what} does {state.subject} have now?")
    lines.append(f"#### {state.value}")
    return GSM8KRecord(question=" ".join(sentences), answer="\n".join(lines))


def draw_split(
    draw: Callable[[], T | None],
    question: Callable[[T], str],
    n: int,
    split: str,
    test_fraction: float,
    *,
    repeats: bool = False,
    max_draws: int | None = None,
) -> list[T]:
    """Up to ``n`` drawn problems of ``split`` (by ``question_split``), each question once unless ``repeats``
    (then only a held-out split's are distinct); fewer when the problem space runs out. ``draw`` gives None
    for a draw to discard; it alone reads the random stream, so a larger ``n`` extends a smaller one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    found: list[T] = []
    seen: set[str] = set()
    misses = draws = 0  # misses: draws in a row that gave nothing new (a long run: the space is used up)
    while len(found) < n and misses < _MAX_MISSES and (max_draws is None or draws < max_draws):
        draws += 1
        misses += 1
        item = draw()
        if item is None:
            continue
        text = question(item)
        repeated = text in seen and (not repeats or split != "train")
        if repeated or question_split(text, test_fraction) != split:
            continue
        seen.add(text)
        found.append(item)
        misses = 0
    return found


def generate_problems(
    config: SyntheticTaskConfig, n: int, split: str = "train", seed: int | None = None
) -> list[GSM8KRecord]:
    """``n`` distinct problems of ``split`` ("train", "validation" or "test"), deterministic for ``seed``
    (or config.seed); a larger request extends a smaller one. Each split has its own random stream."""
    seed = config.seed if seed is None else seed
    rng = random.Random(f"llada-trm/synthetic/{seed}/{split}")
    problems = draw_split(
        lambda: _sample_problem(config, rng), lambda record: record.question, n, split, config.test_fraction,
        max_draws=200 * n + 1000,
    )  # fmt: skip
    if len(problems) < n:
        raise DataError(
            f"could only generate {len(problems)} of {n} distinct {split} problems (steps "
            f"{config.min_steps}-{config.max_steps}, max_number={config.max_number}, "
            f"max_result={config.max_result}, operations={''.join(config.operations)}); "
            "widen the task (larger max_number/max_result, more operations, other steps) or ask for fewer"
        )
    return problems
