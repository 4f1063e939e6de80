"""The MLP baseline refiner: the slot refiner's interface without slots or attention.

    u      = LN(h) [+ W_ext · backbone context]
    h_next = h + delta_scale · clamp(MLP(u), -c, c)
    p      = sigmoid(head(u))            per-token confidence, reported only

The update is not confidence-weighted, so the confidence head gets no gradient from the language-modelling
loss: it is reported only (about 0.5, untrained).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from llada_trm.model.refiners.base import (
    ContextInput,
    Refiner,
    RefinerState,
    apply_update,
    check_active,
    context_list,
)
from llada_trm.model.refiners.config import MLPRefinerConfig


class RecursiveRefinementHead(Refiner):
    """MLP baseline refiner, built from an `MLPRefinerConfig` or keywords (`RecursiveRefinementHead(
    d_model=64)`); its stats have empty `slot_norms` and `gates`."""

    def __init__(self, config: MLPRefinerConfig | int | None = None, **overrides: Any) -> None:
        super().__init__()
        config = self._configure(MLPRefinerConfig, config, overrides)

        self.norm = nn.LayerNorm(config.d_model)
        self.context_proj = None
        if config.context_dim is not None:
            self.context_proj = nn.Linear(config.context_dim, config.d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.d_model),
        )
        self.confidence_head = nn.Linear(config.d_model, 1)
        # Near-identity start with gradient still reaching the first layer (see SlotTRMRefiner).
        nn.init.normal_(self.mlp[-1].weight, std=1e-3)
        nn.init.zeros_(self.mlp[-1].bias)

    def step(
        self,
        h: Tensor,
        state: RefinerState,
        *,
        context: ContextInput = None,
        active: Tensor | None = None,
        attention_mask: Tensor | None = None,  # unused: a per-token refiner cannot attend to padding
    ) -> tuple[Tensor, RefinerState, dict[str, Any]]:
        active = check_active(active, h)
        external = context_list(context, h, self.config.context_dim, "RecursiveRefinementHead")
        rows = self.pack(active)  # a per-token refiner computes only the active rows
        h_in = h if rows is None else rows.gather(h)
        dtype = self.mlp[-1].weight.dtype
        u = self.norm(h_in.to(dtype))
        if external:
            contexts = external if rows is None else [rows.gather(c) for c in external]
            u = u + torch.stack([self.context_proj(c.to(dtype)) for c in contexts]).mean(dim=0)

        delta = self.mlp(u).clamp(-self.delta_clamp, self.delta_clamp)
        update = (self.delta_scale * delta).to(h.dtype)
        confidence = torch.sigmoid(self.confidence_head(u)).squeeze(-1)
        if rows is not None:  # back to [B, L]; rows that were not computed read zero
            update = rows.scatter(update, length=h.shape[1])
            confidence = rows.scatter(confidence, length=h.shape[1])
        h_next, update = apply_update(h, update, active)

        step_stats: dict[str, Any] = {
            "confidence": confidence,
            "update_norm": update.detach().float().norm(dim=-1),
        }
        return h_next, RefinerState(steps=state.steps + 1), step_stats
