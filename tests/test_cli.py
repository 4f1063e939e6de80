"""The `llada-trm` command line: every subcommand's happy path and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_assets import TINY_SAMPLING, run_config

from llada_trm.cli import main

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")
SAMPLING = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_SAMPLING.items()]


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and exactly one stderr line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llada-trm: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_help_is_fast_and_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "llada_trm", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    for command in ("pretrain", "train", "eval", "generate", "plot", "compare"):
        assert command in result.stdout
    # the parser alone must not pull in torch: `--help` stays instant
    probe = "import sys, llada_trm.cli as c; c.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_train_reports_and_bad_config_key_is_one_line(backbone_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(backbone_dir, tmp_path / "out", refiner="mlp")))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "val loss" in out
    assert (tmp_path / "out" / "checkpoints" / "last" / "model.safetensors").is_file()

    line = error_line(capsys, ["train", "--config", str(config), "--set", "training.learnig_rate=1"])
    assert "training.learnig_rate" in line and "did you mean 'lr'" in line
    line = error_line(capsys, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert "config file not found" in line


def test_eval_on_a_run_checkpoint_writes_results(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run_dir), "--limit", "2", "--out", str(out), "--no-progress"]
    argv += SAMPLING
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "synthetic test (2 problems, refiner slot): accuracy strict" in printed
    assert "steps per refined chunk" in printed and "tokens/s" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["model"]["refiner"] == "slot"
    assert summary["sampling"]["gen_length"] == TINY_SAMPLING["gen_length"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    # the confident-error diagnostics: in the summary, printed, and skipped with --no-diagnostics
    diagnostics = summary["diagnostics"]
    assert diagnostics["recorded"] == 2 and diagnostics["commits"]["refined"] is not None
    assert "| first error committed at p >= 0.9 |" in printed and "| | slot |" in printed
    assert main([*argv, "--no-diagnostics"]) == 0
    assert "first error committed" not in capsys.readouterr().out
    assert "diagnostics" not in json.loads((out / "summary.json").read_text())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert all("commits" not in json.loads(line) for line in lines)


def test_eval_at_another_test_time_depth(run_dir, tmp_path, capsys):
    # --refine-steps K runs K refinement steps per model call whatever K the refiner trained with
    for k in (1, 5):
        out = tmp_path / f"k{k}"
        argv = ["eval", "--checkpoint", str(run_dir), "--limit", "2", "--out", str(out), "--no-progress"]
        assert main([*argv, *SAMPLING, "--refine-steps", str(k), "--no-diagnostics"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["refine_steps"] == k
        assert 0 < summary["refinement"]["mean_refine_steps"] <= k
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run_dir), "--refiner", "none", "--refine-steps", "2"]
    line = error_line(capsys, argv)
    assert "--refine-steps" in line


def test_eval_defaults_to_the_run_directory(run_dir, capsys):
    argv = ["eval", "--checkpoint", str(run_dir), "--refiner", "none", "--limit", "1", "--no-progress"]
    assert main([*argv, *SAMPLING]) == 0
    capsys.readouterr()
    assert (run_dir / "eval" / "synthetic-test_0-1-none" / "summary.json").is_file()  # the slice: --limit 1


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="GSM8K test file not present")
def test_eval_on_the_real_gsm8k_test_file(backbone_dir, tmp_path, capsys):
    argv = ["eval", "--checkpoint", str(backbone_dir), "--dataset", "gsm8k", "--split", "test"]
    argv += ["--limit", "2", "--data-path", str(GSM8K_TEST), "--out", str(tmp_path), "--no-progress"]
    argv += SAMPLING
    assert main(argv) == 0
    assert "gsm8k test (2 problems, refiner none)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["reference_answer"] for row in rows)


def test_eval_errors_are_one_line(backbone_dir, run_dir, tmp_path, capsys):
    line = error_line(capsys, ["eval", "--checkpoint", str(tmp_path / "missing")])
    assert "no such checkpoint" in line
    line = error_line(capsys, ["eval", "--checkpoint", str(backbone_dir), "--dataset", "gsm8k"])
    assert "needs --data-path" in line
    line = error_line(capsys, ["eval", "--checkpoint", str(backbone_dir), "--gen-length", "100"])
    assert "multiple of block_length" in line
    line = error_line(capsys, ["eval", "--checkpoint", str(run_dir), "--refiner", "mlp"])
    assert "--refiner mlp cannot run" in line
    missing_data = ["eval", "--checkpoint", str(backbone_dir), "--dataset", "gsm8k"]
    missing_data += ["--data-path", "nope.jsonl"]
    assert "no such file" in error_line(capsys, missing_data)


def test_debug_shows_the_traceback(tmp_path):
    from llada_trm.errors import CheckpointError

    with pytest.raises(CheckpointError):
        main(["eval", "--debug", "--checkpoint", str(tmp_path / "missing")])


def test_generate_prints_an_answer(run_dir, capsys):
    question = "Tom has 3 apples. Tom buys 4 more apples. How many apples does Tom have now?"
    assert main(["generate", "--checkpoint", str(run_dir), question, "-v", *SAMPLING]) == 0
    out = capsys.readouterr().out
    details = json.loads(out[out.index("{") :])
    assert set(details) == {"answer", "refinement", "speed"}
    assert details["speed"]["generated_tokens"] == TINY_SAMPLING["gen_length"]
    assert error_line(capsys, ["generate", "--checkpoint", str(run_dir), "  "]).endswith("quoted argument")


def test_plot_writes_pngs_and_rejects_a_dir_without_metrics(tmp_path, capsys):
    (tmp_path / "training_metrics.csv").write_text("step,loss,gate_ctx\n1,2.0,0.5\n2,1.5,0.6\n")
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["gates.png", "loss.png"]
    assert all(Path(p).is_file() for p in printed)
    assert "no training_metrics.csv" in error_line(capsys, ["plot", str(tmp_path / "plots")])


def test_pretrain_runs_and_validates_its_config(tmp_path, capsys):
    overrides = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.mlp_hidden_size=64"]
    overrides += ["data.n_train=60", "data.n_eval=4", "data.vocab_size=300", "training.steps=2"]
    overrides += ["training.batch_size=4", "training.eval_every=0", "evaluation.n_problems=1"]
    overrides += ["evaluation.n_test=1"]
    overrides += ["evaluation.gen_length=8", "evaluation.block_length=8", "evaluation.steps=2"]
    overrides += [f"output.dir={tmp_path / 'backbone'}"]
    argv = ["pretrain", "--no-progress"] + [arg for o in overrides for arg in ("--set", o)]
    assert main(argv) == 0
    assert "saved" in capsys.readouterr().out
    assert (tmp_path / "backbone" / "config.json").is_file()
    line = error_line(capsys, ["pretrain", "--set", "model.d_modle=8"])
    assert "model.d_modle" in line and "d_model" in line
