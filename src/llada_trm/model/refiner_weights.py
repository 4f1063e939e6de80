"""The refiners' weights file (`save_refiner` / `load_refiner`): only the `refinement_head.*` tensors.

Written atomically (temporary name, then rename) with the integration and refiner kinds and the fingerprint
of the backbone beside the refiners (`model.fingerprint`) as metadata; read back only when its names and
shapes are exactly the model's, else a one-line `CheckpointError`, and only onto the backbone it records
(a `BackboneMismatchError` unless `allow_backbone_mismatch`; a file without a fingerprint loads with a
warning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from llada_trm.errors import CheckpointError
from llada_trm.io import atomic_path
from llada_trm.model.fingerprint import FINGERPRINT_KEY, check_fingerprint

__all__ = ["read_refiner_weights", "write_refiner_weights"]


def write_refiner_weights(
    path: str | Path,
    state: Mapping[str, Tensor],
    *,
    integration: str,
    refiners: Sequence[str],
    backbone_fingerprint: str,
) -> Path:
    """`state` (the refiners' tensors under their full names) to safetensors at `path`, recording the
    fingerprint of the backbone they were trained on."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    if not tensors:
        raise ValueError("this model has no refiner (refiner='none'); there is nothing to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "integration": integration,
        "refiners": ",".join(refiners),
        FINGERPRINT_KEY: backbone_fingerprint,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_refiner_weights(
    path: str | Path,
    expected: Mapping[str, Tensor],
    refiners: Sequence[str],
    *,
    backbone_fingerprint: str,
    allow_backbone_mismatch: bool = False,
) -> dict[str, Tensor]:
    """The tensors at `path`, refused unless their names and shapes are `expected`'s (the model's) and
    the backbone they record is `backbone_fingerprint` (the model's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"refiner weights {path} not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        recorded = (f.metadata() or {}).get(FINGERPRINT_KEY)
        check_fingerprint(
            recorded,
            backbone_fingerprint,
            what=f"refiner weights {path}",
            backbone="this model's backbone",
            allow_mismatch=allow_backbone_mismatch,
        )
        stored = {name: f.get_tensor(name) for name in f.keys()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"refiner weights {path} do not match this model's refiners "
            f"({', '.join(refiners) or 'none'}): missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; build the model with the HybridConfig they were "
            "trained with"
        )
    bad = sorted(n for n, t in stored.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:  # as a run checkpoint's are: a NaN refiner would only show up as empty or garbage answers
        raise CheckpointError(
            f"refiner weights {path} hold NaN/inf values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); the file is broken, export or train the run again"
        )
    for name, tensor in stored.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"refiner weights {path}: {name} has shape {list(tensor.shape)}, the model expects "
                f"{list(expected[name].shape)}; build the model with the HybridConfig it was trained with"
            )
    return stored
