"""A comparison a researcher can trust (issue 15): a disjoint test split, validation comparable across
training seeds, per-seed and pooled statistics, `eval --against`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from tiny_assets import TINY_SAMPLING, compare_yaml

from llada_trm.build import check_test_split
from llada_trm.cli import main
from llada_trm.config import parse_config
from llada_trm.data.gsm8k import DataError, GSM8KRecord
from llada_trm.data.synthetic import generate_problems
from llada_trm.errors import ConfigError
from llada_trm.training.validation import check_save_best


@pytest.fixture(scope="module")
def study(backbone_dir, tmp_path_factory) -> Path:
    """A two-seed smoke study: 2 training steps, 4 test problems, sampled validation on 2 problems."""
    tmp = tmp_path_factory.mktemp("study")
    config = compare_yaml(backbone_dir, tmp / "cmp")
    config["evaluation"]["n_problems"] = 4
    config["run"]["training"]["val_sampled_problems"] = 2
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress", "--seeds", "0,1"]) == 0
    return tmp / "cmp"


def last_row(path: Path) -> dict[str, str]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))[-1]


def test_report_has_per_seed_and_pooled_statistics(study):
    report = json.loads((study / "comparison.json").read_text())
    assert report["seeds"] == [0, 1] and report["problems"] == 4
    assert report["split_check"]["overlaps"] == 0 and report["split_check"]["problems"]["test"] == 4
    for seed in ("0", "1"):
        section = report["per_seed"][seed]
        assert set(section["accuracy"]) == {"none", "mlp", "slot"}
        assert set(section["paired"]) == {"mlp_vs_none", "slot_vs_none", "slot_vs_mlp"}
        for paired in section["paired"].values():
            assert {"gained", "lost", "p", "ci_low", "ci_high", "verdict"} <= set(paired)
    pooled = report["pooled"]["paired"]["slot_vs_mlp"]
    assert {"pooled_mcnemar", "stratified_sign_test", "diff"} <= set(pooled)
    assert report["pooled"]["accuracy"]["mlp"]["mean_std"]["n"] == 2
    assert "sampled once" in report["backbone_runs"]  # temperature 0: deterministic
    assert not (study / "seed0" / "none").exists() and (study / "none" / "eval").is_dir()
    # the words follow the p-values: every p here is >= 0.05 (4 problems cannot show anything)
    markdown = (study / "comparison.md").read_text()
    ps = [s["p"] for seed in report["per_seed"].values() for s in seed["paired"].values()]
    assert all(p >= 0.05 for p in ps) and "not significant" in markdown
    assert " significant" not in markdown.replace("not significant", "")
    assert "**Power.**" in markdown and "First deviation of wrong answers" in markdown
    errors = json.loads((study / "errors.json").read_text())
    assert set(errors["pooled"]) == {"none", "mlp", "slot"} and set(errors["line_level"]) == {"0", "1"}
    assert (study / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_has_the_confident_error_diagnostics(study):
    """comparison.json/.md, diagnostics.json and reliability.png; each evaluation's per-commit records."""
    pooled = json.loads((study / "comparison.json").read_text())["diagnostics"]["pooled"]
    assert set(pooled) == {"none", "mlp", "slot"}
    assert pooled["none"]["commits"]["changed"] is None  # the backbone alone refines nothing
    assert pooled["slot"]["commits"]["changed"] is not None and pooled["slot"]["first_errors"]["n"] >= 0
    details = json.loads((study / "diagnostics.json").read_text())
    assert set(details["per_seed"]) == {"0", "1"} and "first_error_list" in details["pooled"]["slot"]
    markdown = (study / "comparison.md").read_text()
    assert "## Confident-error diagnostics" in markdown
    assert "| first error committed at p >= 0.9 |" in markdown
    assert (study / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    (path,) = (study / "seed0" / "slot" / "eval").glob("*/predictions.jsonl")
    for line in path.read_text().splitlines():
        commits = json.loads(line)["commits"]
        assert len(commits["token"]) == len(commits["reference"]) == 16 and min(commits["step"]) >= 0
        flags = zip(commits["token"], commits["backbone"], commits["refined"], strict=True)
        assert all(refined or token == backbone for token, backbone, refined in flags)  # greedy: outside
        # refined chunks every commit is the backbone's argmax


def test_validation_is_the_same_for_every_training_seed(study):
    """The backbone is frozen and validated on masks drawn from data.validation_seed, not training.seed."""
    seed0, seed1 = (last_row(study / f"seed{s}" / "mlp" / "validation_metrics.csv") for s in (0, 1))
    assert float(seed0["loss_base"]) == pytest.approx(float(seed1["loss_base"]), rel=1e-6)
    assert seed0["accuracy_base"] == seed1["accuracy_base"]
    assert seed0["loss"] != seed1["loss"]  # the refiners themselves differ by seed
    assert "sampled_accuracy" in seed0 and 0.0 <= float(seed0["sampled_accuracy"]) <= 1.0
    report = json.loads((study / "comparison.json").read_text())
    per_seed = report["validation"]["per_seed"]
    assert per_seed["0"]["mlp_vs_none"]["loss_baseline"] == per_seed["1"]["mlp_vs_none"]["loss_baseline"]
    assert "per-example paired" in report["validation"]["method"]


def test_eval_against_pairs_two_predictions_files(study, capsys):
    backbone = study / "none" / "eval" / "synthetic-test"
    sampling = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_SAMPLING.items()]
    argv = ["eval", "--checkpoint", str(study / "seed0" / "slot"), "--limit", "4", "--no-progress",
            "--out", str(study / "against"), "--against", str(backbone), *sampling]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "paired (strict): this slot run vs" in out and "McNemar p =" in out
    paired = json.loads((study / "against" / "paired.json").read_text())
    expected = json.loads((study / "comparison.json").read_text())["per_seed"]["0"]["paired"]["slot_vs_none"]
    assert (paired["strict"]["gained"], paired["strict"]["lost"]) == (expected["gained"], expected["lost"])
    # other problems: refused in one line, before any sampling
    assert main([*argv[:3], "--limit", "3", "--no-progress", "--against", str(backbone), *sampling]) == 2
    err = capsys.readouterr().err.strip()
    assert "4 and 3 problems" in err and len(err.splitlines()) == 1


def test_compare_refuses_a_test_split_that_overlaps_validation(backbone_dir, tmp_path, capsys):
    config = compare_yaml(backbone_dir, tmp_path / "cmp")
    config["evaluation"].update(n_problems=4, split="validation")  # the trainer's own validation problems
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "validation and test splits share 4 problem" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cmp").exists()  # refused before any training


def test_check_test_split_names_the_overlap():
    run = parse_config({"data": {"n_train": 30, "n_eval": 6}})
    test = generate_problems(run.data.synthetic, 5, "test")
    assert check_test_split(run, test)["overlaps"] == 0
    train = generate_problems(run.data.synthetic, 30, "train")
    leaked = GSM8KRecord(question=train[7].question + " ", answer=train[7].answer)
    with pytest.raises(DataError, match="train and test splits share 1 problem"):
        check_test_split(run, [*test, leaked])


def test_best_by_sampled_accuracy_needs_sampled_validation():
    with pytest.raises(ConfigError, match="val_sampled_problems"):
        check_save_best(parse_config({"output": {"save_best": "sampled_accuracy"}}))
    config = parse_config({"output": {"save_best": "sampled_accuracy"},
                           "training": {"val_sampled_problems": 4}})  # fmt: skip
    check_save_best(config)
    assert config.output.best_is_lower is False
