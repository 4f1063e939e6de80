"""One denoising step's choice of tokens: predict every masked token, keep the confident ones.

Shared by LLaDA's fixed schedule (``sampler``) and Fast-dLLM's threshold decoding and cached blocks
(``fast_dllm``). Random draws happen in LLaDA's order, so seeded runs reproduce the reference bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llada_trm.diffusion.options import SamplingOptions


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Perturb logits so that their argmax is a sample from softmax(logits / temperature).

    ``exp(l) / (-log u) ** T`` is a monotone transform of ``l / T + Gumbel``. It is done in float64 because
    low-precision Gumbel-max degrades masked-diffusion samples (arXiv:2409.02908). Temperature 0 returns the
    logits themselves (greedy decoding, no random draw).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    uniform = torch.rand_like(logits, dtype=torch.float64, generator=generator)
    return logits.exp() / (-torch.log(uniform)) ** temperature


def get_num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to un-mask per step: the masked count spread evenly, remainder to the first steps.

    The linear noise schedule makes the expected number of tokens revealed per step constant.
    """
    masked_count = mask_index.sum(dim=1, keepdim=True)
    base, remainder = masked_count // steps, masked_count % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]
    return (base + (step < remainder).long()).to(torch.int64)


def _set_logit(logits: Tensor, token_id: int, value: float) -> Tensor:
    """Copy of ``logits`` with one vocabulary column overwritten (the model's own output stays intact)."""
    logits = logits.clone()
    logits[..., token_id] = value
    return logits


