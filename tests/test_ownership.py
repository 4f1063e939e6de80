"""A command deletes or replaces only what it made (issue 28, part A): ownership markers checked before any
deletion, `--force` archives everywhere, readers never rename a live run's files, a run killed before its
first checkpoint is restarted as the error says, killed writers' temporary files are swept, and files get
the umask's permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_assets import run_config
from tiny_assets import tiny_pretrain as tiny

from llada_trm.cli import main
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.extras.pretraining.run import pretrain
from llada_trm.io import atomic_directory, atomic_path, write_text_atomic
from llada_trm.run_checkpoint import load_trainer_state, resolve_checkpoint_dir, save_checkpoint
from llada_trm.training.loop import Trainer
from llada_trm.training.run_dir import RunLock


def precious(directory: Path) -> dict[str, bytes]:
    """A folder a user made (not a run, not a cache), and what it holds."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("years of work")
    (directory / "notes").mkdir(exist_ok=True)
    (directory / "notes" / "a.txt").write_text("mine")
    return snapshot(directory)


def snapshot(directory: Path) -> dict[str, bytes]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)  # fmt: skip
    return int(child.stdout)


def killed_writers_file(path: Path) -> Path:
    """A temporary file as `io.atomic_path` names it, left by a writer that was killed."""
    from llada_trm.io import temporary_name

    name = temporary_name(path).name.split("-")
    name[1] = str(dead_pid())  # .<name>.<host>-<pid>-<random>.tmp
    stray = path.parent / "-".join(name)
    stray.write_bytes(b"half a shard")
    return stray


# ------------------------------------------------------------------------------ 1. nothing it did not make


