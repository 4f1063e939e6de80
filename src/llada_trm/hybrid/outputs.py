"""What a hybrid forward pass returns: the backbone's features and the refined output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from llada_trm.backbone.kv_cache import KVCache


@dataclass
class BackboneFeatures:
    """The backbone's part of a forward pass.

    `contexts` is the average of the requested layers' attention contexts [B, L, n_heads*head_dim] (None when
    no layer is requested). `masked` [B, L] (input_ids == mask id) and `attention_mask` [B, L] ride along so
    that `refine(features)` needs nothing else; both may be None (e.g. features rebuilt from a cache).
    With a KV cache the tensors cover a window of the sequence: `position_offset` is the absolute position of
    its first row (it anchors the chunks) and `past_key_values` the backbone's cache when one was asked for.
    """

    hidden_states: Tensor
    base_logits: Tensor
    contexts: Tensor | None = None
    masked: Tensor | None = None
    attention_mask: Tensor | None = None
    position_offset: int = 0
    past_key_values: KVCache | None = None


@dataclass
class HybridOutput:
    """Result of `LLaDATRMHybrid.refine` / `forward`.

    `step_logits[k-1]` are the logits after step k (empty without a refiner or when step logits are off);
    a chunk that halted or was never refined keeps its last logits in the later entries. `step_confidence`
    holds the refiner's own per-position confidence of each step (not detached: a calibration loss may train
    it); a halted chunk keeps its last step's value, a never-refined one reads zero. `stats` are detached
    numbers and small tensors (see `LLaDATRMHybrid.refine`); after a refining call the counts, fractions,
    norms and gates are 0-d tensors, so that the forward makes no host sync for them (`float()` them where
    they are logged). With learned halting and step logits,
    `halt_logits[k]` [B, C] are the halting head's chunk logits after step k+1 (a graph to the head only) and
    `halt_chunks[k]` [B, C] bool the chunks they are defined for (`hybrid.halting.HaltTrace`).
    """

    logits: Tensor
    step_logits: list[Tensor]
    base_logits: Tensor
    hidden_states: Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    step_confidence: list[Tensor] = field(default_factory=list)
    past_key_values: KVCache | None = None
    halt_logits: list[Tensor] = field(default_factory=list)
    halt_chunks: list[Tensor] = field(default_factory=list)
