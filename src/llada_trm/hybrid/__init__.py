"""Backbone + recursive refiner: chunked selective refinement with per-chunk halting (see `hybrid.model`)."""

from llada_trm.hybrid.config import HybridConfig
from llada_trm.hybrid.model import (
    BackboneFeatures,
    HybridOutput,
    LLaDATRMHybrid,
    chunk_confidence,
    expand_chunks,
    max_probability,
    num_chunks,
)

__all__ = [
    "BackboneFeatures",
    "HybridConfig",
    "HybridOutput",
    "LLaDATRMHybrid",
    "chunk_confidence",
    "expand_chunks",
    "max_probability",
    "num_chunks",
]
