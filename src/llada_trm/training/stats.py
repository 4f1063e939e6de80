"""Refiner statistics flattened into CSV columns: slot norms, gate openings, deltas, orthogonality.

Two sources: the per-forward stats the hybrid model returns (`HybridOutput.stats`: refinement steps, skipped
fraction, confidence, delta norms, slot norms, gates) and the refiners' parameters (gates, projection norms,
the orthogonality penalty). Column names are `slot_norm_<slot>`, `gate_<name>`, `delta_norm`, ... — the names
the health checks read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llada_trm.hybrid.chunking import chunk_sum

__all__ = ["forward_statistics", "gate_values", "mean_of", "parameter_statistics"]


def mean_of(value: Any) -> float | None:
    """A float summary of a stat: scalars as they are, tensors and lists by their (finite) mean."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.detach().float().mean().item())
    if isinstance(value, list | tuple):
        numbers = [v for v in (mean_of(x) for x in value) if v is not None and math.isfinite(v)]
        return sum(numbers) / len(numbers) if numbers else None
    return None


def forward_statistics(
    stats: Mapping[str, Any], masked: torch.Tensor | None = None, chunk_size: int | None = None
) -> dict[str, float]:
    """Flatten `HybridOutput.stats` into loggable floats.

    Per-step lists (`delta_norms`) become their mean plus the first and last steps' values; dicts of slot
    norms and gates become one column per entry. Given the batch's `masked` positions and the chunk size,
    two columns look only at chunks that hold a masked position (prompt chunks never do, so they would
    dilute the picture): `skipped_fraction_masked` (such chunks left unrefined) and `chunk_confidence` (the
    backbone's mean confidence on them).
    """
    row: dict[str, float] = {}
    for key in ("refine_steps", "skipped_fraction", "chunks_total", "chunks_refined", "confidence"):
        value = mean_of(stats.get(key))
        if value is not None:
            row[key] = value
    if masked is not None and chunk_size is not None:
        candidates = chunk_sum(masked.float(), chunk_size) > 0
        n = int(candidates.sum())
        refined = mean_of(stats.get("chunks_refined"))
        if n and refined is not None:
            row["skipped_fraction_masked"] = 1.0 - refined / n
        confidence = stats.get("chunk_confidence")
        if n and isinstance(confidence, torch.Tensor) and confidence.shape == candidates.shape:
            row["chunk_confidence"] = float(confidence[candidates].float().mean())
    deltas = stats.get("delta_norms")
    if isinstance(deltas, list | tuple) and deltas:
        row["delta_norm"] = mean_of(deltas)
        row["delta_norm_first"] = mean_of(deltas[0])
        row["delta_norm_last"] = mean_of(deltas[-1])
    for name, value in (stats.get("slot_norms") or {}).items():
        number = mean_of(value)
        if number is not None:
            row[f"slot_norm_{name}"] = number
    for name, value in (stats.get("gates") or {}).items():
        number = mean_of(value)
        if number is not None:
            row[f"gate_{name}"] = number
    return {k: v for k, v in row.items() if v is not None}


@torch.no_grad()
def gate_values(module: nn.Module) -> dict[str, float]:
    """Gate openings sigmoid(g) of every parameter whose name has a `gate` component.

    A gate may be a scalar, a vector or a matrix (per-channel gates); it reports its mean opening, so logging
    never breaks on a gate's shape. Refiners that define `gate_values()` are asked directly instead.
    """
    own = getattr(module, "gate_values", None)
    if callable(own):
        return {str(k): float(v) for k, v in own().items()}
    values = {}
    for name, param in module.named_parameters():
        parts = name.split(".")
        if any("gate" in part for part in parts):
            key = "_".join(p for p in parts if p not in ("gate", "gates", "weight")) or name
            values[key] = torch.sigmoid(param.detach().float()).mean().item()
    return values


@torch.no_grad()
def parameter_statistics(model: nn.Module) -> dict[str, float]:
    """Gates, projection norms and orthogonality of each refiner under `model.refinement_head`.

    With one refiner the columns are plain (`gate_ctx`); with two (hybrid / cascade) the refiner's key goes
    after the column's kind (`gate_slot_ctx`, `orthogonality_slot`) so the two never overwrite each other
    and the health checks still find every gate.
    """
    heads = getattr(model, "refinement_head", None)
    if heads is None:
        return {}
    refiners = dict(heads.items()) if isinstance(heads, nn.ModuleDict) else {"": heads}
    row: dict[str, float] = {}
    for key, refiner in refiners.items():
        own = getattr(refiner, "slot_statistics", None)
        stats = dict(own()) if callable(own) else {f"gate_{k}": v for k, v in gate_values(refiner).items()}
        if "orthogonality" not in stats and hasattr(refiner, "orthogonality_loss"):
            stats["orthogonality"] = float(refiner.orthogonality_loss().detach().float().item())
        for name, value in stats.items():
            number = mean_of(value)
            if number is not None:
                row[_qualify(name, key) if len(refiners) > 1 else name] = number
    return row


def _qualify(column: str, refiner: str) -> str:
    kind, sep, rest = column.partition("_")
    return f"{kind}_{refiner}_{rest}" if sep else f"{column}_{refiner}"
