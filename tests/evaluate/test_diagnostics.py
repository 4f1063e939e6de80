"""Confident-error diagnostics (issue 24, item 4): where first errors are committed, what the refiner changed
at commit, the reliability of the commit confidence; recorded through the sampler's `on_step` hook."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_assets import TOY_MASK, TOY_VARIANTS, toy_hybrid, toy_prompt, toy_sample

from llada_trm.diffusion.sampler import StepEvent
from llada_trm.evaluate.diagnostics import (
    CommitRecorder,
    answer_span,
    commit_diagnostics,
    commit_fields,
    diagnostics_markdown,
)
from llada_trm.study.plots import plot_reliability
from llada_trm.study.report import diagnostics_section_markdown, diagnostics_sections

EOT, EOS = 98, 99
G, PROMPT, CHUNK = 8, 4, 4  # chunk 1 = answer positions 0-3, chunk 2 = answer positions 4-7

# Three answers of 8 tokens. Row 0 is wrong at position 2 (confident, in a chunk not refined); row 1 is right;
# row 2 is wrong at position 1 (p 0.4, in a refined chunk where the refiner changed the backbone's 16 to 17).
REFERENCE = [[10, 11, 12, 13, 14, EOT, EOS, EOS], [10, 11, EOT, EOS, EOS, EOS, EOS, EOS],
             [10, 11, 12, EOT, EOS, EOS, EOS, EOS]]  # fmt: skip
REFERENCE_LENGTH = [7, 4, 5]
FINAL = [[10, 11, 20, 13, 15, EOT, EOS, EOS], [10, 11, EOT, EOS, EOS, EOS, EOS, EOS],
         [10, 17, 12, EOT, EOS, EOS, EOS, EOS]]  # fmt: skip
# (step, row) -> {position: (token, confidence, backbone argmax)}; refined chunks per step and row
STEPS = [
    {0: {0: (10, 0.99, 10), 1: (11, 0.95, 30)},  # the refiner fixed position 1 (backbone 30)
     1: {0: (10, 0.5, 10), 1: (11, 0.5, 11), 2: (EOT, 0.99, EOT), 3: (EOS, 0.99, EOS)},
     2: {0: (10, 0.9, 10), 1: (17, 0.4, 16)}},
    {0: {2: (20, 0.97, 20), 3: (13, 0.6, 13)},
     1: {p: (EOS, 1.0, 42 if p == 4 else EOS) for p in range(4, 8)},  # past the answer span: not counted
     2: {2: (12, 0.8, 12), 3: (EOT, 0.99, EOT)}},
    {0: {4: (15, 0.85, 14),  # broke: the backbone's 14 was right
         5: (EOT, 0.999, EOT), 6: (EOS, 1.0, 14), 7: (EOS, 1.0, 50)},  # fixed; past the span
     2: {p: (EOS, 1.0, EOS) for p in range(4, 8)}},
]  # fmt: skip
REFINED = [{0: [1], 2: [1]}, {1: [2]}, {0: [2]}]


def _event(step: int) -> StepEvent:
    rows = len(FINAL)
    committed = torch.zeros(rows, G, dtype=torch.bool)
    confidence = torch.full((rows, G), float("nan"))
    base = torch.full((rows, G), -1, dtype=torch.long)
    tokens = torch.full((rows, G), TOY_MASK, dtype=torch.long)
    for later in STEPS[: step + 1]:
        for row, commits in later.items():
            for position, (token, _, _) in commits.items():
                tokens[row, position] = token
    for row, commits in STEPS[step].items():
        for position, (_, p, backbone) in commits.items():
            committed[row, position] = True
            confidence[row, position] = p
            base[row, position] = backbone
    chunks = torch.zeros(rows, 3, dtype=torch.bool)
    for row, refined in REFINED[step].items():
        chunks[row, refined] = True
    return StepEvent(block=0, step=step, committed=committed, tokens=tokens, confidence=confidence,
                     mask_id=TOY_MASK, prompt_length=PROMPT, chunk_size=CHUNK, chunks_refined=chunks,
                     chunks_halted=torch.zeros_like(chunks), base_tokens=base)  # fmt: skip


def _predictions(refining: bool = True) -> list[dict]:
    recorder = CommitRecorder(len(FINAL), G)
    for step in range(len(STEPS)):
        recorder(_event(step))
    predictions = []
    for row, tokens in enumerate(FINAL):
        span = answer_span(tokens, REFERENCE_LENGTH[row], (EOS, EOT))
        predictions.append({
            "index": row, "correct_strict": tokens == REFERENCE[row], "reference": "not a generated answer",
            "completion": "", "commits": commit_fields(recorder, row, tokens, REFERENCE[row], span,
                                                       refining=refining),
        })  # fmt: skip
    return predictions


def test_the_recorder_keeps_each_commits_step_confidence_backbone_token_and_chunk():
    commits = _predictions()[0]["commits"]
    assert commits["step"] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert commits["confidence"] == pytest.approx([0.99, 0.95, 0.97, 0.6, 0.85, 0.999, 1.0, 1.0])
    assert commits["backbone"] == [10, 30, 20, 13, 14, EOT, 14, 50]
    assert commits["refined"] == [1, 1, 0, 0, 1, 1, 1, 1]
    assert commits["span"] == 7  # the reference's 7 tokens; the completion ends (EOT) at 6
    assert _predictions()[2]["commits"]["span"] == 5  # the completion ends at 4, the reference at 5


def test_first_errors_changes_and_reliability_on_a_scripted_trajectory():
    report = commit_diagnostics(_predictions())
    assert report["wrong"] == 2 and report["recorded"] == 3
    first = report["first_errors"]
    assert first["n"] == 2 and first["no_token_differs"] == 0
    assert (first["confident"]["k"], first["confident"]["n"]) == (1, 2)  # row 0 at 0.97; row 2 at 0.4
    assert (first["skipped"]["k"], first["skipped"]["n"]) == (1, 2)  # row 0's chunk was not refined
    assert (first["changed_by_refiner"]["k"], first["changed_by_refiner"]["n"]) == (1, 1)
    assert first["median_confidence"] == pytest.approx((0.97 + 0.4) / 2)
    where = [(f["index"], f["position"], f["step"]) for f in report["first_error_list"]]
    assert where == [(0, 2, 1), (2, 1, 0)]
    # 7 + 4 + 5 answer-span commits; refined: row 0 positions 0, 1, 4, 5, 6 and row 2 positions 0, 1
    assert report["commits"] == {"n": 16, "refined": 7, "changed": 4, "fixed": 2, "broke": 1, "neither": 1}

    bins = {(b["low"], b["high"]): (b["n"], b["correct"]) for b in report["reliability"]["bins"] if b["n"]}
    assert bins == {(0.4, 0.5): (1, 0), (0.5, 0.6): (2, 2), (0.6, 0.7): (1, 1), (0.8, 0.9): (2, 1),
                    (0.9, 0.95): (1, 1), (0.95, 0.99): (2, 1), (0.99, 1.0): (7, 7)}  # fmt: skip
    top = [0.99, 0.999, 1.0, 0.99, 0.99, 0.99, 1.0]
    by_bin = [[0.4], [0.5, 0.5], [0.6], [0.85, 0.8], [0.9], [0.95, 0.97], top]
    right = [0, 2, 1, 1, 1, 1, 7]
    ece = sum(abs(k / len(c) - sum(c) / len(c)) * len(c) for k, c in zip(right, by_bin, strict=True)) / 16
    assert report["reliability"]["ece"] == pytest.approx(ece, abs=1e-5)


def test_the_first_committed_error_follows_the_samplers_order():
    same = commit_diagnostics(_predictions())["first_committed_errors"]  # here the first errors came first
    assert (same["n"], same["confident"]["k"], same["skipped"]["k"]) == (2, 1, 1)
    predictions = _predictions()
    predictions[0]["commits"]["step"][4] = 0  # row 0's wrong position 4 (p 0.85, refined) now came first
    report = commit_diagnostics(predictions)
    moved = report["first_committed_errors"]
    assert (moved["n"], moved["confident"]["k"], moved["skipped"]["k"]) == (2, 0, 0)
    assert report["first_errors"]["confident"]["k"] == 1  # reading order is unchanged
    text = diagnostics_markdown({"slot": report})
    assert "| first committed error at p >= 0.9 / not refined | 0% (0/2) / 0% (0/2) |" in text


def test_a_model_that_refines_nothing_has_no_change_figures():
    report = commit_diagnostics(_predictions(refining=False))
    assert report["first_errors"]["skipped"] is None and report["first_errors"]["changed_by_refiner"] is None
    assert report["commits"] == {"n": 16, "refined": None, "changed": None, "fixed": None, "broke": None,
                                 "neither": None}  # fmt: skip
    assert report["first_errors"]["confident"]["k"] == 1  # what needs no refiner is still there
    assert commit_diagnostics([{"correct_strict": False, "completion": ""}]) is None  # nothing recorded


def test_the_report_renders_each_models_column_and_the_plot(tmp_path):
    reports = {"none": commit_diagnostics(_predictions(False)), "slot": commit_diagnostics(_predictions())}
    text = diagnostics_markdown(reports)
    assert "| | none | slot |" in text
    assert "| first error committed at p >= 0.9 | 50% (1/2) | 50% (1/2) |" in text
    assert "| first error in a chunk not refined | - | 50% (1/2) |" in text
    assert "| tokens the refiner changed at commit | - | 4 (57.1% of refined) |" in text
    assert "| of them fixed / broke / neither | - | 2 / 1 / 1 |" in text
    assert "| [0.99, 1.00] | 100.0% (7) | 100.0% (7) |" in text and "| [0.40, 0.50) | 0.0% (1) |" in text
    assert plot_reliability(reports, tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_reliability({"none": None}, tmp_path / "none.png") is None

    sections = diagnostics_sections({0: {"none": _predictions(False), "slot": _predictions()},
                                     1: {"none": _predictions(False), "slot": _predictions()}})  # fmt: skip
    assert sections["pooled"]["slot"]["commits"]["fixed"] == 4  # two seeds' (seed, problem) pairs
    markdown = diagnostics_section_markdown(sections, [0, 1])
    assert markdown.startswith("## Confident-error diagnostics (all seeds'")
    assert "| 8 (57.1% of refined)" in markdown


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("variant", list(TOY_VARIANTS))
def test_the_sampler_reports_the_backbones_own_argmax(variant: str, cfg_scale: float):
    """Greedy: outside refined chunks every commit is the backbone's argmax; inside, the refiner moves some
    (its update bound widened so that it can: 4 x the clamp 0.5)."""
    slot = {"n_heads": 2, "n_blocks": 1}
    model = toy_hybrid(confidence_threshold=0.9, max_recursive_steps=3, delta_scale=4.0, slot=slot)
    events: list[StepEvent] = []
    toy_sample(model, variant, events.append, cfg_scale=cfg_scale)
    moved = 0
    for event in events:
        assert event.base_tokens is not None and event.base_tokens.shape == event.committed.shape
        chunk = (torch.arange(event.committed.shape[1]) + event.prompt_length) // event.chunk_size
        refined = event.chunks_refined[:, chunk]
        plain = event.committed & ~refined
        assert torch.equal(event.tokens[plain], event.base_tokens[plain])
        moved += int((event.tokens != event.base_tokens)[event.committed & refined].sum())
    assert moved > 0
    if cfg_scale == 0:  # the first call sees prompt + masks: the backbone argmax over block 0, -1 after
        prompt, attention_mask = toy_prompt()
        x = torch.cat([prompt, torch.full((2, 16), TOY_MASK)], dim=1)
        mask = torch.cat([attention_mask, torch.ones(2, 16, dtype=attention_mask.dtype)], dim=1)
        with torch.no_grad():
            expected = model.backbone(x, attention_mask=mask).logits.argmax(dim=-1)[:, 7:15]
        assert torch.equal(events[0].base_tokens[:, :8], expected)
        assert (events[0].base_tokens[:, 8:] == -1).all()
    backbone_only: list[StepEvent] = []
    toy_sample(model.backbone, variant, backbone_only.append, cfg_scale=cfg_scale)
    assert all(event.base_tokens is None for event in backbone_only)


def test_no_confidence_figures_under_random_remasking():
    predictions = _predictions()
    for prediction in predictions:
        prediction["commits"]["confidence"] = None
    report = commit_diagnostics(predictions)
    assert report["reliability"] is None and report["first_errors"]["confident"] is None
    assert math.isclose(report["commits"]["fixed"], 2)


def test_first_errors_are_broken_down_by_the_error_analysis_category():
    """Row 0 answers a generated problem with a wrong result: its first error counts under wrong_result."""
    predictions = _predictions()
    predictions[0]["reference"] = "Sam has 20+2=<<20+2=22>>22 balloons now.\n#### 22"
    predictions[0]["completion"] = "Sam has 20+2=<<20+2=23>>23 balloons now.\n#### 23"
    report = commit_diagnostics(predictions)
    assert set(report["first_errors"]["by_category"]) == {"wrong_result"}  # row 2's reference is not one
    wrong_result = report["first_errors"]["by_category"]["wrong_result"]
    assert (wrong_result["n"], wrong_result["confident"]["k"], wrong_result["skipped"]["k"]) == (1, 1, 1)
    text = diagnostics_markdown({"slot": report})
    assert "| wrong_result: first error at p >= 0.9 / not refined | 100% (1/1) / 100% (1/1) |" in text
