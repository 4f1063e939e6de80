"""The refiners' weights file (`save_refiner` / `load_refiner`): only the `refinement_head.*` tensors.

Written atomically (temporary name, then rename) with the integration and refiner kinds as metadata; read
back only when its names and shapes are exactly the model's, else a one-line `CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from llada_trm.errors import CheckpointError
from llada_trm.io import atomic_path

__all__ = ["read_refiner_weights", "write_refiner_weights"]


def write_refiner_weights(
    path: str | Path, state: Mapping[str, Tensor], *, integration: str, refiners: Sequence[str]
) -> Path:
    """`state` (the refiners' tensors under their full names) to safetensors at `path`."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    if not tensors:
        raise ValueError("this model has no refiner (refiner='none'); there is nothing to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"integration": integration, "refiners": ",".join(refiners)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_refiner_weights(
    path: str | Path, expected: Mapping[str, Tensor], refiners: Sequence[str]
) -> dict[str, Tensor]:
    """The tensors at `path`, refused unless their names and shapes are `expected`'s (the model's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"refiner weights {path} not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
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
    for name, tensor in stored.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"refiner weights {path}: {name} has shape {list(tensor.shape)}, the model expects "
                f"{list(expected[name].shape)}; build the model with the HybridConfig it was trained with"
            )
    return stored
