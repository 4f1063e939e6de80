"""`llada-trm train --tensorboard` (the retired `output.tensorboard`): the metrics CSVs' rows as TensorBoard
scalars, read back from the event files."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import yaml
from tiny_assets import run_config, tiny_backbone

from llada_trm.config import RunConfig, fixed_settings, parse_config
from llada_trm.errors import ConfigError
from llada_trm.training.loop import Trainer

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files: tag -> [(step, value)] (purged events left out)."""
    accumulator = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags}


def test_event_files_hold_the_csv_series(tmp_path_factory, tmp_path):
    raw = run_config(tiny_backbone(tmp_path_factory), tmp_path / "run", max_steps=4, save_every=2)
    with fixed_settings({"output.tensorboard": True, "output.keep_last": 2}):  # `--tensorboard`, snapshots
        Trainer(parse_config(raw), progress=False).train(max_new_steps=3)
        # Resumed from step 2 although step 3 was logged: its events are purged as its CSV row is dropped.
        snapshot = tmp_path / "run" / "checkpoints" / "step_0000002"
        Trainer(parse_config(raw), progress=False).resume(snapshot).train()
    series = scalars(tmp_path / "run")
    train = read_csv(tmp_path / "run" / "training_metrics.csv")
    validation = read_csv(tmp_path / "run" / "validation_metrics.csv")
    # the training rows (the slot refiner's norms and gates among them) and the validation rows, tag by tag
    for prefix, rows in (("train", train), ("validation", validation)):
        columns = [c for c in rows[-1] if c != "step" and rows[-1][c] not in ("", "nan")]
        assert {"loss", "epoch"} <= set(columns)
        for column in columns:
            expected = [(int(r["step"]), float(r[column])) for r in rows if r[column] not in ("", "nan")]
            got = series[f"{prefix}/{column}"]
            assert [s for s, _ in got] == [s for s, _ in expected], column  # the resume duplicated nothing
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5), column
    assert {"train/slot_norm_ctx", "train/gate_ctx", "train/grad_norm", "validation/accuracy"} <= set(series)


def test_off_by_default_and_missing_package(tmp_path_factory, tmp_path, monkeypatch):
    raw = run_config(tiny_backbone(tmp_path_factory), tmp_path / "plain", max_steps=1)
    Trainer(parse_config(raw), progress=False).train()
    assert not (tmp_path / "plain" / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    with fixed_settings({"output.tensorboard": True}):
        with pytest.raises(ConfigError, match=r"--tensorboard: .*pip install 'llada-trm\[tensorboard\]'"):
            Trainer(parse_config(raw), progress=False)


def test_the_train_command_turns_it_on_for_its_run_only(tmp_path_factory, tmp_path):
    from llada_trm.cli import main

    raw = run_config(tiny_backbone(tmp_path_factory), tmp_path / "run", max_steps=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path), "--tensorboard", "--no-progress"]) == 0
    assert scalars(tmp_path / "run")["train/loss"]
    assert RunConfig().output.tensorboard is False  # restored after the command
