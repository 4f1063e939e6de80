"""llada-trm: a LLaDA masked-diffusion language model with a recursive slot-based refinement head.

The public names are loaded lazily so that `import llada_trm` stays cheap (the CLI imports torch and
transformers only for the commands that need them) and so that users never need the module layout.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "LLaDAConfig": "llada_trm.backbone",
    "LLaDAModel": "llada_trm.backbone",
    "BackboneOutput": "llada_trm.backbone",
    "SlotConfig": "llada_trm.refiners",
    "SlotTRMRefiner": "llada_trm.refiners",
    "RecursiveRefinementHead": "llada_trm.refiners",
    "AttentionContextExtractor": "llada_trm.refiners",
    "SlotProjector": "llada_trm.refiners",
    "TransformerBlock": "llada_trm.refiners",
    "build_refiner": "llada_trm.refiners",
    "LLaDATRMHybrid": "llada_trm.hybrid",
    "HybridConfig": "llada_trm.hybrid",
    "generate": "llada_trm.diffusion",
    "generate_with_stats": "llada_trm.diffusion",
    "load_config": "llada_trm.config",
    "RunConfig": "llada_trm.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llada_trm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - static analysers see the real imports
    from llada_trm.backbone import BackboneOutput, LLaDAConfig, LLaDAModel
    from llada_trm.config import RunConfig, load_config
    from llada_trm.diffusion import generate, generate_with_stats
    from llada_trm.hybrid import HybridConfig, LLaDATRMHybrid
    from llada_trm.refiners import (
        AttentionContextExtractor,
        RecursiveRefinementHead,
        SlotConfig,
        SlotProjector,
        SlotTRMRefiner,
        TransformerBlock,
        build_refiner,
    )
