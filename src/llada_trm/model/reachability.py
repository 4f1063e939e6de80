"""Can a refiner's update flip the backbone's wrong tokens at all? The update budget against the LM head
(docs/training.md, "The update budget", states the bound and the rule for `delta_scale`).

A wrong token can be flipped within K steps of bound b only if K * b > max_j (logit_j - logit_c) /
||w_c - w_j||_1 over the competitors j above the right token c (w the LM head's rows): the right side is its
*required bound*. Each condition is necessary, not sufficient (one delta must overtake them all at once), so
`reachable_fraction` is an upper bound on what any update within the budget can fix. Beyond the
`EXACT_COMPETITORS` highest competitors, the cheaper ||w_c||_1 + ||w_j||_1 (which can only lower the required
bound) stands in for the L1 distance (LLaDA-8B's vocabulary can put thousands above c).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

TARGET_REACHABILITY = 0.9
EXACT_COMPETITORS = 64


def step_bound(delta_scale: float, delta_clamp: float) -> float:
    """The most one refiner step moves a coordinate of h."""
    return delta_scale * delta_clamp


@torch.no_grad()
def required_bounds(
    logits: Tensor, targets: Tensor, rows_of: Callable[[Tensor], Tensor], exact: int = EXACT_COMPETITORS
) -> Tensor:
    """[N] per-coordinate bound each row needs for its target to overtake every competitor above it (0 where
    the target is already the argmax). `logits` [N, V], `targets` [N], `rows_of(ids)` the LM head's rows."""
    logits = logits.float()
    target_logit = logits.gather(-1, targets[:, None])
    gaps = logits - target_logit  # > 0: a competitor above the target
    gaps.scatter_(-1, targets[:, None], float("-inf"))
    out = torch.zeros(logits.shape[0], device=logits.device)
    target_rows = rows_of(targets).float()  # [N, d]
    target_norm = target_rows.abs().sum(-1)
    for i in range(logits.shape[0]):
        above = (gaps[i] > 0).nonzero().squeeze(-1)
        if above.numel() == 0:
            continue
        order = gaps[i, above].argsort(descending=True)
        above = above[order]
        near, far = above[:exact], above[exact:]
        distance = (rows_of(near).float() - target_rows[i]).abs().sum(-1)
        need = (gaps[i, near] / distance.clamp_min(1e-12)).max()
        if far.numel():
            loose = target_norm[i] + rows_of(far).float().abs().sum(-1)
            need = torch.maximum(need, (gaps[i, far] / loose.clamp_min(1e-12)).max())
        out[i] = need
    return out


def reachable_fraction(required: Tensor, total_bound: float) -> float:
    """Share of rows whose required bound `total_bound` (K steps times the step bound) exceeds."""
    if required.numel() == 0:
        return float("nan")
    return float((required < total_bound).float().mean())


def smallest_sufficient_scale(
    required: Tensor, steps: int, delta_clamp: float, candidates: Sequence[float]
) -> float | None:
    """The smallest `delta_scale` of `candidates` whose K-step budget reaches `TARGET_REACHABILITY`."""
    for scale in sorted(candidates):
        if reachable_fraction(required, steps * step_bound(scale, delta_clamp)) >= TARGET_REACHABILITY:
            return scale
    return None
