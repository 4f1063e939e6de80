"""What a hybrid forward pass returns: the backbone's features and the refined output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from llada_trm.backbone.kv_cache import KVCache


class BackboneFeatures:
    """The backbone's part of a forward pass.

    `contexts` is the average of the requested layers' attention contexts [B, L, n_heads*head_dim] (None when
    no layer is requested). `masked` [B, L] (input_ids == mask id) and `attention_mask` [B, L] ride along so
    that `refine(features)` needs nothing else; both may be None (e.g. features rebuilt from a cache).
    With a KV cache the tensors cover a window of the sequence: `position_offset` is the absolute position of
    its first row (it anchors the chunks) and `past_key_values` the backbone's cache when one was asked for.

    `base_logits` are computed on first read by `lm_head` when not given: a refining forward that reads no
    backbone logit (every refined row's logits come from refined states) runs the LM head once, on its
    output, instead of once for the backbone and again for the refined rows (issue 29).
    """

    def __init__(  # noqa: PLR0913 - the fields of one record
        self,
        hidden_states: Tensor,
        base_logits: Tensor | None = None,
        contexts: Tensor | None = None,
        masked: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_offset: int = 0,
        past_key_values: KVCache | None = None,
        lm_head: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.hidden_states = hidden_states
        self._base_logits = base_logits
        self.contexts = contexts
        self.masked = masked
        self.attention_mask = attention_mask
        self.position_offset = position_offset
        self.past_key_values = past_key_values
        self.lm_head = lm_head

    @property
    def base_logits(self) -> Tensor | None:
        """The backbone's logits [B, L, V]: as given, or `lm_head(hidden_states)` computed once when read."""
        if self._base_logits is None and self.lm_head is not None:
            self._base_logits = self.lm_head(self.hidden_states)
        return self._base_logits

    @property
    def base_logits_given(self) -> bool:
        """Whether the base logits exist already (given, or read once): then reading them costs nothing."""
        return self._base_logits is not None


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
    `base_logits` (the backbone's) are computed when first read if the forward did not need them.
    """

    logits: Tensor
    step_logits: list[Tensor]
    features: BackboneFeatures
    hidden_states: Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    step_confidence: list[Tensor] = field(default_factory=list)
    past_key_values: KVCache | None = None
    halt_logits: list[Tensor] = field(default_factory=list)
    halt_chunks: list[Tensor] = field(default_factory=list)

    @property
    def base_logits(self) -> Tensor:
        """The backbone's logits [B, L, V] (one LM-head pass over h_0 when the forward did not run one)."""
        return self.features.base_logits
