"""A pre-training run on disk: guarding the output, its checkpoint, and continuing it exactly.

The run directory (`training.checkpoint_dir`, default `<output.dir>.partial`) holds `checkpoint/` in the
trainer's layout (`training.checkpoint`: model.safetensors in float32, trainer_state.pt with the optimizer,
scheduler, RNG states, step and the metrics rows so far, config.yaml) and the live `pretrain_metrics.csv`.
Both are written atomically; the finished backbone is swapped into `output.dir` and the run directory
removed. A resumed run restores every state a step draws from, so it continues bit-identically.

The run directory is the command's own: it carries `RUN_MARKER` from its creation and the run's lock
(`training.run_dir.RunLock`) while a process writes there. pretrain deletes or archives only a directory with
the marker (or a checkpoint); any other non-empty folder named by `training.checkpoint_dir` is refused, with
or without --force. `--force` archives (`DIR.old-<timestamp>`), never deletes: the unfinished run, and
`output.dir`'s previous backbone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import readable_directory, recover_directory, sweep_temporaries, write_json
from llada_trm.run_checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    capture_rng_state,
    load_trainer_state,
    read_weights_file,
    restore_rng_state,
    save_checkpoint,
)
from llada_trm.training.resume_config import flatten_settings, refuse_changes, retarget_optimizer
from llada_trm.training.run_dir import LOCK_FILE, RunDirError, RunLock, archive_run_dir

from .config import PretrainConfig

__all__ = [
    "RESUMABLE",
    "RUN_MARKER",
    "PretrainState",
    "archive_output",
    "check_output",
    "prepare_run_dir",
    "restore",
    "save",
]

CHECKPOINT = "checkpoint"
RUN_MARKER = ".pretrain-run"
"""The file that makes a directory a pretraining run's (written when the run starts it)."""

RESUMABLE: tuple[str, ...] = (
    # the optimiser and its schedule (re-targeted on the restored optimizer and scheduler)
    "training.steps",
    "training.lr",
    "training.min_lr_ratio",
    "training.warmup_steps",
    "training.weight_decay",
    "training.max_grad_norm",
    # bookkeeping, targets and where it runs
    "training.eval_every",
    "training.log_every",
    "training.save_every",
    "training.checkpoint_dir",
    "training.threads",
    "training.stop_at",
    "training.stop_at.",
    "evaluation.batch_size",
    "evaluation.n_test",
    "output.",
)
"""Pretrain settings a resume may change; the shape, the data, the seeds and the in-training evaluation's
problems and sampler would make it another run (or another curve)."""


@dataclass
class PretrainState:
    """Where a run is: optimizer steps taken, the metrics rows so far, wall time spent in earlier sessions."""

    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0
    stopped_at_target: bool = False


def check_output(config: PretrainConfig, *, force: bool) -> None:
    """Refuse to replace an existing backbone (the shipped one included) unless `--force` was given, and
    refuse even then a folder that is not a model directory (no config.json): --force archives a backbone,
    it never moves an unrelated folder away."""
    out = Path(config.output.dir)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"output.dir {out} is a file, not a directory; pass --out DIR for a new one")
    if not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(
            f"output.dir {out} already exists (a backbone, e.g. the shipped one); pass --out DIR for a "
            f"new one, or --force to archive it (renamed to {out.name}.old-<timestamp>) and write anew"
        )
    if not (out / "config.json").is_file():
        raise ConfigError(
            f"output.dir {out} is not empty and holds no backbone (no config.json); --force archives only "
            "a backbone: pass --out DIR for a new or empty directory"
        )


def archive_output(config: PretrainConfig, *, force: bool) -> Path | None:
    """Just before the finished backbone is written: check `output.dir` again (it may have appeared during
    the run) and, with `force`, archive the backbone there; returns where it went."""
    check_output(config, force=force)
    out = Path(config.output.dir)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    return archive_run_dir(out)


def _owned(run_dir: Path) -> bool:
    """Whether `run_dir` is a pretraining run's: its marker, or (runs started before the marker) a
    checkpoint in the pretraining layout."""
    checkpoint = readable_directory(run_dir / CHECKPOINT)
    return (run_dir / RUN_MARKER).is_file() or (checkpoint / CONFIG_FILE).is_file()


def _saved(run_dir: Path) -> bool:
    """Whether the run directory holds a checkpoint (or one set aside by an interrupted save)."""
    return (readable_directory(run_dir / CHECKPOINT) / CONFIG_FILE).is_file()


