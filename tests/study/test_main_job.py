"""The main job (`llada-trm compare`): a tiny end-to-end run prints the table and writes every result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_assets import REPO, compare_yaml

from llada_trm.cli import main
from llada_trm.errors import ConfigError
from llada_trm.study.compare import format_table
from llada_trm.study.config import load_compare_config


def test_tiny_compare_prints_the_table_and_writes_results(backbone_dir, tmp_path, capsys):
    config_path = tmp_path / "compare.yaml"
    config_path.write_text(yaml.safe_dump(compare_yaml(backbone_dir, tmp_path / "cmp")))
    assert main(["compare", "--config", str(config_path), "--no-progress"]) == 0
    out = capsys.readouterr().out

    header = next(line for line in out.splitlines() if line.startswith("| refiner"))
    for title in ("acc strict", "acc flexible", "val loss", "refine steps", "skipped", "tokens/s"):
        assert title in header
    lines = out.splitlines()
    start = lines.index(header)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    table_rows = [line.split("|")[1].strip() for line in lines[start:end] if line.startswith("| ")]
    assert table_rows == ["refiner", "none", "mlp", "slot"]

    cmp, runs = tmp_path / "cmp", tmp_path / "cmp" / "seed0"
    report = json.loads((cmp / "comparison.json").read_text())
    rows = {row["refiner"]: row for row in report["rows"]}
    assert list(rows) == ["none", "mlp", "slot"] and report["problems"] == 3
    for kind in ("mlp", "slot"):
        val = list(csv_rows(runs / kind / "validation_metrics.csv"))[-1]
        assert rows[kind]["val_loss"] == pytest.approx(float(val["loss"]), rel=1e-4)
        assert rows[kind]["mean_refine_steps"] == 2.0 and rows[kind]["skipped_fraction"] == 0.0
        assert (runs / kind / "plots" / "loss.png").is_file()
    # the backbone-alone row is the frozen backbone on the refiners' validation masks
    mlp_val = list(csv_rows(runs / "mlp" / "validation_metrics.csv"))[-1]
    assert rows["none"]["val_loss"] == pytest.approx(float(mlp_val["loss_base"]), rel=1e-4)
    assert rows["none"]["mean_refine_steps"] is None
    # every model answered the same problems
    def predictions(kind: str) -> Path:  # the deterministic backbone is sampled once, for every seed
        return (cmp if kind == "none" else runs) / kind / "eval" / "synthetic-test" / "predictions.jsonl"

    questions = {}
    for kind in rows:
        lines = predictions(kind).read_text().splitlines()
        questions[kind] = [json.loads(line)["question"] for line in lines]
    assert questions["none"] == questions["mlp"] == questions["slot"] and len(questions["none"]) == 3
    # the paired counts against the backbone alone agree with the predictions
    correct = {}
    for kind in rows:
        lines = predictions(kind).read_text().splitlines()
        correct[kind] = [json.loads(line)["correct_strict"] for line in lines]
    for kind in ("mlp", "slot"):
        gained = sum(c and not b for c, b in zip(correct[kind], correct["none"], strict=True))
        lost = sum(b and not c for c, b in zip(correct[kind], correct["none"], strict=True))
        assert (rows[kind]["gained"], rows[kind]["lost"]) == (gained, lost)
        assert rows[kind]["vs_none"] == f"+{gained} / -{lost}"
    assert "vs_none" not in rows["none"]
    assert "| none" in (cmp / "comparison.md").read_text()
    assert (cmp / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as handle:
        yield from csv.DictReader(handle)


def test_shipped_config_validates_and_stays_small():
    config = load_compare_config(REPO / "configs" / "compare_tiny.yaml")
    assert config.run.model.backbone == "embedded" and config.refiners == ["mlp", "slot"] and config.baseline
    assert config.run.training.phase == 1 and config.run.data.dataset == "synthetic"
    # the generated task must be the one the embedded backbone learnt
    backbone = yaml.safe_load((REPO / "configs" / "tiny_backbone.yaml").read_text())["data"]
    task = config.run.data.synthetic
    assert (task.max_steps, task.max_number, task.seed) == (
        backbone["max_steps"],
        backbone["max_number"],
        backbone["seed"],
    )


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="evaluation.n_problem.*did you mean 'n_problems'"):
        load_compare_config(None, ["evaluation.n_problem=3"])
    with pytest.raises(ConfigError, match="refiners"):
        load_compare_config(None, ["refiners=[big]"])
    config = str(REPO / "configs" / "compare_tiny.yaml")
    assert main(["compare", "--config", config, "--set", "run.training.lr=fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llada-trm: error: ") and "run.training.lr" in err and len(err.splitlines()) == 1


def test_table_formats_missing_values():
    table = format_table([{"refiner": "none", "accuracy_strict": 0.5, "skipped_fraction": None}])
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert "0.500" in lines[2] and " - " in lines[2]

