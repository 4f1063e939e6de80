"""A training run's checkpoint as files: their names, finding a checkpoint, reading and checking its weights.

The read side of `training.checkpoint`, on its own so that evaluation loads a run's weights without the
trainer. Layout of a checkpoint directory (`<output.dir>/checkpoints/last`, `.../best`):

    model.safetensors   the trainable tensors only, under their names in `LLaDATRMHybrid.state_dict()`;
                        metadata `backbone_fingerprint`: the backbone they were trained on
    trainer_state.pt    optimizer, scheduler, RNG states, the position in the run (`training.checkpoint`)
    config.yaml         the resolved run config
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from llada_trm.backbone.fingerprint import FINGERPRINT_KEY, check_fingerprint
from llada_trm.errors import CheckpointError
from llada_trm.hybrid.model import PREFIX as REFINER_PREFIX
from llada_trm.io import readable_directory

__all__ = [
    "CONFIG_FILE",
    "REFINER_PREFIX",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "check_run_backbone",
    "check_weights",
    "name_list",
    "refiner_names",
    "load_weights",
    "read_weights_file",
    "resolve_checkpoint_dir",
]

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"

logger = logging.getLogger("llada_trm")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory holding `checkpoints/last`; validate the files.

    A checkpoint caught between the two renames of a save (`.last.old` present, `last` not) is read where it
    is: a reader never renames a run's files (the run's writer, under its lock, puts it back)."""
    path = Path(path)
    candidates = [path, path / "last", path / "checkpoints" / "last"]
    for named in candidates:
        candidate = _readable(named)
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


def _readable(candidate: Path) -> Path:
    found = readable_directory(candidate)
    if found != candidate:
        logger.info("%s: reading the previous checkpoint, set aside by a save in progress or interrupted "
                    "(%s)", candidate, found.name)  # fmt: skip
    return found


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or corrupt file is a CheckpointError, not a traceback."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def check_run_backbone(
    directory: Path, fingerprint: str, backbone: str | Path, *, allow_mismatch: bool = False
) -> None:
    """Refuse a run checkpoint trained on another backbone than `backbone` (whose fingerprint is
    `fingerprint`); one saved before fingerprints were recorded loads with a warning."""
    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(FINGERPRINT_KEY)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
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
    """Refuse checkpoint `tensors` that do not fit the model's state dict `own`, before anything is copied.

    Every tensor must exist in the model with the same shape, be floating point where the model's is, and
    hold finite values (a NaN weight would only show up later as a NaN loss or a garbage answer); every
    name in `require` must be present. Shared by the single-process and the FSDP loader, so that both refuse
    the same checkpoints with the same one-line messages; `path` only names the file in them.
    """
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
