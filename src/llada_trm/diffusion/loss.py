"""LLaDA's masked-diffusion objective and the masked-token accuracy that goes with it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]


def _per_row(values: Tensor | int, batch_size: int, device: torch.device, name: str) -> Tensor:
    """Accept [B], [B, 1] or a scalar and return a float [B] tensor."""
    values = torch.as_tensor(values, device=device, dtype=torch.float32)
    if values.dim() == 0:
        return values.expand(batch_size)
    values = values.reshape(-1)
    if values.numel() != batch_size:
        raise ValueError(f"{name} has {values.numel()} entries but the batch has {batch_size} rows")
    return values


def masked_diffusion_loss(
    logits: Tensor,
    target_ids: Tensor,
    masked: Tensor,
    p_mask: Tensor,
    answer_lengths: Tensor | int,
    reduction: Reduction = "mean",
    token_weights: Tensor | None = None,
) -> Tensor:
    """LLaDA's SFT loss: ``sum_i sum_{masked l} CE(l) / p_mask / answer_length_i / B``.

    The 1/p_mask weight makes the objective an upper bound on the negative log-likelihood; dividing by the
    answer length (every token after the prompt, padded EOS included, as LLaDA counts it) keeps long and short
    answers on the same footing. With no prompt (answer length = L) this is exactly LLaDA's pre-training loss
    ``sum(CE / p_mask) / (B * L)``.

    Args:
        logits: [B, L, V]. Cross-entropy is taken in float32 whatever the logits' dtype.
        target_ids: [B, L] clean tokens x_0.
        masked: [B, L] bool, the positions that were masked in the model's input.
        p_mask: [B, L] (or [B]) masking probability of each row.
        answer_lengths: [B] (or [B, 1], or one int for all rows).
        reduction: ``"mean"`` (LLaDA: summed over rows, divided by B), ``"sum"`` (summed over rows) or
            ``"none"`` (the [B] per-sequence losses, whose mean is the ``"mean"`` value).
        token_weights: optional [B, L] factor on each position's term (None: LLaDA's loss). A weight above 1
            on a few token kinds is how `llada-trm pretrain` makes rare-but-decisive tokens (the answer's
            object noun) worth learning; it is no longer a likelihood bound then.
    """
    if logits.dim() != 3 or logits.shape[:2] != target_ids.shape or masked.shape != target_ids.shape:
        raise ValueError(
            f"expected logits [B, L, V] with target_ids and masked [B, L]; got {tuple(logits.shape)}, "
            f"{tuple(target_ids.shape)}, {tuple(masked.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    batch_size, seq_len = target_ids.shape
    masked = masked.bool()
    if p_mask.dim() == 1:
        p_mask = p_mask[:, None].expand(batch_size, seq_len)
    answer_lengths = _per_row(answer_lengths, batch_size, logits.device, "answer_lengths")

    # Only masked positions contribute, so gather them before the (vocabulary-sized) cross-entropy.
    rows = masked.nonzero(as_tuple=True)[0]
    token_ce = F.cross_entropy(logits[masked].float(), target_ids[masked], reduction="none")
    token_loss = token_ce / p_mask[masked].float() / answer_lengths[rows]
    if token_weights is not None:
        if token_weights.shape != target_ids.shape:
            raise ValueError(f"token_weights must be [B, L] = {list(target_ids.shape)}, "
                             f"got {list(token_weights.shape)}")  # fmt: skip
        token_loss = token_loss * token_weights[masked].float()

    if reduction == "none":
        per_row = torch.zeros(batch_size, device=logits.device, dtype=token_loss.dtype)
        return per_row.index_add(0, rows, token_loss)
    total = token_loss.sum()
    return total / batch_size if reduction == "mean" else total


def masked_token_accuracy(logits: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """Fraction of masked positions whose argmax prediction equals the target (0 when nothing is masked)."""
    masked = masked.bool()
    correct = (logits.argmax(dim=-1) == targets) & masked
    return correct.sum().float() / masked.sum().clamp(min=1).float()
