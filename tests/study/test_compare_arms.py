"""Lever studies in `compare`: named arms (a refiner + the run settings it changes), each compared with the
backbone alone and with a reference arm, validation against the frozen backbone for phase-2 arms."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny_assets import compare_yaml

from llada_trm.cli import main
from llada_trm.study.config import CompareConfig
from llada_trm.study.report import comparison_pairs, validation_sections


def test_an_arm_changes_only_what_it_lists():
    config = CompareConfig.model_validate({
        "run": {"model": {"max_recursive_steps": 3}, "training": {"lr": 5e-4}},
        "refiners": ["slot", "slot_k1"],
        "arms": {"slot_k1": {"refiner": "slot", "run": {"model": {"max_recursive_steps": 1}}}},
    })  # fmt: skip
    arm, plain = config.run_for("slot_k1", 2, "out/a"), config.run_for("slot", 2, "out/b")
    assert (arm.model.refiner, arm.model.max_recursive_steps, arm.training.seed) == ("slot", 1, 2)
    assert plain.model.max_recursive_steps == 3 and arm.training.lr == plain.training.lr == 5e-4
    assert arm.output.dir == "out/a" and config.trained_backbone() == []


@pytest.mark.parametrize(
    ("refiners", "arms", "reference", "message"),
    [
        (["slot", "carry"], {}, None, "'carry' is neither mlp, slot nor a key of arms"),
        (["slot"], {"slot": {"refiner": "mlp"}}, None, "not a usable arm name"),
        (["slot", "mlp"], {}, "carry", "reference: 'carry' must be one of refiners"),
        (["x"], {"x": {"refiner": "slot", "run": {"model": {"bogus": 1}}}}, None, "arms.x.run: model.bogus"),
        (["slot", "slot"], {}, None, "lists a model twice"),
    ],
)
def test_bad_arms_fail_before_anything_trains(refiners, arms, reference, message):
    with pytest.raises(ValueError, match=message):
        CompareConfig.model_validate({"refiners": refiners, "arms": arms, "reference": reference})


def test_every_arm_is_paired_with_the_backbone_and_the_reference():
    kinds = ["none", "mlp", "slot", "carry", "phase2"]
    pairs = comparison_pairs(kinds, "slot")
    assert pairs == [("mlp", "none"), ("slot", "none"), ("slot", "mlp"), ("carry", "none"),
                     ("phase2", "none"), ("mlp", "slot"), ("carry", "slot"), ("phase2", "slot")]  # fmt: skip
    assert comparison_pairs(["none", "mlp", "slot"]) == [("mlp", "none"), ("slot", "none"), ("slot", "mlp")]


def _columns(loss, correct, loss_base, correct_base):
    return {"loss": loss, "correct": correct, "loss_base": loss_base, "correct_base": correct_base,
            "masked": [2, 2]}  # fmt: skip


def test_a_phase2_arm_is_validated_against_the_frozen_backbone():
    frozen = _columns([1.0, 1.0], [1, 1], [2.0, 2.0], [0, 0])
    # the phase-2 model's own "backbone" columns are itself (its backbone changed): they must not be used
    phase2 = _columns([1.5, 1.5], [1, 1], [1.5, 1.5], [1, 1])
    runs = {0: {"slot": frozen, "phase2": phase2}}
    section = validation_sections(runs, "slot", ["phase2"])["per_seed"]["0"]
    assert section["phase2_vs_none"]["loss_diff"]["diff"] == pytest.approx(-0.5)
    assert section["phase2_vs_slot"]["loss_diff"]["diff"] == pytest.approx(0.5)
    alone = validation_sections({0: {"phase2": phase2}}, None, ["phase2"])["per_seed"]["0"]
    assert "phase2_vs_none" not in alone  # no frozen model to read the backbone's columns from


def test_a_lever_study_reports_each_arm_against_the_reference(backbone_dir, tmp_path):
    config = compare_yaml(backbone_dir, tmp_path / "cmp")
    config["refiners"] = ["slot", "slot_k1"]
    config["arms"] = {"slot_k1": {"refiner": "slot", "run": {"model": {"max_recursive_steps": 1}}}}
    config["reference"] = "slot"
    path = tmp_path / "levers.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    rows = {row["refiner"]: row for row in report["rows"]}
    assert list(rows) == ["none", "slot", "slot_k1"]
    assert rows["slot_k1"]["mean_refine_steps"] == 1.0 and rows["slot"]["mean_refine_steps"] == 2.0
    assert set(report["per_seed"]["0"]["paired"]) == {"slot_vs_none", "slot_k1_vs_none", "slot_k1_vs_slot"}
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "slot_k1: slot refiner, model.max_recursive_steps=1" in markdown


def test_resume_reuses_finished_models_and_evaluations(backbone_dir, tmp_path, capsys):
    config = compare_yaml(backbone_dir, tmp_path / "cmp")
    config["refiners"] = ["slot"]
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0"]) == 0
    seed0 = tmp_path / "cmp" / "seed0" / "slot"
    weights = seed0 / "checkpoints" / "last" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    # another seed later (or in a parallel process): seed 0's training and sampling are reused
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0,1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "reusing the trained slot, seed 0" in out and "training slot (slot refiner), seed 1" in out
    assert f"reusing {seed0 / 'eval'}" in out and weights.stat().st_mtime_ns == stamp
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert report["seeds"] == [0, 1] and set(report["per_seed"]) == {"0", "1"}
    # without --resume the finished comparison is refused; a changed plan is never silently reused
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0"]) == 2
    config["run"]["training"]["lr"] = 0.5
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0", "--resume"]) == 2
    assert "trained with other settings than this comparison plans" in capsys.readouterr().err
