"""Recursive refinement heads applied to the backbone's final hidden states (see `refiners.base`)."""

from __future__ import annotations

from typing import Any

import torch

from llada_trm.refiners.base import Refiner, RefinerState
from llada_trm.refiners.blocks import AttentionContextExtractor, TransformerBlock
from llada_trm.refiners.carry import RefinerCarry
from llada_trm.refiners.config import (
    MLPRefinerConfig,
    MLPSettings,
    SlotConfig,
    SlotSettings,
    mlp_hidden_for_params,
    mlp_parameter_count,
)
from llada_trm.refiners.halting import HaltingHead
from llada_trm.refiners.mlp import RecursiveRefinementHead
from llada_trm.refiners.rows import ActiveRows
from llada_trm.refiners.slot import (
    SLOT_NAMES,
    SlotOutput,
    SlotProjector,
    SlotStep,
    SlotTRMRefiner,
    create_slot_trm_refiner,
    slot_step,
)
from llada_trm.refiners.stats import StatsAccumulator

REFINER_KINDS = ("mlp", "slot")


def build_refiner(kind: str, d_model: int, **kwargs: Any) -> Refiner:
    """Build a refiner by name: 'slot' (`SlotTRMRefiner`, kwargs = `SlotConfig` fields) or 'mlp'
    (`RecursiveRefinementHead`, kwargs = `MLPRefinerConfig` fields)."""
    if kind == "slot":
        return SlotTRMRefiner(SlotConfig(d_model=d_model, **kwargs))
    if kind == "mlp":
        return RecursiveRefinementHead(MLPRefinerConfig(d_model=d_model, **kwargs))
    raise ValueError(f"unknown refiner kind {kind!r}; choose one of {list(REFINER_KINDS)}")


def slot_parameter_count(d_model: int, **kwargs: Any) -> int:
    """Parameters of the slot refiner `build_refiner('slot', d_model, **kwargs)` would build, counted on the
    meta device (no memory, no initialisation): the budget of the equal-size MLP control."""
    with torch.device("meta"):
        return build_refiner("slot", d_model, **kwargs).num_parameters()


__all__ = [
    "ActiveRows",
    "REFINER_KINDS",
    "SLOT_NAMES",
    "AttentionContextExtractor",
    "HaltingHead",
    "MLPRefinerConfig",
    "MLPSettings",
    "RecursiveRefinementHead",
    "Refiner",
    "RefinerCarry",
    "RefinerState",
    "SlotConfig",
    "SlotSettings",
    "SlotOutput",
    "SlotProjector",
    "SlotStep",
    "SlotTRMRefiner",
    "StatsAccumulator",
    "TransformerBlock",
    "build_refiner",
    "create_slot_trm_refiner",
    "mlp_hidden_for_params",
    "mlp_parameter_count",
    "slot_parameter_count",
    "slot_step",
]
