"""LLaDA's Monte-Carlo estimate of log p(continuation | context) for a masked-diffusion model.

A masked-diffusion model has no left-to-right factorisation to sum, so, like LLaDA (its paper's eq. 6, used
by its lm-eval script), we score a continuation of L tokens by the bound

    -log p(c | x) <= E_l [ (L / l) * sum over the l masked positions of CE(model([x, c with l masked]), c) ]

with l uniform on {1, ..., L} and the l positions uniform among the continuation's (the context is never
masked). Each draw is one forward pass; the estimate is the mean over `mc_num` draws. The draws of l are
stratified (t_i = (i + u) / n for one u ~ U[0, 1), l_i = ceil(t_i * L)): each l_i is still uniform on
{1..L}, so the estimate is unbiased, with less variance than independent draws. It estimates the bound, not
log p itself: it is what LLaDA reports, comparable across masked-diffusion models, not with causal LMs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]


def masked_counts(length: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """[n] stratified masked counts l_i = ceil((i + u) / n * length), each uniform on {1..length}."""
    offset = torch.rand((), generator=generator)
    t = (torch.arange(n, dtype=torch.float64) + offset.double()) / n
    return torch.ceil(t * length).long().clamp_(1, length)


def random_masks(counts: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
    """[n, length] booleans, row i True at counts[i] positions drawn uniformly without replacement."""
    ranks = torch.rand((counts.numel(), length), generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def _sequence(context: Sequence[int], continuation: Sequence[int], device: torch.device) -> Tensor:
    return torch.tensor([*context, *continuation], dtype=torch.long, device=device)


@torch.no_grad()
def mc_log_likelihood(
    logits_fn: LogitsFn,
    context: Sequence[int],
    continuation: Sequence[int],
    *,
    mask_id: int,
    mc_num: int = 128,
    mc_batch_size: int = 32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> float:
    """The Monte-Carlo estimate of log p(continuation | context) (module docstring), over `mc_num` draws.

    `logits_fn` maps [B, T] token ids to [B, T, V] logits. Draws run `mc_batch_size` at a time; `generator`
    (a CPU generator) makes the estimate reproducible.
    """
    length = len(continuation)
    if length == 0:
        raise ValueError("mc_log_likelihood needs a non-empty continuation")
    if mc_num < 1 or mc_batch_size < 1:
        raise ValueError(f"mc_num ({mc_num}) and mc_batch_size ({mc_batch_size}) must be positive")
    device = torch.device(device)
    sequence = _sequence(context, continuation, device)
    start = len(context)
    target = sequence[start:]
    counts = masked_counts(length, mc_num, generator)
    masks = random_masks(counts, length, generator).to(device)
    total = 0.0
    for first in range(0, mc_num, mc_batch_size):
        mask = masks[first : first + mc_batch_size]
        batch = sequence.repeat(mask.shape[0], 1)
        batch[:, start:] = torch.where(mask, mask_id, target)
        logits = logits_fn(batch)[:, start:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), target.expand_as(mask), reduction="none")
        weight = length / counts[first : first + mask.shape[0]].to(device=device, dtype=torch.float32)
        total += float(((nll * mask).sum(dim=1) * weight).sum())
    value = -total / mc_num
    if not math.isfinite(value):
        raise ValueError("mc_log_likelihood: the model's logits gave a non-finite loss")
    return value


@torch.no_grad()
def greedy_matches(
    logits_fn: LogitsFn,
    context: Sequence[int],
    continuation: Sequence[int],
    *,
    mask_id: int,
    device: torch.device | str = "cpu",
) -> bool:
    """Whether one forward over the fully masked continuation predicts every continuation token (argmax)."""
    sequence = _sequence(context, continuation, torch.device(device))
    start = len(context)
    masked = sequence.clone()
    masked[start:] = mask_id
    predicted = logits_fn(masked[None])[0, start:].argmax(dim=-1)
    return bool((predicted == sequence[start:]).all())
