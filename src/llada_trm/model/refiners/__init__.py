"""Recursive refinement heads applied to the backbone's final hidden states (see `model.refiners.base`): the
registry of refiner kinds. Each refiner lives in its own module; this package re-exports nothing."""

from __future__ import annotations

from typing import Any

import torch

from llada_trm.model.refiners.base import Refiner
from llada_trm.model.refiners.config import MLPRefinerConfig, SlotConfig
from llada_trm.model.refiners.mlp import RecursiveRefinementHead
from llada_trm.model.refiners.slot import SlotTRMRefiner

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
