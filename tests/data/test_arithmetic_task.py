"""The generated arithmetic task: carries on hand-checked examples, digit counts, splits, answer format."""

from __future__ import annotations

import re

import pytest

from llada_trm.config import parse_config
from llada_trm.data.arithmetic import (
    ArithmeticLine,
    ArithmeticTaskConfig,
    answer_carries,
    carries,
    generate_arithmetic,
    generate_task_records,
    parse_arithmetic,
)
from llada_trm.data.disjoint import check_disjoint
from llada_trm.data.gsm8k import DataError, extract_final_answer
from llada_trm.data.synthetic import question_split
from llada_trm.errors import ConfigError
from llada_trm.evaluate.evaluator import load_eval_records, synthetic_settings
from llada_trm.evaluate.extraction import extract_strict, is_correct


@pytest.mark.parametrize(
    ("a", "op", "b", "expected"),
    [
        (999, "+", 1, 3),  # 9+1, 9+0+1, 9+0+1: three carries
        (123, "+", 456, 0),
        (4817, "+", 2795, 3),  # 7+5 carry, 1+9+1 carry, 8+7+1 carry, 4+2+1 none
        (5, "+", 5, 1),
        (99999, "+", 99999, 5),
        (1000, "-", 1, 3),  # borrows through three zeros
        (456, "-", 123, 0),
        (52, "-", 38, 1),
        (0, "-", 0, 0),
        (12, "*", 3, 0),  # 2*3, 1*3: no carries
        (15, "*", 7, 2),  # 5*7 = 35 (carry 3), 1*7 + 3 = 10 (carry 1)
        (25, "*", 11, 0),  # 25*1 twice without a carry; 25 + 250 = 275 adds without one
    ],
)
def test_carries_on_hand_checked_examples(a: int, op: str, b: int, expected: int) -> None:
    assert carries(a, op, b) == expected


def test_carries_refuse_a_negative_difference() -> None:
    with pytest.raises(ValueError, match="a >= b"):
        carries(1, "-", 2)


def test_answer_is_the_calculator_annotation_and_parses() -> None:
    line = ArithmeticLine(4817, "+", 2795, 7612)
    assert line.text() == "4817+2795=<<4817+2795=7612>>7612"
    answer = f"{line.text()}\n#### 7612"
    assert parse_arithmetic(answer) == [line]
    assert answer_carries(answer) == 3
    assert extract_final_answer(answer) == "7612"
    assert extract_strict(answer) == "7612"
    with pytest.raises(DataError, match="computed exactly"):
        parse_arithmetic("1+1=<<1+1=3>>3\n#### 3")


def test_problems_respect_digit_counts_and_record_their_carries() -> None:
    config = ArithmeticTaskConfig(min_digits=3, max_digits=4, operations=("+", "-"), seed=1)
    problems = generate_arithmetic(config, 60, "train")
    for problem in problems:
        (line,) = problem.lines
        assert 3 <= len(str(line.a)) <= 4 and 3 <= len(str(line.b)) <= 4
        assert line.c == (line.a + line.b if line.op == "+" else line.a - line.b) and line.c >= 0
        assert problem.record.question == f"What is {line.a} {line.op} {line.b}?"
        assert problem.carries == carries(line.a, line.op, line.b) == answer_carries(problem.record.answer)
        assert is_correct(f"{line.text()}\n#### {line.c}", problem.record.answer)
    assert {len(str(p.lines[0].a)) for p in problems} == {3, 4}


def test_carry_filter_and_chains() -> None:
    config = ArithmeticTaskConfig(
        min_digits=2, max_digits=3, min_chain=2, max_chain=3, operations=("+", "-", "*"),
        min_carries=3, max_carries=4,
    )  # fmt: skip
    problems = generate_arithmetic(config, 40, "train")
    assert all(3 <= p.carries <= 4 for p in problems)
    assert {len(p.lines) for p in problems} == {2, 3}
    for problem in problems:
        lines = parse_arithmetic(problem.record.answer)
        assert list(problem.lines) == lines
        assert all(later.a == earlier.c for earlier, later in zip(lines, lines[1:], strict=False))
        assert problem.record.answer.endswith(f"#### {lines[-1].c}")
    # the question evaluates, left to right with its parentheses, to the answer
    for problem in problems:
        expression = problem.record.question.removeprefix("What is ").removesuffix("?")
        assert eval(expression) == problem.lines[-1].c  # noqa: S307 - digits, operators and parentheses


