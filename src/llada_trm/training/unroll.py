"""Deep supervision over denoising steps (TRM's N_sup): a short simulated trajectory per training example.

    x_1, masked_1, p_1 = the forward process's draw (the one-step objective's)
    out_s       = model(x_s, masked_s, carry)                               s = 1 .. n_sup
    commit_s    = in each row, the floor(fraction * |masked_s|) masked positions where out_s is most confident
    x_{s+1}     = x_s with the targets written at commit_s;   masked_{s+1} = masked_s minus commit_s
    p_{s+1}     = p_s * |masked_{s+1}| / |masked_s|                          the realised mask ratio
    L           = mean_s L(out_s)                                            each step's whole objective

The positions are committed as the sampler commits them (the model's own most confident predictions,
detached), but what is written there is the target, so that every state is a partly un-masked copy of its
own answer and each step's loss has its targets. With the model's `denoising_carry` on, one `RefinerCarry`
runs through the trajectory: step s+1's first refinement resumes from step s's latents, which the carry
holds detached, so no gradient crosses a denoising step. Off, the steps are independent refinements of
successive states. A training-loop feature, off unless `training_params.denoising_unroll_steps` > 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from llada_trm.config import RunConfig
from llada_trm.errors import ConfigError
from llada_trm.hybrid import HybridOutput, max_probability
from llada_trm.refiners import RefinerCarry

__all__ = ["DenoisingUnroll", "next_state", "unrolled_states"]

Forward = Callable[[Tensor, Tensor, RefinerCarry | None], HybridOutput]
Noise = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class DenoisingUnroll:
    """`steps` (n_sup >= 2) supervised denoising steps; each commits `fraction` of the masked positions."""

    steps: int
    fraction: float

    @classmethod
    def for_run(cls, config: RunConfig) -> DenoisingUnroll | None:
        """The run's unroll, or None when `training_params.denoising_unroll_steps` <= 1 (off)."""
        params = config.training_params
        if params.denoising_unroll_steps <= 1:
            return None
        if config.advanced.feature_cache:
            raise ConfigError(
                "training_params.denoising_unroll_steps > 1 runs the backbone on each step's new state, but "
                "advanced.feature_cache stores one state per draw; set one of them off"
            )
        return cls(params.denoising_unroll_steps, params.denoising_unroll_fraction)


def next_state(logits: Tensor, targets: Tensor, noise: Noise, fraction: float) -> Noise:
    """The trajectory's next `(noisy, masked, p_mask)`: commit the most confident `fraction` of each row's
    masked positions (ties by position, as a stable sort orders them) to their targets."""
    noisy, masked, p_mask = noise
    confidence = max_probability(logits.detach()).masked_fill(~masked, -torch.inf)
    count = masked.sum(dim=1)
    commit_count = torch.floor(count.float() * fraction).long()
    order = torch.argsort(confidence, dim=1, descending=True, stable=True)
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)  # each position's place in the order
    commit = masked & (rank < commit_count[:, None])
    remaining = masked & ~commit
    ratio = remaining.sum(dim=1).float() / count.clamp(min=1).float()
    ratio = ratio if p_mask.dim() == 1 else ratio[:, None]
    return torch.where(commit, targets, noisy), remaining, p_mask * ratio


def unrolled_states(
    forward: Forward, targets: Tensor, noise: Noise, unroll: DenoisingUnroll, carry: RefinerCarry | None
) -> Iterator[tuple[HybridOutput, Tensor, Tensor]]:
    """`(output, masked, p_mask)` of each of the `unroll.steps` denoising steps, in order; the next state is
    drawn from each output only after the caller has taken it (so each step's loss is built in turn)."""
    for step in range(unroll.steps):
        output = forward(noise[0], noise[1], carry)
        yield output, noise[1], noise[2]
        if step + 1 < unroll.steps:
            noise = next_state(output.logits, targets, noise, unroll.fraction)
