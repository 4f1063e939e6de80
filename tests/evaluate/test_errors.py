"""Error analysis of the generated task: first deviations, entity copying, arithmetic, paired lines."""

from __future__ import annotations

import json

import pytest

from llada_trm.data.gsm8k import DataError
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems, parse_solution
from llada_trm.evaluate.errors import (
    CATEGORIES,
    error_report,
    errors_markdown,
    first_deviation,
    paired_line_comparison,
    parse_answer_lines,
)
from llada_trm.evaluate.statistics import mcnemar_exact

Q1 = (
    "Noah has 5 eggs. Lily has 18 times as many eggs as Noah. Sam has half as many eggs as Lily. "
    "Sam shares the eggs equally among 9 cousins. How many eggs does each cousin have now?"
)
R1 = (
    "Lily has 5*18=<<5*18=90>>90 eggs.\n"
    "Sam has 90/2=<<90/2=45>>45 eggs.\n"
    "Each cousin gets 45/9=<<45/9=5>>5 eggs.\n"
    "#### 5"
)
Q2 = "Sam buys 17 cards. Sam finds 5 more cards. Sam loses 4 of the cards. How many cards does Sam have now?"
R2 = "Sam has 17+5=<<17+5=22>>22 cards now.\nSam has 22-4=<<22-4=18>>18 cards left.\n#### 18"
L1, L2, L3, FINAL = R1.split("\n")


def _r1(*lines: str) -> str:
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("completion", "category", "step"),
    [
        (R1, "none", None),
        (_r1("Lily has 18*5=<<18*5=90>>90 eggs.", L2, L3, FINAL), "none", None),  # + and * in either order
        (_r1("Lily has 5*17=<<5*17=85>>85 eggs.", "Sam has 85/5=<<85/5=17>>17 eggs.", "#### 17"),
         "wrong_operand", 0),
        (_r1(L1, "Sam has 90/3=<<90/3=30>>30 eggs.", "Each cousin gets 30/5=<<30/5=6>>6 eggs.", "#### 6"),
         "wrong_operand", 1),
        (_r1(L1, L2, "Each cousin gets 45/9=<<45/9=6>>6 eggs.", "#### 6"), "wrong_result", 2),
        (_r1(L1, "Sam has 80/2=<<80/2=40>>40 eggs.", "Each cousin gets 40/8=<<40/8=5>>5 eggs.", "#### 5"),
         "result_not_carried", 1),
        (_r1(L1, L2, "#### 45"), "wrong_step_count", 2),
        (_r1(L1, L2, L3, "Each cousin has 5+1=<<5+1=6>>6 eggs now.", "#### 6"), "wrong_step_count", 3),
        (_r1(L1, L2), "wrong_step_count", 2),  # cut short: the missing step comes before the missing ####
        ("Lily has 90 eggs.\nEach cousin gets 5 eggs.\n#### 5", "format_broken", None),
        (_r1(L1, L2, L3), "format_broken", None),
        (_r1("Lily has 5*18=<<5*18*1=90>>90 eggs.", L2, L3, FINAL), "format_broken", 0),
        (_r1("Lily has 5+18=<<5+18=23>>23 eggs.", "#### 23"), "other", 0),  # right operands, wrong operator
        (_r1(L1, L2, L3, "#### 6"), "other", None),  # #### is not the last result
    ],
)  # fmt: skip
def test_first_deviation_categories(completion, category, step):
    deviation = first_deviation(completion, parse_solution(R1))
    assert (deviation.category, deviation.step) == (category, step)
    assert deviation.category == "none" or deviation.detail


def test_parse_answer_lines_reads_the_annotation_and_entities():
    lines = parse_answer_lines(
        "Some prose.\nEach cousin gets 45/9=<<45/9=5>>5 eggs.\nZoe has 9-2=$<<9-2=7>>7 left."
    )
    assert [(line.subject, line.op, int(line.c), line.noun) for line in lines] == [
        ("Each cousin", "/", 5, "eggs"),
        ("Zoe", "-", 7, ""),
    ]
    assert parse_answer_lines("Tom has <<3++4=>>7 apples.") == [None]


def _prediction(index: int, question: str, reference: str, completion: str) -> dict:
    return {"index": index, "question": question, "reference": reference, "completion": completion}


def test_entity_copy_counts():
    completion = _r1(L1, "Zed has 90/2=<<90/2=45>>45 apples.", "Sam gets 45/9=<<45/9=5>>5 eggs.", FINAL)
    report = error_report([_prediction(0, Q1, R1, completion)])
    entities = report["entities"]
    assert entities["lines"] == 3
    assert (entities["person_copied"]["k"], entities["object_copied"]["k"]) == (1, 2)
    assert entities["entity_copied"]["k"] == 1  # person and object both right: the first line only
    assert entities["person_not_in_question"]["k"] == 1  # Zed; Sam is in the question, just the wrong person
    assert report["wrong"] == 0  # the final answer is right, so no category


