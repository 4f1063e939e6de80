"""The MLP baseline refiner: the slot refiner's interface without slots or attention.

    u      = LN(h) [+ W_ext · backbone context]
    h_next = h + delta_scale · clamp(MLP(u), -c, c)
    p      = sigmoid(head(u))            per-token confidence, reported only

Unlike the slot refiner, the baseline's update is not confidence-weighted, so its confidence head receives no
gradient from the language-modelling loss: it is a probe that a confidence-calibration loss (on
`step_stats["confidence"]`) trains. Untrained, it reports about 0.5, which is honest: it knows nothing yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llada_trm.errors import ConfigError
from llada_trm.refiners.base import (
    ContextInput,
    Refiner,
    RefinerState,
    apply_update,
    check_active,
    context_list,
)
from llada_trm.refiners.rows import ActiveRows

DEFAULT_MAX_HIDDEN = 1024


@dataclass
class MLPRefinerConfig:
    """Hyper-parameters of `RecursiveRefinementHead`.

    hidden_dim: MLP width (default min(2 * d_model, 1024): about 8M parameters at d_model=4096).
    context_dim: width of external contexts, added through a learned projection; None: no context input.
    """

    d_model: int
    num_steps: int = 4
    hidden_dim: int | None = None
    delta_scale: float = 0.1
    delta_clamp: float = 0.5
    dropout: float = 0.0
    context_dim: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_dim is None and isinstance(self.d_model, int):
            self.hidden_dim = min(2 * self.d_model, DEFAULT_MAX_HIDDEN)
        for name, minimum in (("d_model", 1), ("num_steps", 0), ("hidden_dim", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"MLPRefinerConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.context_dim is not None and (not isinstance(self.context_dim, int) or self.context_dim < 1):
            raise ConfigError(
                f"MLPRefinerConfig.context_dim must be a positive int or None, got {self.context_dim!r}"
            )
        for name in ("delta_scale", "delta_clamp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"MLPRefinerConfig.{name} must be a positive number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MLPRefinerConfig.dropout must be in [0, 1), got {self.dropout!r}")


class RecursiveRefinementHead(Refiner):
    """MLP baseline refiner with the `Refiner` interface (same chunk-mask semantics and stats keys).

    Build it from an `MLPRefinerConfig` or keywords: `RecursiveRefinementHead(d_model=64, num_steps=2)`.
    Its stats have empty `slot_norms` and `gates`; `orthogonality_loss()` is zero.
    """

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
        rows = ActiveRows.pack(active)  # a per-token refiner computes only the active rows
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
