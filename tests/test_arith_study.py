"""Issue 26's study configs (configs/arith/): they validate, agree on the task, and run end to end, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_assets import tiny_backbone

from llada_trm.cli import main
from llada_trm.compare import load_compare_config
from llada_trm.data.arithmetic import ArithmeticTaskConfig, answer_carries
from llada_trm.pretrain import load_pretrain_config

ARITH = Path(__file__).resolve().parents[1] / "configs" / "arith"
TASK_FIELDS = set(ArithmeticTaskConfig.model_fields)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    return tiny_backbone(tmp_path_factory)


def tiny(backbone_dir: Path, out: Path) -> list[str]:
    """`--set` overrides that shrink a study config to seconds on the tiny random backbone."""
    settings = {
        "run.model.backbone": backbone_dir,
        "run.data.arithmetic.n_train": 16, "run.data.arithmetic.n_eval": 4,
        "run.training.max_steps": 2, "run.training.batch_size": 4, "run.training.warmup_steps": 1,
        "run.training.eval_every": 2, "run.training.eval_max_batches": 1, "run.training.log_every": 1,
        "run.sampling.batch_size": 2, "run.sampling.gen_length": 16, "run.sampling.block_length": 8,
        "run.sampling.steps": 4, "evaluation.n_problems": 3, "output.dir": out,
    }  # fmt: skip
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_the_study_configs_validate_and_share_the_backbones_task() -> None:
    backbone = load_pretrain_config(ARITH / "backbone.yaml")
    assert backbone.data.dataset == "arithmetic" and backbone.model.n_layers == 2
    assert backbone.output.dir.startswith("experiments/")
    study = load_compare_config(ARITH / "compare.yaml")
    lsd = load_compare_config(ARITH / "compare_lsd.yaml")
    for config in (study, lsd):
        assert config.run.model.backbone == backbone.output.dir
        task = config.run.data.arithmetic.model_dump(include=TASK_FIELDS)
        assert task == backbone.data.arithmetic.model_dump()
    trained_k = [study.run_for(f"slot_k{k}", 0, ".").model.max_recursive_steps for k in (1, 2, 4, 8)]
    assert trained_k == [1, 2, 4, 8]
    k4 = study.run_for("slot_k4", 0, ".")
    assert (k4.training.masks, k4.model.chunk_selection) == ("answer_structure", "all")
    assert k4.model.halting == "none"
    assert k4.model.slot.delta_scale == 0.5
    assert study.run_for("mlp_matched", 0, ".").model.mlp.param_budget == "slot"
    assert study.trained_backbone() == ["phase2_top"]
    assert study.run.sampling.digit_order == "confidence" and lsd.run.sampling.digit_order == "lsd_first"
    # the LSD control differs from the study only in its sampler (and its arms and output)
    assert lsd.run.model_dump(exclude={"sampling"}) == study.run.model_dump(exclude={"sampling"})
    assert lsd.run.sampling.model_dump(exclude={"digit_order"}) == study.run.sampling.model_dump(
        exclude={"digit_order"}
    )


@pytest.mark.parametrize("name", ["compare.yaml", "compare_lsd.yaml"])
def test_the_study_runs_end_to_end_tiny(name: str, backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    args = ["compare", "--config", str(ARITH / name), "--seeds", "0", "--no-progress"]
    args += tiny(backbone_dir, out)
    assert main(args) == 0
    report = json.loads((out / "comparison.json").read_text())
    assert report["dataset"] == "arithmetic" and report["split_check"]["overlaps"] == 0
    expected = {"none", *load_compare_config(ARITH / name).refiners}
    assert {row["refiner"] for row in report["rows"]} == expected
    assert report["sampling"].get("digit_order", "confidence") == (
        "lsd_first" if name == "compare_lsd.yaml" else "confidence"
    )
    predictions = [json.loads(line) for line in next(out.rglob("predictions.jsonl")).read_text().splitlines()]
    assert len(predictions) == 3
    assert all(answer_carries(p["reference"]) >= 0 for p in predictions)  # the carries a plot groups by
