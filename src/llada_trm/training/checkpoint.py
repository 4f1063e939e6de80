"""Training checkpoints: trainable weights, optimizer/scheduler/RNG state and the resolved config.

Layout of a checkpoint directory (`<output.dir>/checkpoints/last`, `.../best`):

    model.safetensors   the trainable tensors only (phase 1: `refinement_head.*`; phases 2/3: also the
                        trainable backbone tensors), under their names in `LLaDATRMHybrid.state_dict()`
    trainer_state.pt    optimizer, scheduler, RNG states (python, numpy, torch CPU and every CUDA device,
                        extra generators), step / epoch / position in the epoch / best metric
    config.yaml         the resolved run config

A checkpoint is written into a hidden sibling directory and swapped in with `os.replace`, so a crash while
writing leaves the previous checkpoint intact: the old directory is renamed aside, the new one renamed in,
then the old one removed. If a crash lands between those two renames, the next save or load restores the
aside copy.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llada_trm.errors import CheckpointError

__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "TrainState",
    "capture_rng_state",
    "load_trainer_state",
    "load_weights",
    "resolve_checkpoint_dir",
    "restore_rng_state",
    "save_checkpoint",
]

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
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
) -> Path:
    """Write a checkpoint atomically: into a hidden temporary directory, then swapped in with `os.replace`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    aside = directory.parent / f".{directory.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights.items()}
    metadata = {"format": "pt", "llada_trm_format": str(FORMAT_VERSION)}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
    torch.save({"format_version": FORMAT_VERSION, **trainer_state}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE):
        _fsync(tmp / name)

    if directory.exists():
        os.replace(directory, aside)
    os.replace(tmp, directory)
    if aside.exists():
        shutil.rmtree(aside)
    _fsync_dir(directory.parent)
    return directory


def _recover(directory: Path) -> None:
    """Finish an interrupted swap: the aside copy is the last complete checkpoint when `directory` is gone."""
    aside = directory.parent / f".{directory.name}.old"
    if aside.exists():
        if directory.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, directory)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- loading


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory holding `checkpoints/last`; validate the files."""
    path = Path(path)
    candidates = [path, path / "last", path / "checkpoints" / "last"]
    for candidate in candidates:
        _recover_if_possible(candidate)
        if (candidate / WEIGHTS_FILE).is_file() or (candidate / STATE_FILE).is_file():
            missing = [n for n in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE) if not (candidate / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{candidate}: incomplete checkpoint, missing {', '.join(missing)} "
                    f"(expected {WEIGHTS_FILE}, {STATE_FILE}, {CONFIG_FILE})"
                )
            return candidate
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(
        f"{path}: not a llada-trm checkpoint (expected {WEIGHTS_FILE}, {STATE_FILE} and {CONFIG_FILE}, "
        "or a run directory with checkpoints/last)"
    )


def _recover_if_possible(candidate: Path) -> None:
    aside = candidate.parent / f".{candidate.name}.old"
    if not candidate.exists() and aside.is_dir():
        logger.warning("%s: restoring the previous checkpoint left aside by an interrupted save", candidate)
        _recover(candidate)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or corrupt file is a CheckpointError, not a traceback."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def check_weights(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    require: Iterable[str] = (),
) -> None:
    """Refuse checkpoint `tensors` that do not fit the model's state dict `own`, before anything is copied.

    Shared by the single-process and the FSDP loader, so that both refuse the same checkpoints with the same
    messages; `path` only names the file in them, `require` as in `load_weights`.
    """
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} tensors do not exist in this model (e.g. {unknown[0]!r}); was the "
            "checkpoint saved with a different model.refiner / model.integration?"
        )
    for name, tensor in sorted(tensors.items()):
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)} "
                "(different model settings?)"
            )
    missing = sorted(set(require) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{path}: lacks {len(missing)} trainable tensors of this run (e.g. {missing[0]!r}); was it saved "
            "in another training.phase or with other training_params.trainable_modules?"
        )


def load_weights(
    model: nn.Module, directory: str | Path, *, require: Iterable[str] = ()
) -> list[str]:
    """Load `model.safetensors` into `model`; every tensor must exist in the model with the same shape.

    `require` names tensors the checkpoint must contain (the run's trainable parameters when resuming).
    Returns the loaded names.
    """
    path = Path(directory) / WEIGHTS_FILE
    tensors = read_weights_file(path)
    own = model.state_dict()
    check_weights(path, tensors, own, require)
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
    return sorted(tensors)


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