def _predict(
    logits: Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """x0 [B, L] (argmax of the Gumbel-perturbed logits) and each prediction's confidence [B, L].

    The Gumbel uniforms [B, L, V] are drawn first, then (``random`` remasking) the [B, L] confidences.
    """
    if options.logits_eos_inf:
        logits = _set_logit(logits, options.eos_id, -torch.inf)
    x0 = torch.argmax(add_gumbel_noise(logits, options.temperature, generator), dim=-1)
    if options.confidence_eos_eot_inf:
        # LLaDA writes -inf into the EOS column of the noisy logits and the EoT column of the clean ones; at
        # temperature 0 those are one tensor, so both columns reach the softmax, otherwise only EoT does.
        logits = _set_logit(logits, options.eot_id, -torch.inf)
        if options.temperature == 0:
            logits[..., options.eos_id] = -torch.inf
    if options.remasking == "random":
        return x0, torch.rand(x0.shape, device=x0.device, generator=generator)
    probs = F.softmax(logits.to(torch.float64) if options.float64_confidence else logits, dim=-1)
    return x0, torch.gather(probs, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)


def _chosen(
    confidence: Tensor,
    mask_index: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    threshold: float | None,
) -> Tensor:
    """[B, L] positions to un-mask: the ``num_transfer`` most confident ones per row, or (``threshold``) every
    masked one of the block at least that confident, and at least the most confident one."""
    transfer = torch.zeros_like(mask_index)
    for row in range(confidence.shape[0]):
        if threshold is None:
            k = int(num_transfer[row])
            if k > 0:
                transfer[row, torch.topk(confidence[row], k=k).indices] = True
            continue
        candidates = mask_index[row].clone()
        candidates[block_end:] = False
        if candidates.any():
            transfer[row] = candidates & (confidence[row] >= threshold)
            transfer[row, torch.topk(confidence[row], k=1).indices] = True
    return transfer


def _waiting_digits(x0: Tensor, mask_index: Tensor, block_end: int, digit_ids: tuple[int, ...]) -> Tensor:
    """[B, L] masked positions that `lsd_first` holds back: predicted a digit, with the right neighbour
    (inside the block) masked and predicted a digit too, i.e. a less significant digit of the same number."""
    if not digit_ids:
        raise ValueError(
            "digit_order 'lsd_first' needs digit_ids, the tokenizer's digit token ids "
            "(evaluate_model fills them in; pass SamplingOptions(digit_ids=...) when calling sample directly)"
        )
    pending = mask_index & torch.isin(x0, torch.tensor(digit_ids, device=x0.device))
    pending[:, block_end:] = False  # a number running past the block is ordered within the block
    waiting = torch.zeros_like(pending)
    waiting[:, :-1] = pending[:, :-1] & pending[:, 1:]
    return waiting


def _chosen_lsd_first(
    confidence: Tensor,
    mask_index: Tensor,
    waiting: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    threshold: float | None,
) -> Tensor:
    """`_chosen` with the digit order: a waiting position is committed only with (or after) its right
    neighbour. Fixed schedule: the ``num_transfer`` picks go one at a time to the most confident position
    not waiting, and a pick frees its left neighbour. Threshold: the positions at least ``threshold``
    confident whose waiting chain to the right is committed in the same step; if none, the most confident
    position not waiting."""
    transfer = torch.zeros_like(mask_index)
    for row in range(confidence.shape[0]):
        held = waiting[row].clone()
        if threshold is None:
            scores = confidence[row].clone()
            for _ in range(int(num_transfer[row])):
                pick = int(torch.argmax(scores.masked_fill(held, -torch.inf)))
                transfer[row, pick] = True
                scores[pick] = -torch.inf
                if pick > 0:
                    held[pick - 1] = False
            continue
        candidates = mask_index[row].clone()
        candidates[block_end:] = False
        if not candidates.any():
            continue
        passing = (candidates & (confidence[row] >= threshold)).tolist()
        held_list = held.tolist()
        allowed = [False] * len(passing)
        for position in range(min(block_end, len(passing)) - 1, -1, -1):
            allowed[position] = passing[position] and (not held_list[position] or allowed[position + 1])
        if any(allowed):
            transfer[row] = torch.tensor(allowed, device=transfer.device)
        else:
            transfer[row, int(torch.argmax(confidence[row].masked_fill(held, -torch.inf)))] = True
    return transfer


def commit_step(
    x: Tensor,
    logits: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    options: SamplingOptions,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Predict every masked token, then un-mask (in place in ``x``) the ones chosen by the schedule/threshold.

    ``x`` [B, L] may be a window (a view) of the sequence with ``logits`` [B, L, V] of the same positions and
    ``block_end`` relative to it; nothing past ``block_end`` is un-masked yet. ``num_transfer`` [B] is the
    schedule's count for this step, None under ``options.threshold``. Returns the [B, L] positions un-masked
    and every position's confidence (-inf where nothing was predicted): tensors computed anyway, for the
    sampler's per-step hook.

    ``options.digit_order == "lsd_first"`` changes which positions a step commits, never what it commits
    (each keeps this step's prediction) nor how many (the schedule's count, or every one the threshold
    allows and at least one). The number a masked position belongs to is read from this step's tokens: a
    number is a maximal run of positions whose token (the committed one, or this step's prediction where
    masked) is a digit. A masked position predicted a digit waits while its right neighbour inside the
    block is masked and predicted a digit: it is committed in the same step as that neighbour or later, so
    each number is committed from its least significant digit up. While the predictions of a number's
    positions stay the same from step to step (as for a model whose predictions do not depend on the
    context), this is exactly least-significant-first in the exact (fixed-schedule) sampler and in the
    threshold one; when a later step re-predicts a masked right neighbour as a digit after its left
    neighbour was committed, the order holds only for the predictions each step saw. A number that runs
    past the block's end is ordered within the block (the semi-autoregressive order comes first).
    """
    mask_index = x == options.mask_id
    x0, x0_p = _predict(logits, options, generator)
    x0_p[:, block_end:] = -torch.inf
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    if options.digit_order == "lsd_first":
        waiting = _waiting_digits(x0, mask_index, block_end, options.digit_ids)
        threshold = options.threshold
        transfer = _chosen_lsd_first(confidence, mask_index, waiting, block_end, num_transfer, threshold)
    else:
        transfer = _chosen(confidence, mask_index, block_end, num_transfer, options.threshold)
    x[transfer] = x0[transfer]
    return transfer, confidence