def test_arithmetic_accuracy_by_operator():
    wrong_r2 = "Sam has 17+5=<<17+5=23>>23 cards now.\nSam has 23-4=<<23-4=19>>19 cards left.\n#### 19"
    predictions = [
        _prediction(0, Q1, R1, R1),
        _prediction(1, Q1, R1, _r1(L1, L2, "Each cousin gets 45/9=<<45/9=6>>6 eggs.", "#### 6")),
        _prediction(2, Q2, R2, wrong_r2),  # its '-' line starts from 23, not 22: no reference operands
        _prediction(3, Q2, R2, R2),
    ]
    arithmetic = error_report(predictions)["arithmetic"]
    assert {op: (rate["k"], rate["n"]) for op, rate in arithmetic.items()} == {
        "+": (1, 2), "-": (1, 1), "*": (2, 2), "/": (3, 4), "all": (7, 9),
    }  # fmt: skip


def test_error_report_counts_first_deviations_of_wrong_answers_only():
    predictions = [
        _prediction(0, Q1, R1, R1),
        _prediction(1, Q1, R1, _r1(L1, L2, "Each cousin gets 45/9=<<45/9=6>>6 eggs.", "#### 6")),
        _prediction(2, Q1, R1, _r1(L1, L2, "#### 45")),
        {**_prediction(3, Q2, R2, "Sam has 22 cards.\n#### 22"), "correct_strict": False},
        {**_prediction(4, Q2, R2, "nonsense"), "correct_strict": True},  # the record's own verdict is used
        _prediction(5, Q1, R1, _r1(L1, L2, L3, "#### 6")),
    ]
    report = error_report(predictions)
    assert report["problems"] == 6 and report["wrong"] == 4
    assert set(report["categories"]) == set(CATEGORIES)
    assert {k: v for k, v in report["categories"].items() if v} == {
        "wrong_result": 1, "wrong_step_count": 1, "format_broken": 1, "other": 1,
    }  # fmt: skip
    assert report["other_details"] == {"final answer not the last result": 1}
    assert report["category_rates"]["wrong_result"] == pytest.approx(1 / 4)
    assert [w["index"] for w in report["wrong_answers"]] == [1, 2, 3, 5]
    assert json.loads(json.dumps(report)) == report
    assert report["wrong_answers"][0] == {"index": 1, "category": "wrong_result", "step": 2,
                                          "detail": "45/9=6 instead of 5"}  # fmt: skip


def test_error_report_needs_generated_references():
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 24"
    with pytest.raises(DataError, match="synthetic"):
        error_report([_prediction(0, "Natalia sold clips.", gsm8k, "#### 24")])


def test_generated_references_are_their_own_perfect_completions():
    records = generate_problems(SyntheticTaskConfig(max_steps=6), 60, seed=3)
    predictions = [_prediction(i, r.question, r.answer, r.answer) for i, r in enumerate(records)]
    report = error_report(predictions)
    assert report["wrong"] == 0
    assert report["entities"]["person_copied"]["p"] == 1.0
    assert report["entities"]["person_not_in_question"]["k"] == 0
    assert report["arithmetic"]["all"]["p"] == 1.0


def test_paired_line_comparison():
    r1_wrong = _r1(L1, L2, "Each cousin gets 45/9=<<45/9=6>>6 eggs.", "#### 6")
    r2_rest = "\nSam has 23-4=<<23-4=19>>19 cards left.\n#### 19"
    r2_wrong_result = "Sam has 17+5=<<17+5=23>>23 cards now." + r2_rest
    r2_wrong_operand = "Sam has 17+6=<<17+6=23>>23 cards now." + r2_rest
    baseline = [
        _prediction(0, Q1, R1, r1_wrong),
        _prediction(1, Q2, R2, r2_wrong_result),
        _prediction(2, Q1, R1, R1),
        _prediction(3, Q2, R2, R2),
    ]
    candidate = [
        _prediction(0, Q1, R1, R1),  # line 2 gained
        _prediction(1, Q2, R2, R2),  # line 0 gained; line 1 had other operands in the baseline
        _prediction(2, Q1, R1, r1_wrong),  # line 2 lost
        _prediction(3, Q2, R2, r2_wrong_operand),  # no line with the reference's operands
    ]
    result = paired_line_comparison(baseline, candidate)
    assert {k: result[k] for k in ("lines", "gained", "lost", "both_right", "both_wrong")} == {
        "lines": 7, "gained": 2, "lost": 1, "both_right": 4, "both_wrong": 0,
    }  # fmt: skip
    assert result["p"] == mcnemar_exact(2, 1)
    assert (result["by_operator"]["/"]["gained"], result["by_operator"]["/"]["lost"]) == (1, 1)
    assert result["by_operator"]["+"]["gained"] == 1 and result["by_operator"]["-"]["lines"] == 0
    with pytest.raises(ValueError, match="same problems"):
        paired_line_comparison(baseline, candidate[:2])
    with pytest.raises(ValueError, match="differ at problem 0"):
        paired_line_comparison(baseline, candidate[::-1])


def test_errors_markdown_has_a_column_per_run():
    wrong = _r1(L1, L2, "Each cousin gets 45/9=<<45/9=6>>6 eggs.", "#### 6")
    none = error_report([_prediction(0, Q1, R1, wrong)])
    slot = error_report([_prediction(0, Q1, R1, R1)])
    text = errors_markdown({"none": none, "slot": slot})
    assert "| | none | slot |" in text
    assert "| wrong_result | 1 (100%) | 0 |" in text
    assert "| arithmetic / | 50.0% (1/2) | 100.0% (2/2) |" in text
    assert "| arithmetic - | - | - |" in text
    with pytest.raises(ValueError):
        errors_markdown({})
