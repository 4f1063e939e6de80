"""A training run's checkpoint: writing it, finding it, reading and checking its weights, starting from one.

The one module for a run's checkpoint files (model.safetensors, trainer_state.pt, config.yaml; the layout is
in docs/training.md), so that evaluation reads them without importing training. A checkpoint is written
into a hidden sibling directory and swapped in (`io.atomic_directory`): a crash leaves the previous one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import atomic_directory, readable_directory, remove_directory
from llada_trm.model.fingerprint import FINGERPRINT_KEY, check_fingerprint
from llada_trm.model.hybrid import PREFIX as REFINER_PREFIX
from llada_trm.schema import read_yaml

if TYPE_CHECKING:
    from llada_trm.config import RunConfig

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
TENSORS_KEY = "tensors"  # model.safetensors metadata: the JSON list of the tensor names the file holds
INIT_FROM_KEY = "training.init_from"

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


# ------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
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
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored when the device count matches."""
    random.setstate(state["python"])
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


# ----------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    directory: str | Path,
    *,
    weights: Mapping[str, torch.Tensor],
    trainer_state: Mapping[str, Any],
    config_yaml: str,
    backbone_fingerprint: str | None = None,
) -> Path:
    """Write a checkpoint atomically; the weights file records the names it holds (`TENSORS_KEY`) and the
    run's `backbone_fingerprint` (None: it loads with a warning, as those saved before fingerprints do)."""
    directory = Path(directory)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights.items()}
    metadata = {
        "format": "pt",
        "llada_trm_format": str(FORMAT_VERSION),
        TENSORS_KEY: json.dumps(sorted(tensors)),
    }
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


# ---------------------------------------------------------------------------------------------- reading


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory holding `checkpoints/last`; validate the files. One
    caught between the two renames of a save is read where it is (`io.readable_directory`)."""
    path = Path(path)
    for named in (path, path / "last", path / "checkpoints" / "last"):
        candidate = readable_directory(named)
        if candidate != named:
            logger.info("%s: reading the previous checkpoint, set aside by a save in progress or interrupted "
                        "(%s)", named, candidate.name)  # fmt: skip
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


def read_weights_file(path: Path, *, metadata: bool = False) -> Any:
    """The tensors of a safetensors file (or only its header's metadata); a missing or corrupt file is a
    CheckpointError, not a traceback."""
    try:
        if not metadata:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def recorded_names(path: Path, tensors: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """The tensor names a checkpoint's weights file `path` records that it holds; for a file saved before the
    record (or rewritten without it), the names of its tensors (`tensors`, read from the file if None)."""
    record = read_weights_file(path, metadata=True).get(TENSORS_KEY)
    if record is None:
        return sorted(tensors if tensors is not None else read_weights_file(path))
    try:
        names = json.loads(record)
    except (json.JSONDecodeError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(
            f"{path}: damaged '{TENSORS_KEY}' record in the file's metadata (expected a JSON list of tensor "
            "names); use an earlier checkpoint (checkpoints/step_*, best)"
        )
    return sorted(names)


def check_run_backbone(
    directory: Path, fingerprint: str, backbone: str | Path, *, allow_mismatch: bool = False
) -> None:
    """Refuse a run checkpoint trained on another backbone than `backbone` (whose fingerprint is
    `fingerprint`); one saved before fingerprints were recorded loads with a warning."""
    recorded = read_weights_file(Path(directory) / WEIGHTS_FILE, metadata=True).get(FINGERPRINT_KEY)
    check_fingerprint(
        recorded, fingerprint, what=f"checkpoint {directory}", backbone=str(backbone),
        allow_mismatch=allow_mismatch,
    )


def name_list(names: Sequence[str], first: int = 3) -> str:
    """'a, b, c (+7 more)': the first few of a list of tensor names and how many the line leaves out."""
    shown = ", ".join(names[:first])
    return shown + (f" (+{len(names) - first} more)" if len(names) > first else "")


def refiner_names(own: Mapping[str, torch.Tensor]) -> list[str]:
    """The refiner's tensors in a model state dict: no other file holds them, so a run checkpoint must."""
    return sorted(name for name in own if name.startswith(REFINER_PREFIX))


def check_weights(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    require: Iterable[str] = (),
) -> None:
    """Refuse checkpoint `tensors` that do not fit the state dict `own` (shape, floating point, finite:
    a NaN weight would show up only later, as a NaN loss) or lack a name in `require`, before anything is
    copied; the single-process and the FSDP loader share it, so both refuse alike."""
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} tensors do not exist in this model ({name_list(unknown)}); was the "
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
            f"{path}: lacks {len(missing)} of the {len(set(require))} tensors this model needs "
            f"({name_list(missing)}); was it saved in another training.phase, with other "
            "training_params.trainable_modules, or truncated? Retrain, or point at a complete checkpoint"
        )
    integer = sorted(
        name for name, t in tensors.items() if own[name].is_floating_point() and not t.is_floating_point()
    )
    if integer:
        raise CheckpointError(
            f"{path}: {len(integer)} tensors are not floating point where the model's are "
            f"({name_list(integer)}, e.g. {tensors[integer[0]].dtype}); the file is not a trained checkpoint"
        )
    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensors hold NaN or inf values ({name_list(bad)}); the run diverged before "
            "this save or the file is damaged: use an earlier checkpoint (checkpoints/step_*, best)"
        )


def load_weights(
    model: nn.Module, directory: str | Path, *, require: Iterable[str] = ()
) -> list[str]:
    """Load `model.safetensors` into `model` (`check_weights`); the file must hold every name it records, so
    a tensor lost since the save is refused, not left at its initial value. Returns the loaded names."""
    path = Path(directory) / WEIGHTS_FILE
    tensors = read_weights_file(path)
    recorded = recorded_names(path, tensors)
    lost = sorted(set(recorded) - set(tensors))
    if lost:
        raise CheckpointError(
            f"{path}: lacks {len(lost)} of the {len(recorded)} tensors it records ({name_list(lost)}); the "
            "file was truncated or edited: use an earlier checkpoint (checkpoints/step_*, best)"
        )
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


def read_run_config(directory: Path) -> RunConfig:
    """A checkpoint's `config.yaml`, read strictly as a config file (duplicate keys, alias bombs, deep nesting
    and non-UTF-8 fail here) and parsed into a `RunConfig`."""
    from llada_trm.config import parse_config

    config_path = directory / CONFIG_FILE
    try:
        raw = read_yaml(config_path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return parse_config(raw, source=str(config_path))