def prepare_run_dir(
    config: PretrainConfig, *, resume: bool, force: bool, say: Callable[[str], None] = lambda _line: None
) -> tuple[Path | None, RunLock]:
    """Claim the run directory under its lock; returns the checkpoint to resume (None for a fresh run) and
    the held lock (the caller releases it).

    Refuses a folder that is not a pretraining run's (unless empty), a live run's, starting over a
    checkpoint without --force (which archives it), and resuming where there is no run. A run killed before
    its first checkpoint has nothing to continue: a new run, or --resume, starts it again from step 0.
    """
    run_dir = config.run_dir()
    out = Path(config.output.dir)
    if run_dir.resolve() == out.resolve() or out.resolve() in run_dir.resolve().parents or (
        run_dir.resolve() in out.resolve().parents
    ):
        raise ConfigError(
            f"training.checkpoint_dir {run_dir} and output.dir {out} overlap; the run directory is removed "
            "when the backbone is written: set training.checkpoint_dir to a separate directory"
        )
    exists = run_dir.exists() or run_dir.is_symlink()
    if exists and not run_dir.is_dir():
        raise ConfigError(f"training.checkpoint_dir {run_dir} is a file; set it to a directory")
    holder = RunLock(run_dir).holder() if exists else None
    if holder is not None:
        raise RunDirError(f"{run_dir}: {holder}; wait for it to finish, or set training.checkpoint_dir")
    owned = exists and _owned(run_dir)
    foreign = exists and not owned and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if foreign:
        raise ConfigError(
            f"training.checkpoint_dir {run_dir} is not empty and not a pretraining run's (no {RUN_MARKER}); "
            "pretrain deletes only what it made: set training.checkpoint_dir to a new or empty directory"
        )
    saved = owned and _saved(run_dir)
    if resume and not owned:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir}; drop --resume to start the run")
    if resume and not saved:
        say(f"{run_dir}: the run stopped before its first checkpoint; starting it again from step 0")
    if saved and not resume:
        if not force:
            raise CheckpointError(
                f"{run_dir} holds an unfinished run's checkpoint; pass --resume to continue it, or --force "
                f"to archive it (renamed to {run_dir.name}.old-<timestamp>) and start over"
            )
        archived = archive_run_dir(run_dir)
        say(f"{run_dir} held an unfinished run: archived it as {archived} (--force)")
        saved = False
    lock = RunLock(run_dir).acquire()
    try:
        if not (run_dir / RUN_MARKER).is_file():
            write_json(run_dir / RUN_MARKER, {"kind": "llada-trm pretrain run", "created": time.strftime(
                "%Y-%m-%dT%H:%M:%S")})  # fmt: skip
        recover_directory(run_dir / CHECKPOINT)  # under the lock: a save killed between its two renames
        sweep_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return (run_dir / CHECKPOINT if saved else None), lock


def save(
    config: PretrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    generator: torch.Generator,
    state: PretrainState,
) -> Path:
    """Write the run's checkpoint (atomically: a crash keeps the previous one)."""
    trainer_state = {
        "step": state.step,
        "rows": state.rows,
        "elapsed_before": state.elapsed_before,
        "stopped_at_target": state.stopped_at_target,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state({"batches": generator}),
    }
    weights = {name: t.float() for name, t in model.state_dict().items()}
    config_yaml = yaml.safe_dump(config.plain(), sort_keys=False)
    return save_checkpoint(
        config.run_dir() / CHECKPOINT, weights=weights, trainer_state=trainer_state, config_yaml=config_yaml
    )


def restore(
    directory: Path,
    config: PretrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    generator: torch.Generator,
) -> tuple[PretrainState, list[str]]:
    """Load a checkpoint into the freshly built run; returns its state and the changed (resumable) settings.

    A change outside `RESUMABLE` refuses in one line before anything is loaded.
    """
    changed = refuse_changes(directory, _settings(directory), flatten_settings(config.plain()), RESUMABLE,
                             "start a new run from its backbone with model.init_from")  # fmt: skip
    state = load_trainer_state(directory)
    weights = read_weights_file(directory / WEIGHTS_FILE)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit this model ({exc})".split("\n")[0]) from None
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    retarget_optimizer(optimizer, scheduler, fresh)
    restore_rng_state(state["rng"], {"batches": generator})
    return _state(state), changed


def _state(saved: Mapping[str, Any]) -> PretrainState:
    return PretrainState(
        step=int(saved["step"]),
        rows=[dict(row) for row in saved["rows"]],
        elapsed_before=float(saved["elapsed_before"]),
        stopped_at_target=bool(saved["stopped_at_target"]),
    )


def _settings(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        return flatten_settings(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(exc).split())})") from None
