"""Which backbone a refiner was trained on: a cheap, deterministic fingerprint of a backbone's weights
(docs/architecture.md, `llada_trm.model.fingerprint`, says what is hashed).

Floating values are rounded to bfloat16 first, so fp32 and bf16 copies fingerprint alike (a float16 copy of
small weights may not: float16 flushes magnitudes that bfloat16 keeps). Only the first, middle and last rows
of each tensor are read, so an edit confined to unsampled rows (say, a few embedding rows) goes unseen: the
fingerprint guards against mix-ups, not tampering. Re-training or a merged LoRA update changes every row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from llada_trm.errors import CheckpointError
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.llada_weights import _weight_map, read_config

if TYPE_CHECKING:
    from llada_trm.model.llada import LLaDAModel

FINGERPRINT_KEY = "backbone_fingerprint"  # the safetensors metadata key of refiner checkpoints
OVERRIDE_FLAG = "--allow-backbone-mismatch"
_VERSION = b"llada-trm backbone fingerprint v1\0"
_NO_OUTPUT_CHANGE = {"embedding_dropout", "attention_dropout", "residual_dropout", "init_std",
                     "max_sequence_length"}

logger = logging.getLogger("llada_trm")

# (name, shape, rows(indices) -> the tensor's rows at those indices along dim 0, or the whole tensor for None)
Rows = Callable[[list[int] | None], torch.Tensor]


class BackboneMismatchError(CheckpointError):
    """A refiner checkpoint recorded another backbone's fingerprint than the one it is being loaded onto."""


def short(fingerprint: str | None) -> str:
    """The first 16 hex digits: enough to tell backbones apart in a message."""
    return "none" if fingerprint is None else fingerprint[:16]


def _sample_rows(shape: tuple[int, ...]) -> list[int] | None:
    """None (the whole tensor) up to 1-D; else the first, middle and last rows."""
    if len(shape) <= 1:
        return None
    n = shape[0]
    return sorted({0, n // 2, max(n - 1, 0)}) if n else []


def _canonical_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.is_floating_point():
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return tensor.numpy().tobytes()


def _digest(config: LLaDAConfig, tensors: Iterable[tuple[str, tuple[int, ...], Rows]]) -> str:
    """The hash of the module docstring, over `tensors` given as (name, shape, row reader)."""
    digest = hashlib.sha256(_VERSION)
    arch = {k: v for k, v in sorted(config.to_dict().items()) if k not in _NO_OUTPUT_CHANGE}
    digest.update(json.dumps(arch, sort_keys=True).encode())
    for name, shape, rows in sorted(tensors, key=lambda item: item[0]):
        digest.update(f"\0{name}\0{list(shape)}\0".encode())
        digest.update(_canonical_bytes(rows(_sample_rows(shape))))
    return digest.hexdigest()


def model_fingerprint(backbone: LLaDAModel) -> str:
    """The fingerprint of a backbone in memory (its current weights, whatever their dtype or device)."""
    state = backbone.state_dict()

    def reader(tensor: torch.Tensor) -> Rows:
        return lambda rows: tensor if rows is None else tensor[rows]

    return _digest(backbone.config, ((n, tuple(t.shape), reader(t)) for n, t in state.items()))


def directory_fingerprint(directory: str | Path) -> str:
    """The fingerprint of an HF-layout backbone directory, read from its files (no model is built)."""
    directory = Path(directory)
    config, weight_map = read_config(directory), _weight_map(directory)
    try:
        with ExitStack() as stack:
            handles = {
                file: stack.enter_context(safe_open(str(file), framework="pt"))
                for file in set(weight_map.values())
            }
            entries = []
            for name, file in weight_map.items():
                piece = handles[file].get_slice(name)
                entries.append((name, tuple(piece.get_shape()), _slice_reader(handles[file], name, piece)))
            return _digest(config, entries)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot fingerprint {directory}: {err} (corrupt or truncated?)") from None


def _slice_reader(handle: Any, name: str, piece: Any) -> Rows:
    """Rows of one stored tensor, read through its slice (only those bytes leave the file)."""

    def rows(indices: list[int] | None) -> torch.Tensor:
        if indices is None:
            return handle.get_tensor(name)
        return torch.cat([piece[i : i + 1] for i in indices]) if indices else torch.empty(0)

    return rows


def check_fingerprint(
    recorded: str | None, actual: str, *, what: str, backbone: str, allow_mismatch: bool = False
) -> None:
    """Refuse `what` (a refiner checkpoint) recorded on another backbone than `backbone` (fingerprint
    `actual`); warn when it recorded none (saved before fingerprints) or when `allow_mismatch` lets it by."""
    if recorded is None:
        logger.warning(
            "%s records no backbone fingerprint (saved by an older llada-trm), so it cannot be checked "
            "against backbone %s (%s); make sure it was trained on this backbone",
            what, backbone, short(actual),
        )
        return
    if recorded == actual:
        return
    message = (
        f"{what} was trained on backbone {short(recorded)}, but {backbone} is backbone {short(actual)}"
    )
    if allow_mismatch:
        logger.warning("%s; loading it anyway (%s)", message, OVERRIDE_FLAG)
        return
    raise BackboneMismatchError(
        f"{message}; load it onto the backbone it was trained on, or pass {OVERRIDE_FLAG} "
        "(allow_backbone_mismatch=True) to load it anyway"
    )
