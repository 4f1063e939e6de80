"""A run's state in its checkpoints: saving a `Trainer`'s, restoring it, and continuing where it left off.

`save_run` / `restore_run` take the trainer itself: the state is spread over its model, optimizer,
scheduler, health monitor, logging window and position, and these two keep the list of what is saved in one
place.

A checkpoint records the global number of examples consumed in its epoch (`samples_in_epoch`). The order
of an epoch does not depend on the world size, so a run with M processes continues at that global
position: each rank skips samples / M of its own shard. When that is not a whole number of accumulation
windows, the position is rounded down and the few examples in between are seen again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llada_trm.dist_utils import is_main_process, reduce_sums, world_size
from llada_trm.errors import CheckpointError
from llada_trm.io import copy_directory
from llada_trm.run_checkpoint import (
    TrainState,
    capture_rng_state,
    check_run_backbone,
    load_trainer_state,
    load_weights,
    prune_snapshots,
    refiner_names,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from llada_trm.training.distributed import (
    full_state_dict,
    is_sharded,
    load_optimizer_state,
    load_sharded_weights,
    optimizer_state,
)
from llada_trm.training.metrics import Averager
from llada_trm.training.resume_config import check_config_changes, retarget_optimizer

__all__ = ["batches_to_skip", "restore_run", "run_summary", "save_run"]

logger = logging.getLogger("llada_trm")


def save_run(trainer: Any, name: str) -> Path | None:
    """Write a `Trainer`'s checkpoints/<name> (rank 0); `keep_last` also keeps numbered copies of `last`.

    Every rank calls it: under FSDP the full tensors are gathered from the shards first. The layout is
    the single-process one whatever the world size; the position in the epoch is also stored as a
    global example count, so that another world size can resume it.
    """
    t = trainer.config.training
    # The trained tensors, those init_from loaded, and the whole refiner (frozen parts too: no other file
    # holds them, and evaluation requires every one).
    refiner = refiner_names(dict(trainer.model.named_parameters()))
    names = list(dict.fromkeys([*trainer.plan.trainable_names, *trainer.init_names, *refiner]))
    weights = full_state_dict(trainer.model, names)
    ema = trainer.ema
    if ema is not None:  # readers evaluate the average; the live weights resume the run
        weights = {**weights, **ema.averaged()}
    optimizer = optimizer_state(trainer.model, trainer.optimizer)
    window_sums, window_counts = reduce_sums(trainer._window.terms.sums, trainer._window.terms.counts)
    if not is_main_process():
        return None
    train_state = trainer.state.to_dict()
    consumed = min(trainer.state.batches_in_epoch * t.batch_size, trainer.sampler.shard_size) * world_size()
    train_state["extra"].update(
        world_size=world_size(), batch_size=t.batch_size, samples_in_epoch=consumed
    )
    trainer_state = {
        "train_state": train_state,
        "optimizer": optimizer,
        "scheduler": trainer.scheduler.state_dict(),
        "rng": capture_rng_state(),
        "health": trainer.health.state_dict(),
        "log_window": {"sums": window_sums, "counts": window_counts},
        "trainable_names": list(trainer.plan.trainable_names),
        "phase": trainer.plan.phase,
        "total_steps": trainer.total_steps,
    }
    if ema is not None:
        trainer_state["ema_live_weights"] = ema.live()
    if trainer.masks.margins:
        trainer_state["probe_margins"] = trainer.masks.state_dict()
    keep = trainer.config.output.keep_last
    directory = trainer.checkpoint_dir / name
    snapshot = name == "last" and keep > 0
    if snapshot:  # the numbered copy first: a crash before `last` follows only repeats this step
        directory = trainer.checkpoint_dir / f"step_{trainer.state.step:07d}"
    save_checkpoint(
        directory,
        weights=weights,
        trainer_state=trainer_state,
        config_yaml=trainer._config_yaml,
        backbone_fingerprint=trainer.backbone_fingerprint,
    )
    if snapshot:
        directory = copy_directory(directory, trainer.checkpoint_dir / "last")
        prune_snapshots(trainer.checkpoint_dir, keep)
    return directory


def restore_run(trainer: Any, path: str | Path) -> Path:
    """Restore a `Trainer`'s trainable weights, optimizer, scheduler, RNG states and data position; returns
    the checkpoint directory."""
    directory = resolve_checkpoint_dir(path)
    state = load_trainer_state(directory)
    names = trainer.plan.trainable_names
    saved_names = list(state.get("trainable_names", []))
    if sorted(saved_names) != sorted(names):
        raise CheckpointError(
            f"{directory}: it trained {len(saved_names)} tensors, this run trains {len(names)}; resume "
            "with the same training.phase and training_params.trainable_modules (or start a new run)"
        )
    changed = check_config_changes(directory, trainer.config)  # refuses before any weight is loaded
    check_run_backbone(
        directory, trainer.backbone_fingerprint, trainer.backbone_dir,
        allow_mismatch=trainer.allow_backbone_mismatch,
    )
    if is_sharded(trainer.model):  # FSDP: every rank reads the full tensors and keeps its shards
        load_sharded_weights(trainer.model, directory, require=names)
    else:
        load_weights(trainer.model, directory, require=names)
    trainer.masks.load_state_dict(state.get("probe_margins", {}))
    ema = trainer.ema
    if ema is not None:  # the weights file held the average; the trainer state the live weights
        live = state.get("ema_live_weights")
        if live is None:
            raise CheckpointError(f"{directory}: saved without training.ema_decay; resume with ema_decay 0")
        averaged = {name: param.detach().clone() for name, param in trainer.model.named_parameters()
                    if name in set(ema.names)}
        ema.restore(averaged, live)
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in trainer.optimizer.param_groups]
    try:
        load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{directory}: optimizer/scheduler state does not fit this run ({exc})"
        ) from None
    restore_rng_state(state["rng"])
    trainer.state = TrainState.from_dict(state["train_state"])
    t = trainer.config.training
    # Another world or batch size continues at the same global position.
    trainer.state.batches_in_epoch = batches_to_skip(
        trainer.state.extra,
        trainer.state.batches_in_epoch,
        world=world_size(),
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        micro_per_epoch=trainer.micro_per_epoch,
        train_size=len(trainer.train_set),
    )
    trainer.health.load_state_dict(state.get("health", {}))
    window = state.get("log_window") or {}
    trainer._window.terms = Averager()
    if is_main_process():  # the saved window already sums every rank's micro-batches
        trainer._window.terms.sums.update(window.get("sums", {}))
        trainer._window.terms.counts.update(window.get("counts", {}))
    # The restored groups carry the saved run's lr, betas, weight decay: this run's config applies instead
    # (identical values when nothing changed, so an unchanged resume stays bit-identical).
    retarget_optimizer(trainer.optimizer, trainer.scheduler, fresh)
    if state.get("total_steps") not in (None, trainer.total_steps):
        logger.warning(
            "resuming a run planned for %s steps with a config planning %d; from here on the LR "
            "schedule decays towards the new total",
            state.get("total_steps"),
            trainer.total_steps,
        )
    if changed:
        lr = trainer.optimizer.param_groups[0]["lr"]
        logger.warning(
            "resuming at step %d with changed settings: %s; they apply from here on (next lr %.6g)",
            trainer.state.step,
            "; ".join(changed),
            lr,
        )
    return directory


def run_summary(trainer: Any, elapsed: float, *, finished: bool = False) -> dict[str, Any]:
    """What `Trainer.train` returns: steps, last losses, best metric, where the run wrote, health warnings;
    `already_finished`: a resumed run that had nothing left to train."""
    return {
        "already_finished": finished,
        "steps": trainer.state.step,
        "total_steps": trainer.total_steps,
        "epoch": trainer.state.epoch,
        "train_loss": trainer.last_train_row.get("loss"),
        "val": dict(trainer.last_val_row),
        "best_metric": trainer.state.best_metric,
        "best_step": trainer.state.best_step,
        "output_dir": str(trainer.output_dir),
        "checkpoint": str(trainer.checkpoint_dir / "last"),
        "health_warnings": list(trainer.health.warned.values()),
        "elapsed_s": elapsed,
    }


def batches_to_skip(
    extra: Mapping[str, Any],
    batches_in_epoch: int,
    *,
    world: int,
    batch_size: int,
    accumulation: int,
    micro_per_epoch: int,
    train_size: int,
) -> int:
    """This rank's micro-batches already consumed in the epoch, re-expressed for this world and batch size.

    `extra` is the checkpoint's `train_state.extra` (its world size, batch size and global position).
    """
    saved_world = int(extra.get("world_size", 1))
    saved_batch = int(extra.get("batch_size", batch_size))
    if (saved_world, saved_batch) == (world, batch_size):
        return batches_in_epoch  # the same geometry: the micro-batch count is exact
    samples = int(extra.get("samples_in_epoch", batches_in_epoch * saved_batch * saved_world))
    if samples >= train_size:
        batches = micro_per_epoch  # the epoch was complete
    else:
        batches = min(samples // world // batch_size, micro_per_epoch)
        batches -= batches % accumulation
    replayed = samples - min(batches * batch_size * world, samples)
    if replayed:
        logger.warning(
            "resuming with %d processes x batch %d (saved: %d x %d): the epoch continues %d examples "
            "before the saved position, at an optimizer-step boundary",
            world,
            batch_size,
            saved_world,
            saved_batch,
            replayed,
        )
    return batches