def test_training_problems_keep_the_configured_digit_counts() -> None:
    """Drawn without repeats, the 100 one-digit sums ran out and were 0.4% of 20,000 training problems."""
    config = ArithmeticTaskConfig(min_digits=1, max_digits=3, operations=("+",))
    train = generate_arithmetic(config, 3000, "train")
    one_digit = sum(len(str(p.lines[0].a)) == len(str(p.lines[0].b)) == 1 for p in train) / len(train)
    assert 0.08 < one_digit < 0.14  # 1/9 of draws, less the share the hash rule sends to other splits
    test = generate_arithmetic(config, 300, "test")
    assert len({p.record.question for p in test}) == len(test)  # evaluation problems count once


def test_impossible_carry_target_is_one_clear_error() -> None:
    config = ArithmeticTaskConfig(min_digits=1, max_digits=1, operations=("+",), min_carries=3)
    with pytest.raises(DataError, match="could only generate 0 of 5 .*widen the task"):
        generate_arithmetic(config, 5, "train")


def test_splits_disjoint_by_the_shared_hash_rule_and_deterministic() -> None:
    config = ArithmeticTaskConfig(min_digits=1, max_digits=3, test_fraction=0.2)
    splits = {name: generate_task_records(config, 40, name) for name in ("train", "validation", "test")}
    assert check_disjoint(splits)["overlaps"] == 0
    for name, records in splits.items():
        assert all(question_split(r.question, 0.2) == name for r in records)
    assert generate_task_records(config, 40, "test") == splits["test"]
    assert generate_task_records(config, 10, "test") == splits["test"][:10]
    assert generate_task_records(config.model_copy(update={"seed": 5}), 40, "test") != splits["test"]


def test_run_config_selects_the_task_and_evaluation_reads_it(tmp_path) -> None:
    raw = {"data": {"dataset": "arithmetic", "n_train": 10, "n_eval": 4, "arithmetic": {"max_digits": 2}}}
    config = parse_config(raw)
    assert config.data.generated() is config.data.arithmetic
    assert config.data.synthetic == parse_config({}).data.synthetic  # the other task's section is untouched
    records = load_eval_records("arithmetic", "test", synthetic=synthetic_settings(config.data), limit=6)
    assert len(records) == 6 and all(r.question.startswith("What is ") for r in records)
    assert all(max(map(len, re.findall(r"\d+", r.question))) <= 2 for r in records)
    with pytest.raises(ConfigError, match="dataset"):
        parse_config({"data": {"dataset": "arith"}})


def test_pretraining_targets_score_the_arithmetic_task() -> None:
    """`llada-trm pretrain` on the arithmetic task: strict accuracy and line arithmetic by operator, no
    entity rates (the GSM8K-style error report would refuse these references)."""
    from llada_trm.extras.pretraining.targets import target_metrics

    reference = "12+9=<<12+9=21>>21\n21-5=<<21-5=16>>16\n#### 16"
    predictions = [
        {"reference": reference, "completion": reference, "correct_strict": True},
        {"reference": reference, "completion": "12+9=<<12+9=22>>22\n22-5=<<22-5=17>>17\n#### 17",
         "correct_strict": False},  # fmt: skip
    ]
    found = target_metrics(predictions)
    assert found["strict"] == 0.5 and found["entity_copy"] is None
    assert found["arithmetic_add"] == 0.5  # 12+9 right once, wrong once
    assert found["arithmetic_sub"] == 1.0  # 21-5 right; 22-5 has other operands, so it is not counted
    assert found["line_arithmetic"] == pytest.approx(2 / 3)