def test_pretrain_never_deletes_a_checkpoint_dir_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "home"
    before = precious(mine)
    for force in (False, True):
        with pytest.raises(ConfigError, match=r"home is not empty and holds no run"):
            pretrain(tiny(tmp_path / "out", f"training.checkpoint_dir={mine}"), progress=False, force=force)
        assert snapshot(mine) == before
    argv = ["pretrain", "--no-progress", "--out", str(tmp_path / "out"), "--set",
            f"training.checkpoint_dir={mine}", "--force"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and "new or empty directory" in err[0]
    assert snapshot(mine) == before and not (tmp_path / "out").exists()


def test_pretrain_holds_its_run_directory_while_it_writes(tmp_path):
    from llada_trm.training.run_dir import RunDirError

    partial = tmp_path / "out.partial"
    with RunLock(partial):  # a live pretrain writing there
        with pytest.raises(RunDirError, match=r"another run \(pid \d+ on this host"):
            pretrain(tiny(tmp_path / "out"), progress=False, resume=True)
        with pytest.raises(RunDirError, match="another run"):
            pretrain(tiny(tmp_path / "out"), progress=False, force=True)
    assert not (tmp_path / "out").exists() and not any(tmp_path.glob("out.partial.old-*"))


def test_cache_rebuild_never_deletes_a_folder_that_is_not_a_cache(backbone_dir, tmp_path, capsys):
    # the cache's folder is fixed under output.dir (issue 25); a user's folder of that name is not a cache
    mine = tmp_path / "run" / "feature_cache"
    before = precious(mine)
    raw = run_config(backbone_dir, tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = ["cache", "--config", str(config), "--no-progress", "--rebuild"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and "output.dir" in err[0]
    assert snapshot(mine) == before


def test_cache_rebuild_keeps_a_cache_holding_anything_else(tmp_path):
    from llada_trm.training.feature_cache import remove_store

    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = {"format_version": 1, "backbone": {}, "data": {}, "noise": {}, "features": {}}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "shard_00000.safetensors").write_bytes(b"x")
    (cache / "results.csv").write_text("a user's file")
    with pytest.raises(ConfigError, match=r"holds results\.csv, which the feature cache did not write"):
        remove_store(cache)
    assert (cache / "results.csv").is_file() and (cache / "shard_00000.safetensors").is_file()
    (cache / "results.csv").unlink()
    assert remove_store(cache) and not cache.exists()  # only the store's own files: deleted whole


# ------------------------------------------------------------------------------------ 2. --force archives


def interrupted_pretrain(out: Path, monkeypatch) -> None:
    """A pretraining run killed in step 6 (its checkpoint from step 3 in OUT.partial)."""
    step = Trainer.train_step
    calls = []

    def killed_in_step_six(self, batches):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", killed_in_step_six)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(out), progress=False)
    monkeypatch.setattr(Trainer, "train_step", step)


def test_pretrain_force_archives_the_backbone_and_the_unfinished_run(tmp_path, monkeypatch):
    out = tmp_path / "backbone"
    interrupted_pretrain(out, monkeypatch)
    partial = snapshot(tmp_path / "backbone.partial")
    pretrain(tiny(out, "training.steps=2", f"training.checkpoint_dir={tmp_path / 'other'}"), progress=False)
    backbone = snapshot(out)
    assert "checkpoints/last/model.safetensors" in partial

    result = pretrain(tiny(out, "training.steps=2"), progress=False, force=True)
    assert result.steps == 2 and not (tmp_path / "backbone.partial").exists()
    old_runs = list(tmp_path.glob("backbone.partial.old-*"))
    old_backbones = list(tmp_path.glob("backbone.old-*"))
    assert len(old_runs) == 1 and len(old_backbones) == 1  # renamed, never deleted
    assert {k: v for k, v in snapshot(old_runs[0]).items() if k != ".lock"} == partial
    assert snapshot(old_backbones[0]) == backbone


# ----------------------------------------------------------------------------- 3. readers never rename


def test_a_reader_never_renames_a_live_runs_checkpoint(tmp_path):
    """The trainer's save moves `last` aside, then renames the new one in; a reader in between must read
    the aside copy where it is, or the trainer's second rename fails."""
    checkpoints = tmp_path / "run" / "checkpoints"
    weights = {"refinement_head.w": torch.ones(2)}
    save_checkpoint(checkpoints / "last", weights=weights, trainer_state={"train_state": {"step": 1}},
                    config_yaml="{}\n")  # fmt: skip
    staged = save_checkpoint(checkpoints / ".staged", weights=weights, trainer_state={"train_state":
                             {"step": 2}}, config_yaml="{}\n")  # fmt: skip
    with RunLock(tmp_path / "run"):  # the live trainer
        os.replace(checkpoints / "last", checkpoints / ".last.old")  # its first rename
        found = resolve_checkpoint_dir(tmp_path / "run")  # a reader (eval, export, plot) comes by
        assert found == checkpoints / ".last.old"
        assert load_trainer_state(found)["train_state"]["step"] == 1
        assert not (checkpoints / "last").exists()  # nothing renamed
        os.replace(staged, checkpoints / "last")  # the trainer's second rename goes through
    assert load_trainer_state(resolve_checkpoint_dir(tmp_path / "run"))["train_state"]["step"] == 2


def test_repairs_happen_under_the_lock(tmp_path):
    from llada_trm.io import temporary_name
    from llada_trm.training.run_dir import repair_run_dir

    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    save_checkpoint(checkpoints / ".last.old", weights={"w": torch.ones(1)}, trainer_state={},
                    config_yaml="{}\n")  # fmt: skip
    stray = killed_writers_file(run / "training_metrics.csv")
    staged = killed_writers_file(checkpoints / "last")
    live = temporary_name(run / "config.yaml")  # this process's: a live writer's
    live.write_text("being written")
    user = run / ".notes.tmp"
    user.write_text("not ours")
    repair_run_dir(run)
    assert (checkpoints / "last" / "model.safetensors").is_file() and not (checkpoints / ".last.old").exists()
    assert not stray.exists() and not staged.exists()
    assert live.exists() and user.exists()


# ------------------------------------------------------------------------------------------ 4. friction


def test_a_train_killed_before_its_first_checkpoint_resumes_as_the_error_says(backbone_dir, tmp_path, capsys):
    out = tmp_path / "run"
    raw = run_config(backbone_dir, out, max_steps=2, eval_every=0)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    # what kill -9 during the first steps leaves: the config, a logged row, a half-written temporary file
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    (out / "training_metrics.csv").write_text("step,loss\n1,9.0\n")
    stray = killed_writers_file(out / "training_metrics.csv")
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "stopped before its first checkpoint" in error
    assert f"--resume {out}" in error
    assert main(["train", "--config", str(config), "--no-progress", "--resume", str(out)]) == 0
    assert "starting it again from step 0" in capsys.readouterr().out
    assert load_trainer_state(out / "checkpoints" / "last")["train_state"]["step"] == 2
    assert not stray.exists()  # swept under the run's lock


def test_only_its_own_run_restarts_from_scratch(tmp_path):
    from llada_trm.training.run_dir import restarts_from_scratch

    killed, other = tmp_path / "killed", tmp_path / "other"
    killed.mkdir()
    (killed / "config.yaml").write_text("{}\n")
    assert restarts_from_scratch(killed, killed)
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint, so there is nothing"):
        restarts_from_scratch(killed, other)  # resuming it into another output.dir
    save_checkpoint(killed / "checkpoints" / "last", weights={"w": torch.ones(1)}, trainer_state={},
                    config_yaml="{}\n")  # fmt: skip
    assert not restarts_from_scratch(killed, killed)  # a checkpoint: a real resume
    assert not restarts_from_scratch(tmp_path / "missing", tmp_path / "missing")  # the reader's error


def test_a_pretrain_killed_before_its_first_checkpoint_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "backbone"

    def killed(*_args, **_kwargs):
        raise SystemExit("killed (simulated)")

    monkeypatch.setattr(Trainer, "_save", killed)  # dies at its first save, after logging rows
    with pytest.raises(SystemExit):
        pretrain(tiny(out, "training.steps=4"), progress=False)
    monkeypatch.undo()
    partial = tmp_path / "backbone.partial"
    assert (partial / "training_metrics.csv").is_file() and not (partial / "checkpoints").exists()
    capsys.readouterr()
    result = pretrain(tiny(out, "training.steps=4"), progress=False, resume=True)
    assert result.steps == 4 and "starting it again from step 0" in capsys.readouterr().out
    straight = tmp_path / "straight"
    pretrain(tiny(straight, "training.steps=4"), progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_writers_temporaries_are_swept_and_no_others(tmp_path):
    from llada_trm.io import sweep_temporaries, temporary_name

    stray = killed_writers_file(tmp_path / "shard_00001.safetensors")
    live = temporary_name(tmp_path / "shard_00002.safetensors")
    live.write_bytes(b"")
    other_host = tmp_path / f".x.00000000-{dead_pid()}-0a0b0c0d.tmp"
    other_host.write_bytes(b"")  # another host's writer: its liveness cannot be told from here
    assert sweep_temporaries(tmp_path) == [stray]
    assert live.exists() and other_host.exists()


# ------------------------------------------------------------------------------------------- 5. the umask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_directories_follow_the_umask(backbone_dir, tmp_path, mask):
    from llada_trm.model.llada_config import LLaDAConfig
    from llada_trm.model.llada_weights import save_state_dict

    previous = os.umask(mask)
    try:
        backbone = tmp_path / "backbone"  # the backbone writer, straight into a directory
        config = LLaDAConfig.from_json_file(backbone_dir / "config.json")
        save_state_dict({"w": torch.ones(2)}, config, backbone)
        path = write_text_atomic(tmp_path / "a" / "file.txt", "x")
        with atomic_directory(tmp_path / "dir") as staging:
            (staging / "inner.txt").write_text("y")
        with atomic_path(tmp_path / "shard.safetensors") as shard:  # as the caches write their shards
            save_file({"w": torch.ones(1)}, str(shard))
        checkpoint = save_checkpoint(tmp_path / "ckpt", weights={"w": torch.ones(1)}, trainer_state={},
                                     config_yaml="{}\n")  # fmt: skip
    finally:
        os.umask(previous)
    files = [path, tmp_path / "dir" / "inner.txt", tmp_path / "shard.safetensors", *checkpoint.iterdir(),
             *backbone.iterdir()]  # fmt: skip
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file
    for directory in (tmp_path / "dir", checkpoint):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~mask, directory


def test_compare_refuses_a_folder_it_did_not_make(tmp_path):
    from llada_trm.training.run_dir import RunDirError, claim_compare_dir

    theirs = tmp_path / "theirs"
    (theirs / "data").mkdir(parents=True)
    (theirs / "notes.txt").write_text("precious\n")
    for force in (False, True):  # neither written into nor archived, with or without --force
        with pytest.raises(RunDirError, match="did not make .*notes.txt"):
            claim_compare_dir(theirs, [theirs / "seed0" / "slot"], force=force)
    assert (theirs / "notes.txt").read_text() == "precious\n"
    ours = tmp_path / "ours"
    (ours / "seed0").mkdir(parents=True)  # what an interrupted comparison leaves: taken as its own
    (ours / "diagnostics.json").write_text("{}")
    assert claim_compare_dir(ours, [ours / "seed0" / "slot"]) is None
