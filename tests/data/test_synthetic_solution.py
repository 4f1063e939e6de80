"""Reading a generated problem's steps back from its reference answer, without changing what is generated."""

from __future__ import annotations

import hashlib
import json

import pytest

from llada_trm.data.gsm8k import DataError
from llada_trm.data.synthetic import SolutionStep, SyntheticTaskConfig, generate_problems, parse_solution


@pytest.mark.parametrize(
    ("config", "n", "split", "seed", "digest"),
    [
        (SyntheticTaskConfig(), 300, "train", 0,
         "6408e1f3fe60d4febe8acc62b361cd466f48013bb166b6081077c689bbd9d5bb"),
        # issue 15 halved the held-out buckets into validation and test: the test split is now the old
        # test problems (digest 900fa376...) that fall in the upper half, in their order
        (SyntheticTaskConfig(), 100, "test", 3,
         "501925c16501539aaddd12b21b67501dbd3ed341a1c9314e11fad00712db1ec9"),
        (SyntheticTaskConfig(), 100, "validation", 3,
         "b1f402aa81a02f9b59a1c779f47b5d4b6b30234f3dfe70075ce8be0fa9ca06d4"),
        (SyntheticTaskConfig(max_steps=8, max_number=50, max_result=5000), 200, "train", 7,
         "75c69b180aaa6932664367bb7b1b474ccebd66fa6d08083cb248d77faa7a4ace"),
    ],
)  # fmt: skip
def test_generated_problems_are_byte_identical(config, n, split, seed, digest):
    """The train digests were taken from the generator before parse_solution was added: the embedded
    model was trained on exactly these problems, so an unintended change to the text or the RNG stream
    shows here."""
    records = generate_problems(config, n, split, seed)
    text = json.dumps([record.to_dict() for record in records])
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_parse_solution_reads_every_step():
    answer = (
        "Ella has 4-2=<<4-2=2>>2 shells left.\n"
        "Ella makes 2*13=$<<2*13=26>>26.\n"
        "Jake has 26-8=$<<26-8=18>>18 left.\n"
        "Each cousin gets 18/3=$<<18/3=6>>6.\n"
        "Each cousin has 6+5=$<<6+5=11>>11 now.\n"
        "#### 11"
    )
    steps = parse_solution(answer)
    assert steps[0] == SolutionStep("Ella", "has", 4, "-", 2, 2, "shells", False)
    assert steps[1] == SolutionStep("Ella", "makes", 2, "*", 13, 26, "", True)
    assert steps[2] == SolutionStep("Jake", "has", 26, "-", 8, 18, "", True)  # " left" is a tail, not a noun
    assert steps[3] == SolutionStep("Each cousin", "gets", 18, "/", 3, 6, "", True)
    assert steps[4].noun == "" and steps[4].y == 11


def test_parse_solution_round_trips_generated_problems():
    config = SyntheticTaskConfig(max_steps=8)
    for record in generate_problems(config, 400, seed=5):
        steps = parse_solution(record.answer)
        assert len(steps) == len(record.answer.splitlines()) - 1
        assert steps[-1].y == int(record.final_answer)
        assert all(later.x == earlier.y for earlier, later in zip(steps, steps[1:], strict=False))
        assert all(step.subject.split()[-1].lower() in record.question.lower() for step in steps)
        assert all(not step.money or step.noun == "" for step in steps)


@pytest.mark.parametrize(
    "answer",
    [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 24",  # GSM8K's own spacing
        "Tom has 3+4=<<3+4=8>>8 apples now.\n#### 8",  # wrong arithmetic
        "Tom has 7/2=<<7/2=3>>3 apples.\n#### 3",  # inexact division
        "Tom has 3+4=<<3+4=7>>7 apples now.\nTom has 8-2=<<8-2=6>>6 apples left.\n#### 6",  # not chained
        "Tom has 3+4=<<3+4=7>>7 apples now.\n#### 9",  # final is not the last result
        "Tom has 3+4=<<3+4=7>>7 apples.\n#### 7",  # '+' lines always end in 'now'
        "#### 7",
    ],
)
def test_parse_solution_rejects_answers_not_generated_here(answer):
    with pytest.raises(DataError):
        parse_solution(answer)
