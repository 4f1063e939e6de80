"""Issue 26's study configs (configs/arith/): they validate, agree on the task, and run end to end, tiny."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_assets import REPO

from llada_trm.cli import main
from llada_trm.data.arithmetic import ArithmeticTaskConfig, answer_carries
from llada_trm.extras.pretraining.config import load_pretrain_config
from llada_trm.study.config import load_compare_config

ARITH = REPO / "configs" / "arith"
TASK_FIELDS = set(ArithmeticTaskConfig.model_fields)


def tiny(backbone_dir: Path, out: Path) -> list[str]:
    """`--set` overrides that shrink a study config to seconds on the tiny random backbone."""
    settings = {
        "run.model.backbone": backbone_dir,
        "run.data.n_train": 16, "run.data.n_eval": 4,
        "run.training.max_steps": 2, "run.training.batch_size": 4, "run.training.warmup_steps": 1,
        "run.training.eval_every": 2,
        "run.sampling.gen_length": 16, "run.sampling.block_length": 8,
        "run.sampling.steps": 4, "evaluation.n_problems": 3, "output.dir": out,
    }  # fmt: skip
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_the_study_configs_validate_and_share_the_backbones_task() -> None:
    # the study's backbone is the last of the chain of pretraining runs its card lists
    backbone = load_pretrain_config(ARITH / "backbone4_results3.yaml")
    assert backbone.data.dataset == "arithmetic" and backbone.model.n_layers == 4
    assert backbone.output.dir.startswith("experiments/")
    study = load_compare_config(ARITH / "compare.yaml")
    lsd = load_compare_config(ARITH / "compare_lsd.yaml")
    for config in (study, lsd):
        assert config.run.model.backbone == backbone.output.dir
        run_task = config.run.data.arithmetic  # its fixed fields are class constants (issue 25): read them
        task = {name: getattr(run_task, name) for name in TASK_FIELDS}
        assert task == backbone.data.arithmetic.model_dump()
    trained_k = [study.run_for(f"slot_k{k}", 0, ".").model.max_recursive_steps for k in (1, 2, 4, 8)]
    assert trained_k == [1, 2, 4, 8]
    k4 = study.run_for("slot_k4", 0, ".")
    assert (k4.training.masks, k4.model.chunk_selection) == ("answer_structure", "all")
    assert k4.model.halting == "none"
    assert k4.model.delta_scale == 0.5
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


def test_the_depth_by_carries_report_runs_on_a_tiny_study(
    backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/arith_study.py: test-time K sweep of one arm, the decoding controls, groups by carry count."""
    import importlib.util

    study = tmp_path / "study"
    arms = ["--set", "refiners=[slot_k2,phase2_top]", "--set", "reference=null"]
    run = ["compare", "--seeds", "0", "--no-progress", "--config"]
    assert main([*run, str(ARITH / "compare.yaml"), *arms, *tiny(backbone_dir, study)]) == 0
    script_path = ARITH.parents[1] / "scripts" / "arith_study.py"
    spec = importlib.util.spec_from_file_location("arith_study", script_path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "arith_study", script)  # its dataclasses look their module up
    spec.loader.exec_module(script)
    out = tmp_path / "report" / "arith"
    args = [str(study), "--lsd-decoding", "--arms", "slot_k2", "--steps", "1,3", "--denoise-steps",
            "--lsd-arms", "slot_k2", "--carry-edges", "0,2", "--out", str(out)]  # fmt: skip
    # an arm the compare did not train is refused before anything is sampled
    assert script.main([*args[:-2], "--lsd-arms", "slot_k9", "--out", str(tmp_path / "refused")]) == 2
    assert not (study / "seed0" / "slot_k2" / "eval" / "depth_1").exists()
    assert script.main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["backbone", "backbone, LSD-first", "backbone, 1 token/call", "phase2_top (trained K)",
                     "slot_k2 K=1", "slot_k2 K=3", "slot_k2 (trained K), LSD-first"]  # fmt: skip
    assert report["groups"] == ["all", "carries 0-1", "carries 2+"]
    rows = {row["name"]: row for row in report["rows"]}
    sizes = [rows["backbone"]["groups"][g]["n"] for g in report["groups"]]
    assert sizes[0] == 3 and sizes[1] + sizes[2] == 3  # every problem in exactly one carry group
    # the test-time depth reached the sampler: K=1 and K=3 were sampled into their own folders
    for k in (1, 3):
        summary = json.loads(next((study / "seed0" / "slot_k2" / "eval" / f"depth_{k}").glob("summary.json")
                                  ).read_text())  # fmt: skip
        assert summary["refine_steps"] == k and summary["refinement"]["mean_refine_steps"] == k
    # the one-token-per-call control made one model call per generated token (gen 16, batch 2 -> 8 calls)
    assert rows["backbone, 1 token/call"]["calls_per_problem"]["mean"] == 16
    assert set(rows["slot_k2 K=3"]["vs_controls"]) == {"backbone, LSD-first", "backbone, 1 token/call",
                                                       "phase2_top (trained K)"}  # fmt: skip
    # the refiner decoded LSD-first: its own folder, the LSD sampler, paired with every control
    lsd_eval = study / "seed0" / "slot_k2" / "eval" / "lsd_first"
    lsd_summary = json.loads((lsd_eval / "summary.json").read_text())
    assert lsd_summary["sampling"]["digit_order"] == "lsd_first"
    assert "backbone, LSD-first" in rows["slot_k2 (trained K), LSD-first"]["vs_controls"]
    assert out.with_suffix(".png").stat().st_size > 0 and "carries 2+" in out.with_suffix(".md").read_text()
