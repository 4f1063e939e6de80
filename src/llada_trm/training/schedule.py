"""AdamW over the freezing plan's parameter groups, and linear-warmup-then-cosine learning rates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from llada_trm.training.freezing import ParamGroupSpec

__all__ = ["build_optimizer", "build_scheduler", "resolve_warmup_steps", "warmup_cosine"]


def build_optimizer(
    groups: Sequence[ParamGroupSpec],
    *,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    """AdamW with one decayed and one undecayed group per plan group.

    Matrices decay; biases, norm gains and other vectors do not (decaying a norm's gain towards zero only
    shrinks activations). Each optimizer group keeps the plan group's name and LR.
    """
    param_groups = []
    for group in groups:
        decay = [p for p in group.params.values() if p.ndim >= 2]
        no_decay = [p for p in group.params.values() if p.ndim < 2]
        if decay:
            param_groups.append(
                {"params": decay, "lr": group.lr, "weight_decay": weight_decay, "name": group.name}
            )
        if no_decay:
            param_groups.append(
                {"params": no_decay, "lr": group.lr, "weight_decay": 0.0, "name": f"{group.name}/no_decay"}
            )
    if not param_groups:
        raise ValueError("no trainable parameters: check training_params.trainable_modules")
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup up to 1 over `warmup_steps`, then cosine down to `min_ratio`.

    `step` counts optimizer steps already taken (LambdaLR's `last_epoch`), so the first update uses
    1/warmup rather than 0 and no step is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Explicit `warmup_steps` wins; otherwise `warmup_ratio` of the run (rounded)."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return int(round(warmup_ratio * total_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    """A LambdaLR applying `warmup_cosine` to every group's own base LR (head and backbone alike)."""

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

    return LambdaLR(optimizer, factor)
