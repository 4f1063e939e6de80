"""Nothing lost, nothing silent (issue 14): honest resume, strict loading, one run per directory, the lock,
crash-safe metrics and snapshots."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_assets import run_config, tiny_run

from llada_trm.cli import main
from llada_trm.config import parse_config
from llada_trm.errors import CheckpointError
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.run_checkpoint import TENSORS_KEY, resolve_checkpoint_dir, save_checkpoint
from llada_trm.training.loop import Trainer, run_train
from llada_trm.training.metrics import MetricsWriter


def run_dir():
    """The module under test, imported in each test (so that each fails on its own without it)."""
    from llada_trm.training import run_dir

    return run_dir


def trainer(
    backbone_dir: Path, out: Path, *, model: dict | None = None, advanced: dict | None = None, **training
) -> Trainer:
    raw = run_config(backbone_dir, out, **training)
    raw["model"].update(model or {})
    raw["advanced"] = advanced or {}
    return Trainer(parse_config(raw), progress=False)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ resume


def test_a_changed_lr_applies_from_the_resumed_step(backbone_dir, tmp_path, caplog):
    settings = {"max_steps": 6, "eval_every": 0, "warmup_steps": 1, "batch_size": 4}
    straight = trainer(backbone_dir, tmp_path / "straight", **settings)
    straight.train()
    trainer(backbone_dir, tmp_path / "split", **settings).train(max_new_steps=3)
    resumed = trainer(backbone_dir, tmp_path / "split", **{**settings, "lr": 3e-2})  # 10x
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        resumed.resume(tmp_path / "split")
    assert "training.lr (0.003 -> 0.03)" in caplog.text
    assert [g["initial_lr"] for g in resumed.optimizer.param_groups] == [3e-2] * len(
        resumed.optimizer.param_groups
    )
    resumed.train()
    a, b = (
        rows(tmp_path / "straight" / "training_metrics.csv"),
        rows(tmp_path / "split" / "training_metrics.csv"),
    )
    assert [r["step"] for r in a] == [r["step"] for r in b] == [str(s) for s in range(1, 7)]
    assert [r["lr"] for r in a[:3]] == [r["lr"] for r in b[:3]]  # before the resume: the same run
    for before, after in zip(a[3:], b[3:], strict=True):  # after it: the new lr, on the same schedule
        assert float(after["lr"]) == pytest.approx(10 * float(before["lr"]), rel=1e-5)


def test_settings_that_change_the_run_refuse_on_resume_in_one_line(backbone_dir, tmp_path):
    trainer(backbone_dir, tmp_path / "run", max_steps=2, eval_every=0).train()
    other = trainer(
        backbone_dir,
        tmp_path / "run",
        max_steps=2,
        eval_every=0,
        seed=1,
        model={"max_recursive_steps": 3, "slot": {"n_heads": 4, "n_blocks": 1}},
    )
    with pytest.raises(CheckpointError) as info:
        other.resume(tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and "3 settings cannot change on resume" in message
    for key in (
        "model.max_recursive_steps (2 -> 3)",
        "model.slot.n_heads (2 -> 4)",
        "training.seed (0 -> 1)",
    ):
        assert key in message
    assert "--set them back" in message and "new run" in message


def test_resuming_a_finished_run_writes_nothing_and_a_raised_max_steps_continues(backbone_dir, tmp_path):
    out = tmp_path / "run"
    trainer(backbone_dir, out, max_steps=2, eval_every=1, batch_size=4).train()
    before = {name: (out / name).read_bytes() for name in ("training_metrics.csv", "validation_metrics.csv")}
    again = trainer(backbone_dir, out, max_steps=2, eval_every=1, batch_size=4).resume(out)
    summary = again.train()
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name  # no duplicate rows
    assert summary["already_finished"] and summary["steps"] == 2
    longer = trainer(backbone_dir, out, max_steps=4, eval_every=1, batch_size=4).resume(out)
    assert longer.train()["steps"] == 4
    assert [r["step"] for r in rows(out / "validation_metrics.csv")] == ["1", "2", "3", "4"]
    assert [r["step"] for r in rows(out / "training_metrics.csv")] == ["1", "2", "3", "4"]


def test_health_windows_survive_a_resume(backbone_dir, tmp_path, monkeypatch):
    # threshold 0.9 on a random backbone: every chunk is refined, so 'low_confidence' builds a streak
    from llada_trm.training import health

    short = health.HealthThresholds(window=3)  # the checks' constants, with a window a short run fills
    monkeypatch.setattr(health, "HealthThresholds", lambda: short)
    kwargs = {
        "batch_size": 4,
        "max_steps": 6,
        "eval_every": 0,
        "model": {"confidence_threshold": 0.9},
    }
    straight = trainer(backbone_dir, tmp_path / "straight", **kwargs).train()
    assert any("'low_confidence' at step 3" in w for w in straight["health_warnings"])
    trainer(backbone_dir, tmp_path / "split", **kwargs).train(max_new_steps=2)
    resumed = trainer(backbone_dir, tmp_path / "split", **kwargs).resume(tmp_path / "split").train()
    assert resumed["health_warnings"] == straight["health_warnings"]


# ------------------------------------------------------------------------------------------ strict loading


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory) / "checkpoints" / "last"


def damaged(trained: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "run" / "checkpoints" / "last"
    shutil.copytree(trained, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    save_file(change(tensors), str(copy / "model.safetensors"))
    return copy


@pytest.mark.parametrize("kept", [0, 1])
def test_eval_refuses_a_checkpoint_without_its_refiner(trained, tmp_path, kept):
    copy = damaged(trained, tmp_path, lambda t: dict(sorted(t.items())[:kept]))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(copy, device="cpu")
    message = str(info.value)
    total = len(load_file(str(trained / "model.safetensors")))
    assert (
        str(copy / "model.safetensors") in message
        and f"lacks {total - kept} of the {total} tensors" in message
    )
    assert "refinement_head.slot." in message and "more)" in message


def test_every_loader_refuses_nan_and_integer_weights(trained, backbone_dir, tmp_path):
    def poison(tensors):
        name = sorted(tensors)[-1]
        return {**tensors, name: torch.full_like(tensors[name], float("nan"))}

    copy = damaged(trained, tmp_path, poison)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: 1 tensors hold NaN or inf values \(refinement"
    ):
        load_checkpoint(copy, device="cpu")
    fresh = trainer(backbone_dir, tmp_path / "run", max_steps=2)
    with pytest.raises(CheckpointError, match="hold NaN or inf"):
        fresh.resume(copy)
    with pytest.raises(CheckpointError, match="training.init_from: .*hold NaN or inf"):
        trainer(backbone_dir, tmp_path / "other", init_from=str(copy))

    (tmp_path / "int").mkdir()
    copy = damaged(trained, tmp_path / "int", lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    with pytest.raises(CheckpointError, match="tensors are not floating point where the model's are"):
        load_checkpoint(copy, device="cpu")


def test_eval_expects_the_backbone_tensors_a_checkpoint_records(trained, tmp_path):
    """What a phase-2/3 checkpoint trained of the backbone is read from its record, not from a freezing plan:
    a recorded backbone tensor the file no longer holds is refused, not left at the pretrained value."""
    copy = tmp_path / "run" / "checkpoints" / "last"
    shutil.copytree(trained, copy)
    path = copy / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    lost = "backbone.blocks.1.ff_out.weight"
    metadata[TENSORS_KEY] = json.dumps(sorted([*json.loads(metadata[TENSORS_KEY]), lost]))
    save_file(load_file(str(path)), str(path), metadata=metadata)
    expected = rf"model.safetensors: lacks 1 of the \d+ tensors it records \({lost}\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(copy, device="cpu")


def test_init_from_requires_the_whole_refiner(trained, backbone_dir, tmp_path):
    copy = damaged(trained, tmp_path, lambda t: dict(sorted(t.items())[:1]))
    with pytest.raises(CheckpointError, match="training.init_from: .*model.safetensors: lacks"):
        trainer(backbone_dir, tmp_path / "new", init_from=str(copy))


# ------------------------------------------------------------------------------------------ run directories


def write_config(path: Path, backbone_dir: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump(run_config(backbone_dir, out, max_steps=1, eval_every=0)))
    return path


def test_a_new_run_into_a_used_directory_refuses_and_force_archives_it(backbone_dir, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", backbone_dir, out)
    run_train(config, progress=False)
    before = (out / "training_metrics.csv").read_bytes()
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already holds a run" in error
    assert f"--resume {out}" in error and "--force" in error
    assert (out / "training_metrics.csv").read_bytes() == before  # untouched

    assert main(["train", "--config", str(config), "--no-progress", "--force"]) == 0
    archived = list(tmp_path.glob("run.old-*"))
    assert len(archived) == 1 and (archived[0] / "training_metrics.csv").read_bytes() == before
    assert (archived[0] / "checkpoints" / "last" / "model.safetensors").is_file()
    assert main(["train", "--config", str(config), "--resume", str(out), "--force"]) == 2


def test_a_resume_from_elsewhere_into_a_used_directory_refuses(backbone_dir, tmp_path):
    trainer(backbone_dir, tmp_path / "a", max_steps=1, eval_every=0).train()
    trainer(backbone_dir, tmp_path / "b", max_steps=1, eval_every=0).train()
    with pytest.raises(ValueError, match="holds another run than"):
        trainer(backbone_dir, tmp_path / "b", max_steps=2, eval_every=0).resume(tmp_path / "a").train()


def test_compare_directories_follow_the_same_rule(tmp_path):
    out = tmp_path / "cmp"
    (out / "mlp").mkdir(parents=True)
    assert run_dir().claim_compare_dir(out, [out / "mlp", out / "slot"]) is None  # nothing there yet
    (out / "mlp" / "config.yaml").write_text("x: 1\n")
    with pytest.raises(ValueError, match="already holds a comparison.*--force"):
        run_dir().claim_compare_dir(out, [out / "mlp", out / "slot"])
    archived = run_dir().claim_compare_dir(out, [out / "mlp", out / "slot"], force=True)
    assert archived is not None and (archived / "mlp" / "config.yaml").is_file() and not out.exists()
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "compare --config configs/compare_tiny.yaml --force" in makefile  # `make run` twice works


# ------------------------------------------------------------------------------------------------- lock


def test_a_live_lock_stops_a_second_run_at_once(backbone_dir, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        host = socket.gethostname()
        (out / ".lock").write_text(f'{{"pid": {other.pid}, "host": "{host}", "started": "earlier"}}\n')
        with pytest.raises(ValueError, match=rf"another run \(pid {other.pid} on this host, started earlier"):
            trainer(backbone_dir, out, max_steps=1, eval_every=0).train()
        assert not (out / "training_metrics.csv").exists()
        assert (out / ".lock").read_text().count(str(other.pid)) == 1  # the other run's lock stays
        (out / "config.yaml").write_text("x: 1\n")
        with pytest.raises(ValueError, match=f"pid {other.pid}"):
            run_dir().claim_run_dir(out, force=True)
        assert out.exists()  # --force does not archive a directory a live process writes into
        with pytest.raises(ValueError, match=f"pid {other.pid}"):
            run_dir().RunLock(out).acquire()
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(backbone_dir, tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f'{{"pid": {gone.pid}, "host": "{socket.gethostname()}"}}\n')
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        trainer(backbone_dir, out, max_steps=1, eval_every=0).train()
    assert f"taking over the stale lock of pid {gone.pid}" in caplog.text
    assert not (out / ".lock").exists()  # released when the run ended


# ------------------------------------------------------------------------------------ crash-safe outputs


def test_a_torn_last_csv_row_is_dropped(tmp_path):
    path = tmp_path / "m.csv"
    writer = MetricsWriter(path, ["step", "loss"])
    writer.log({"step": 1, "loss": 0.5})
    with open(path, "a") as handle:
        handle.write("2,0.4")  # a power cut in the middle of a row
    writer = MetricsWriter(path, ["step", "loss"])
    assert writer.read() == [{"step": "1", "loss": "0.5"}]
    writer.log({"step": 2, "loss": 0.25})
    assert rows(path) == [{"step": "1", "loss": "0.5"}, {"step": "2", "loss": "0.25"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]  # no temporary file left


def test_a_crash_while_pruning_never_leaves_a_half_deleted_snapshot(tmp_path, monkeypatch):
    from llada_trm.run_checkpoint import prune_snapshots

    checkpoints = tmp_path / "checkpoints"
    weights = {"refinement_head.w": torch.ones(2)}
    for step in (1, 2, 3):
        save_checkpoint(
            checkpoints / f"step_{step:07d}", weights=weights, trainer_state={}, config_yaml="a: 1\n"
        )
    real = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes one file, then the process dies
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_snapshots(checkpoints, keep=1)
    monkeypatch.setattr(shutil, "rmtree", real)
    for directory in checkpoints.glob("step_*"):
        resolve_checkpoint_dir(directory)  # every visible snapshot is complete
    prune_snapshots(checkpoints, keep=1)  # the next prune finishes the job and sweeps the leftovers
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000003"]
