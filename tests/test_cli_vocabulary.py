"""One CLI vocabulary: `--out` for what a command writes, `--resume [DIR]`, `--device` wherever a model runs;
the old spellings still work for one release, each with a one-line warning."""

from __future__ import annotations

import argparse

import pytest
import yaml
from tiny_assets import run_config, tiny_run

from llada_trm.cli import build_parser, main

WRITERS = ("pretrain", "train", "eval", "generate", "export", "plot", "compare")
MODEL_RUNNERS = ("train", "cache", "eval", "generate", "compare")
RESUMERS = ("pretrain", "train", "compare")


def _options(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {option: action for action in sub._actions for option in action.option_strings}


@pytest.mark.parametrize("command", WRITERS)
def test_every_command_that_writes_takes_out(command):
    assert "--out" in _options(command)


@pytest.mark.parametrize("command", MODEL_RUNNERS)
def test_every_command_that_runs_a_model_takes_device(command):
    assert "--device" in _options(command)


@pytest.mark.parametrize("command", RESUMERS)
def test_resume_takes_an_optional_directory(command):
    config = [] if command == "pretrain" else ["--config", "x.yaml"]
    parser = build_parser()
    assert parser.parse_args([command, *config, "--resume"]).resume is True
    assert parser.parse_args([command, *config, "--resume", "runs/a"]).resume == "runs/a"
    assert parser.parse_args([command, *config]).resume is None


def test_train_out_device_and_resume_without_a_directory(backbone_dir, tmp_path, capsys):
    """`--out DIR --device cpu` trains into DIR; `--resume` alone continues the run in that output.dir."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(backbone_dir, tmp_path / "unused")))
    out = tmp_path / "elsewhere"
    argv = ["train", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert (out / "checkpoints" / "last").is_dir() and not (tmp_path / "unused").exists()
    assert "device cpu" in capsys.readouterr().out
    assert main([*argv, "--resume"]) == 0
    assert "nothing to do: the run finished at step 2" in capsys.readouterr().out


def test_compare_refuses_out_and_resume_naming_two_directories(tmp_path, capsys):
    config = tmp_path / "compare.yaml"
    config.write_text("{}\n")
    assert main(["compare", "--config", str(config), "--out", "a", "--resume", "b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name different directories" in err[0]


def test_old_spellings_still_work_with_one_warning(tmp_path_factory, tmp_path, capsys):
    """`export RUN OUT` (positional) and `pretrain --output DIR` work this release, each warned once."""
    run = tiny_run(tmp_path_factory)
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [line for line in err if "deprecated" in line] and len(err) == 1, err
    assert "use --out" in err[0] and (tmp_path / "exported" / "config.json").is_file()
    assert build_parser().parse_args(["pretrain", "--output", "runs/x"]).out == "runs/x"
    err = capsys.readouterr().err
    assert err.count("llada-trm: warning: --output is deprecated, use --out") == 1
    assert main(["export", str(run)]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_resume_dir_names_the_output_directory():
    """`pretrain --resume DIR` (or its DIR.partial) and `compare --resume DIR` continue the run in DIR."""
    from llada_trm.cli import _output_overrides, _pretrain_resume

    def args(**given):
        return argparse.Namespace(**{"set": ["a.b=1"], "out": None, "resume": None, "device": None, **given})

    assert _output_overrides(args(resume="runs/bb.partial"), resume_dir=_pretrain_resume) == [
        "a.b=1", "output.dir=runs/bb"
    ]
    assert _output_overrides(args(resume=True)) == ["a.b=1"]  # no DIR: the config's own output.dir
    assert _output_overrides(args(out="runs/x", resume="runs/x/", device="cpu")) == [
        "a.b=1", "output.dir=runs/x"
    ]  # --device is a flag of the command, not a --set (`cli._run_flags`)
