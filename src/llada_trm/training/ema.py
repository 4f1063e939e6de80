"""An exponential moving average of the trained weights (TRM evaluates with one: 87.4% vs 79.9% without).

    ema <- decay * ema + (1 - decay) * weights        after every optimizer step, starting from the weights

Only the trained tensors are averaged (at LLaDA-8B scale a copy of the frozen backbone would double the
memory). Checkpoints hold the average as the model's weights, so every reader (eval, compare, export)
evaluates it; the live weights travel in the trainer state so that a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """The average of `model`'s parameters named in `names` (those that train)."""

    def __init__(self, model: nn.Module, names: list[str], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        parameters = dict(model.named_parameters())
        self.decay = decay
        self.names = list(names)
        self.params = [parameters[name] for name in self.names]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the current weights."""
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1.0 - self.decay)

    def averaged(self) -> dict[str, Tensor]:
        """The averaged tensors by name (what a checkpoint's weights file holds)."""
        return {name: value.clone() for name, value in zip(self.names, self.shadow, strict=True)}

    def live(self) -> dict[str, Tensor]:
        """The live weights by name (what a resume continues from)."""
        return {name: p.detach().clone() for name, p in zip(self.names, self.params, strict=True)}

    @torch.no_grad()
    def restore(self, averaged: Mapping[str, Tensor], live: Mapping[str, Tensor]) -> None:
        """Set the average and the model's live weights from a checkpoint."""
        for name, shadow, param in zip(self.names, self.shadow, self.params, strict=True):
            shadow.copy_(averaged[name])
            param.copy_(live[name])
