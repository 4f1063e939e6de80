"""Training checkpoints: trainable weights, optimizer/scheduler/RNG state and the resolved config.

Layout of a checkpoint directory (`<output.dir>/checkpoints/last`, `.../best`):

    model.safetensors   the trainable tensors only (phase 1: `refinement_head.*`; phases 2/3: also the
                        trainable backbone tensors), under their names in `LLaDATRMHybrid.state_dict()`;
                        its metadata records `backbone_fingerprint`, the fingerprint of `model.backbone`'s
                        files (`backbone.fingerprint`), which loading checks
    trainer_state.pt    optimizer, scheduler, RNG states (python, numpy, torch CPU and every CUDA device,
                        extra generators), step / epoch / position in the epoch / best metric
    config.yaml         the resolved run config

A checkpoint is written into a hidden sibling directory and swapped in (`llada_trm.io.atomic_directory`), so
a crash while writing leaves the previous checkpoint intact; numbered snapshots are pruned by renaming them
away first, so a crash while deleting never leaves a half-deleted one. The file names and the read side
(finding a checkpoint, loading its weights) live in `llada_trm.run_checkpoint`, which evaluation uses without
training.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from llada_trm.backbone.fingerprint import FINGERPRINT_KEY
from llada_trm.errors import CheckpointError
from llada_trm.io import atomic_directory, remove_directory
from llada_trm.run_checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    check_weights,
    load_weights,
    read_weights_file,
    resolve_checkpoint_dir,
)

__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "TrainState",
    "capture_rng_state",
    "check_weights",
    "prune_snapshots",
    "load_trainer_state",
    "load_weights",
    "read_weights_file",
    "resolve_checkpoint_dir",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT_VERSION = 1

logger = logging.getLogger("llada_trm")


@dataclass
class TrainState:
    """Where a run is: optimizer steps taken, the epoch, micro-batches consumed in it, the best metric."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        return cls(
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            batches_in_epoch=int(data["batches_in_epoch"]),
            best_metric=None if data.get("best_metric") is None else float(data["best_metric"]),
            best_step=None if data.get("best_step") is None else int(data["best_step"]),
            extra=dict(data.get("extra") or {}),
        )


# ------------------------------------------------------------------------------------------------- RNG


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training step draws from, in types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {key: gen.get_state() for key, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored when the device count matches."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has RNG states for %d CUDA devices, this machine has %d; CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
    saved = state.get("generators") or {}
    for key, gen in (generators or {}).items():
        if key in saved:
            gen.set_state(saved[key])


def _as_tuple(value: Any) -> Any:
    """`random.setstate` wants nested tuples; serialisation may hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    directory: str | Path,
    *,
    weights: Mapping[str, torch.Tensor],
    trainer_state: Mapping[str, Any],
    config_yaml: str,
    backbone_fingerprint: str | None = None,
) -> Path:
    """Write a checkpoint atomically: into a hidden temporary directory that is then swapped in.

    `backbone_fingerprint`: the run's backbone (the trainer always gives it; None writes a checkpoint that
    loads with a warning, as those saved before fingerprints do)."""
    directory = Path(directory)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights.items()}
    metadata = {"format": "pt", "llada_trm_format": str(FORMAT_VERSION)}
    if backbone_fingerprint is not None:
        metadata[FINGERPRINT_KEY] = backbone_fingerprint
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        torch.save({"format_version": FORMAT_VERSION, **trainer_state}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    return directory


def prune_snapshots(checkpoint_dir: Path, keep: int) -> None:
    """Remove all but the `keep` newest `step_*` snapshots; each goes whole (`io.remove_directory`)."""
    for stale in checkpoint_dir.glob(".step_*.tmp"):  # what a killed pruning or snapshot left behind
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(checkpoint_dir.glob("step_*"))[:-keep]:
        remove_directory(old)


# ---------------------------------------------------------------------------------------------- loading


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """Read `trainer_state.pt` (weights-only unpickling: plain containers and tensors)."""
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"{path}: unreadable trainer state ({type(exc).__name__}: {exc})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported trainer state (format {version!r}, expected {FORMAT_VERSION})"
        )
    return state
