"""kill -9 at random moments, then `--resume`: the run ends bit-identical to an uninterrupted one, and no
checkpoint (`last`, `best`, `step_*`) is ever unreadable.

The training process is a fork of the test process (no interpreter start-up per try); a seeded RNG picks
each kill's delay within what is left of the run (set-up, then the remaining steps at an uninterrupted run's
pace), so kills land in set-up, in training steps, in checkpoint writes and swaps, in snapshot copies and
pruning, and in CSV appends. save_every 1 and keep_last
2 make checkpoint writes a large share of the run.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from tiny_assets import run_config

from llada_trm.build import build_model
from llada_trm.config import fixed_settings, parse_config
from llada_trm.errors import CheckpointError
from llada_trm.run_checkpoint import load_trainer_state, read_weights_file, resolve_checkpoint_dir
from llada_trm.training.loop import run_train
from llada_trm.training.run_dir import has_run

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

KILLS = 6


@pytest.fixture(autouse=True)
def keep_two_snapshots():
    """Snapshots of `last` (the retired `output.keep_last`, reached through its hook; forks inherit it)."""
    with fixed_settings({"output.keep_last": 2}):
        yield


@pytest.fixture(autouse=True)
def log_every_two_steps():
    """`--log-every 2` for these runs (the forked trainers inherit it)."""
    with fixed_settings({"training.log_every": 2}):
        yield


def write_config(tmp_path: Path, backbone_dir: Path, out: Path) -> Path:
    # 24 examples / batch 4 = 6 steps per epoch, 2 epochs; validation every 4 steps ('best' moves), every
    # step saved and snapshotted (keep 2: every save also prunes).
    raw = run_config(backbone_dir, out, batch_size=4, max_steps=12, warmup_steps=2)
    raw["training"].update(eval_every=4, save_every=1)  # a row every 2 steps: `log_every_two_steps`
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(config: Path, out: Path) -> int:
    """Fork a training process: `--resume` when a checkpoint exists, else a new run (`--force`)."""
    try:
        resume = resolve_checkpoint_dir(out)
    except CheckpointError:
        resume = None
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's pytest machinery
        own_tqdm_lock()
        code = 0
        try:
            run_train(config, resume=resume, progress=False, force=resume is None and has_run(out))
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def own_tqdm_lock() -> None:
    """Give a forked child its own tqdm lock. tqdm's default one holds a multiprocessing RLock (a semaphore)
    that every fork of this test process shares once any earlier test has used tqdm here: a sibling killed
    while writing a line holds it for ever, and the next child blocks in its first `tqdm.write`."""
    import tqdm.auto
    import tqdm.std

    for cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        cls.set_lock(threading.RLock())


def assert_readable(out: Path) -> None:
    """Every checkpoint a reader can see loads (an interrupted swap is recovered by the reader itself)."""
    checkpoints = out / "checkpoints"
    names = ["last", "best"] + [p.name for p in checkpoints.glob("step_*")] if checkpoints.is_dir() else []
    for name in names:
        directory = checkpoints / name
        if not directory.exists() and not (checkpoints / f".{name}.old").exists():
            continue
        found = resolve_checkpoint_dir(directory)
        read_weights_file(found / "model.safetensors")
        load_trainer_state(found)


def checkpoint_step(out: Path) -> int:
    try:
        return load_trainer_state(resolve_checkpoint_dir(out))["train_state"]["step"]
    except CheckpointError:
        return 0


def csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows without the throughput column, the one value that depends on time."""
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in csv.DictReader(handle)]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    wa, wb = read_weights_file(a / "model.safetensors"), read_weights_file(b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa, sb = load_trainer_state(a), load_trainer_state(b)
    assert sa["train_state"] == sb["train_state"] and sa["scheduler"] == sb["scheduler"]
    assert sa["health"] == sb["health"] and sa["log_window"] == sb["log_window"]
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and sorted(oa["state"]) == sorted(ob["state"])
    for key in oa["state"]:
        for field, value in oa["state"][key].items():
            assert torch.equal(value, ob["state"][key][field]), (key, field)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])


def test_sigkill_at_random_moments_then_resume_is_bit_identical(backbone_dir, tmp_path):
    raw = yaml.safe_load(write_config(tmp_path, backbone_dir, tmp_path / "warm").read_text())
    build_model(parse_config(raw), device=torch.device("cpu"), dtype=torch.float32)  # imports, once
    reference = tmp_path / "reference"
    started = time.perf_counter()
    pid = start(write_config(tmp_path, backbone_dir, reference), reference)
    setup = None  # until train() starts writing: the part of every try that does no training
    while os.waitpid(pid, os.WNOHANG) == (0, 0) or not setup:
        if setup is None and (reference / "config.yaml").exists():
            setup = time.perf_counter() - started
        time.sleep(0.01)
    duration = time.perf_counter() - started
    training = duration - setup
    total = load_trainer_state(reference / "checkpoints" / "last")["train_state"]["step"]

    rng = random.Random(14)
    kills = runs = 0
    while kills < KILLS:  # a run that finishes before its share of kills is followed by another
        runs += 1
        # Kill times are drawn from the reference run's timing; on a loaded machine a run can outpace them.
        assert runs <= 5, f"only {kills} kills landed in {runs - 1} runs"
        out = tmp_path / f"killed_{runs}"
        config = write_config(tmp_path, backbone_dir, out)
        kills += kill_and_resume(config, out, rng, KILLS - kills, setup=setup, training=training, total=total)
        assert not (out / ".lock").exists()
        strays = [p.name for d in (out, out / "checkpoints") for p in d.glob(".*.tmp")]
        assert not strays, f"temporary files the killed writers left were not swept: {strays}"
        for name in ("last", "best"):
            assert_same_checkpoint(reference / "checkpoints" / name, out / "checkpoints" / name)
        for name in ("training_metrics.csv", "validation_metrics.csv"):
            assert csv_rows(out / name) == csv_rows(reference / name), name
        snapshots = sorted(p.name for p in (reference / "checkpoints").glob("step_*"))
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == snapshots
    print(f"uninterrupted run {duration:.2f} s ({setup:.2f} set-up); {kills} kills in {runs} runs")


def kill_and_resume(
    config: Path, out: Path, rng: random.Random, budget: int, *, setup: float, training: float, total: int
) -> int:
    """Start, kill -9 and resume one run until it finishes (at most `budget` kills); returns the kills.

    Each kill comes at a moment within what is left of the try: its set-up, then its remaining steps at the
    uninterrupted run's pace. Every checkpoint must be readable after every kill.
    """
    kills = 0
    for _ in range(budget + 1):
        pid = start(config, out)
        done, status = 0, 0
        if kills < budget:
            left = training * (total - checkpoint_step(out)) / total
            time.sleep(setup * 0.8 + rng.uniform(0, setup * 0.2 + 0.9 * left))
            done, status = os.waitpid(pid, os.WNOHANG)  # (0, 0) while it runs
            if not done:
                os.kill(pid, signal.SIGKILL)
                kills += 1
        if not done:
            status = os.waitpid(pid, 0)[1]
        assert_readable(out)
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0, "a resumed run failed (its traceback is above)"
            return kills
    raise AssertionError(f"{out}: the run did not finish after {kills} kills")
