"""Eval output names carry the split slice; the lm-eval backend inherits a trained run's sampling settings."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_assets import tiny_run

from llada_trm import cli
from llada_trm.cli import main, split_label
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.evaluate import loading
from llada_trm.evaluate.loading import resolve_sampling

TINY = ["--gen-length=16", "--block-length=8", "--steps=4", "--no-progress"]
RUN_SAMPLING = {"steps": 8, "gen_length": 16, "block_length": 8, "threshold": 0.9, "cache": "prefix"}


@pytest.mark.parametrize(
    ("split", "limit", "label"),
    [
        ("test", None, "test"),
        ("test", 50, "test_0-50"),
        ("test[:200]", None, "test_0-200"),
        ("test[:200]", 50, "test_0-50"),
        ("test[100:300]", 50, "test_100-150"),
        ("test[100:]", None, "test_100-end"),
        ("test[100:]", 20, "test_100-120"),
        ("test[-200:]", None, "test_-200-end"),
        ("test[-200:]", 10, "test_-200-end-first10"),
        ("train[:10%]", None, "train_0-10pct"),
        ("train[:10%]", 5, "train_0-10pct-first5"),
    ],
)
def test_split_labels_name_the_slice(split: str, limit: int | None, label: str):
    assert split_label(split, limit) == label


def test_evals_of_two_slices_do_not_overwrite_each_other(tmp_path_factory, capsys):
    run = tiny_run(tmp_path_factory)
    base = ["eval", "--checkpoint", str(run), "--refiner", "none", *TINY]
    assert main([*base, "--split", "test[:1]"]) == 0
    assert main([*base, "--split", "test[1:3]"]) == 0
    capsys.readouterr()
    first, second = run / "eval" / "synthetic-test_0-1-none", run / "eval" / "synthetic-test_1-3-none"
    assert len((first / "predictions.jsonl").read_text().splitlines()) == 1
    assert len((second / "predictions.jsonl").read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def sampling_run(tmp_path_factory) -> Path:
    """A copy of the tiny run whose config has a `sampling:` section that is not the defaults."""
    checkpoint = tmp_path_factory.mktemp("sampling_run") / "last"
    shutil.copytree(tiny_run(tmp_path_factory) / "checkpoints" / "last", checkpoint)
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["sampling"] = dict(RUN_SAMPLING)
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    return checkpoint


def test_resolve_sampling_keeps_the_runs_settings_unless_given(sampling_run):
    options = resolve_sampling(sampling_run, {"steps": None, "gen_length": 32, "threshold": "off"})
    assert (options.steps, options.gen_length, options.block_length) == (8, 32, 8)
    assert options.threshold is None and options.cache == "prefix"
    assert resolve_sampling("embedded", {}) == SamplingOptions()


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")
def test_the_cli_and_the_loader_agree_on_the_word_that_switches_a_setting_off():
    assert cli.OFF == loading.OFF == "off"  # the parser stays light, so it spells the word itself


def test_the_harness_inherits_the_runs_sampling_section(sampling_run):
    from llada_trm.extras.harness.model import LLaDATRMLM

    inherited = LLaDATRMLM(checkpoint=str(sampling_run), device="cpu", batch_size=2)
    expected = {**SamplingOptions().to_dict(), **RUN_SAMPLING, "batch_size": 2}
    assert inherited.options.to_dict() == expected
    kwargs = {"device": "cpu", "batch_size": 2}
    overridden = LLaDATRMLM(checkpoint=str(sampling_run), steps=16, threshold=None, **kwargs).options
    assert (overridden.steps, overridden.threshold, overridden.cache) == (16, None, "prefix")
    assert LLaDATRMLM(checkpoint="embedded", **kwargs).options == SamplingOptions(batch_size=2)
