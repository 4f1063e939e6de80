"""Recursive refinement heads applied to the backbone's final hidden states (see `refiners.base`)."""

from __future__ import annotations

from typing import Any

from llada_trm.refiners.base import ActiveRows, Refiner, RefinerState, StatsAccumulator
from llada_trm.refiners.config import MLPRefinerConfig, MLPSettings, SlotConfig, SlotSettings
from llada_trm.refiners.mlp import RecursiveRefinementHead
from llada_trm.refiners.slot import (
    SLOT_NAMES,
    AttentionContextExtractor,
    SlotOutput,
    SlotProjector,
    SlotTRMRefiner,
    TransformerBlock,
    create_slot_trm_refiner,
)

REFINER_KINDS = ("mlp", "slot")


def build_refiner(kind: str, d_model: int, **kwargs: Any) -> Refiner:
    """Build a refiner by name: 'slot' (`SlotTRMRefiner`, kwargs = `SlotConfig` fields) or 'mlp'
    (`RecursiveRefinementHead`, kwargs = `MLPRefinerConfig` fields)."""
    if kind == "slot":
        return SlotTRMRefiner(SlotConfig(d_model=d_model, **kwargs))
    if kind == "mlp":
        return RecursiveRefinementHead(MLPRefinerConfig(d_model=d_model, **kwargs))
    raise ValueError(f"unknown refiner kind {kind!r}; choose one of {list(REFINER_KINDS)}")


__all__ = [
    "ActiveRows",
    "REFINER_KINDS",
    "SLOT_NAMES",
    "AttentionContextExtractor",
    "MLPRefinerConfig",
    "MLPSettings",
    "RecursiveRefinementHead",
    "Refiner",
    "RefinerState",
    "SlotConfig",
    "SlotSettings",
    "SlotOutput",
    "SlotProjector",
    "SlotTRMRefiner",
    "StatsAccumulator",
    "TransformerBlock",
    "build_refiner",
    "create_slot_trm_refiner",
]
