"""A pre-training run on disk: guarding the output, its checkpoint, and continuing it exactly.

The run directory (`training.checkpoint_dir`, default `<output.dir>.partial`) holds `checkpoint/` in the
trainer's layout (`training.checkpoint`: model.safetensors in float32, trainer_state.pt with the optimizer,
scheduler, RNG states, step and the metrics rows so far, config.yaml) and the live `pretrain_metrics.csv`.
Both are written atomically; the finished backbone is swapped into `output.dir` and the run directory
removed. A resumed run restores every state a step draws from, so it continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import remove_directory
from llada_trm.run_checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_weights_file
from llada_trm.training.checkpoint import (
    capture_rng_state,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)
from llada_trm.training.resume_config import flatten_settings, refuse_changes, retarget_optimizer

from .config import PretrainConfig

__all__ = ["RESUMABLE", "PretrainState", "check_output", "prepare_run_dir", "restore", "save"]

CHECKPOINT = "checkpoint"

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
    """Refuse to replace an existing backbone (the shipped one included) unless `--force` was given."""
    out = Path(config.output.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(
            f"output.dir {out} already exists (a backbone, e.g. the shipped one); pass --out DIR for a "
            "new one, or --force to replace it"
        )


def prepare_run_dir(config: PretrainConfig, *, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume (None for a fresh run); refuses to start over a checkpoint without --force
    and to resume where there is none."""
    run_dir = config.run_dir()
    checkpoint = run_dir / CHECKPOINT
    if resume:
        if not (checkpoint / CONFIG_FILE).is_file():
            raise CheckpointError(f"--resume: no checkpoint in {run_dir}; drop --resume to start the run")
        return checkpoint
    if checkpoint.exists() and not force:
        raise CheckpointError(
            f"{run_dir} holds an unfinished run's checkpoint; pass --resume to continue it, or --force to "
            "start over"
        )
    remove_directory(run_dir)
    run_dir.mkdir(parents=True)
    return None


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
    changed = refuse_changes(directory, _saved(directory), flatten_settings(config.plain()), RESUMABLE,
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


def _saved(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        return flatten_settings(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(exc).split())})") from None
