"""Chunk bookkeeping for selective refinement.

The sequence axis is cut into consecutive chunks of `chunk_size` positions (the last one may be shorter). A
chunk's confidence is the backbone's mean max-softmax probability over its *masked* positions: only those are
predicted, so only they say whether the chunk still needs work. A chunk with no masked position has nothing to
predict; it is reported through `n_masked == 0` and never refined.
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_chunks(seq_len: int, chunk_size: int) -> int:
    """Number of chunks covering `seq_len` positions (ceil division)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return -(-seq_len // chunk_size)


def chunk_ids(seq_len: int, chunk_size: int, device: torch.device | None = None) -> torch.Tensor:
    """[L] index of the chunk each position belongs to."""
    return torch.arange(seq_len, device=device) // chunk_size


def expand_chunks(chunk_values: torch.Tensor, seq_len: int, chunk_size: int) -> torch.Tensor:
    """[B, C] per-chunk values -> [B, L] per-position values (each position takes its chunk's value)."""
    return chunk_values[:, chunk_ids(seq_len, chunk_size, chunk_values.device)]


def chunk_sum(values: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, L] -> [B, C]: sum of `values` inside each chunk (the short last chunk is zero-padded)."""
    batch, seq_len = values.shape
    n = num_chunks(seq_len, chunk_size)
    padded = values.new_zeros(batch, n * chunk_size)
    padded[:, :seq_len] = values
    return padded.view(batch, n, chunk_size).sum(dim=-1)


def max_probability(logits: torch.Tensor, rows_per_block: int = 1024) -> torch.Tensor:
    """[..., V] logits -> [...] max softmax probability, in float32.

    exp(max - logsumexp) equals max(softmax) without materialising the probabilities; rows are processed in
    blocks so that the float32 copy stays small even for thousands of positions over a 126k vocabulary.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows_per_block):
        block = flat[start : start + rows_per_block].float()
        out[start : start + rows_per_block] = torch.exp(block.amax(dim=-1) - torch.logsumexp(block, dim=-1))
    return out.view(logits.shape[:-1])


def chunk_confidence(
    token_confidence: torch.Tensor, masked: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean confidence over the masked positions of each chunk.

    Args:
        token_confidence: [B, L] per-position confidence (values at unmasked positions are ignored).
        masked: [B, L] bool, the positions that are predicted.
    Returns:
        confidence [B, C] float32 (1.0 for chunks without masked positions: nothing there is uncertain),
        n_masked [B, C] long, the number of masked positions in each chunk.
    """
    if token_confidence.shape != masked.shape:
        raise ValueError(
            f"token_confidence {tuple(token_confidence.shape)} and masked {tuple(masked.shape)} must match"
        )
    # where(), not a product: garbage (nan/inf) at unmasked positions must not leak into the sum.
    total = chunk_sum(torch.where(masked, token_confidence.float(), 0.0), chunk_size)
    n_masked = chunk_sum(masked.to(torch.float32), chunk_size).round().long()
    confidence = torch.where(n_masked > 0, total / n_masked.clamp(min=1), torch.ones_like(total))
    return confidence, n_masked


class WindowChunks:
    """Chunk bookkeeping for a window of `length` positions starting at absolute position `offset`.

    Chunks are anchored at absolute multiples of `chunk_size`, so the window's first chunk may be partial:
    [B, L] tensors are padded in front by `offset % chunk_size` empty (unmasked) positions before chunking.
    The chunk tensors [B, C] list only the chunks the window touches. Offset 0 is the plain chunking.
    """

    def __init__(self, length: int, chunk_size: int, offset: int = 0) -> None:
        self.length = length
        self.chunk_size = chunk_size
        self.lead = offset % chunk_size
        self.count = num_chunks(self.lead + length, chunk_size)

    def _pad(self, values: Tensor) -> Tensor:
        if not self.lead:
            return values
        return torch.cat((values.new_zeros(values.shape[0], self.lead), values), dim=1)

    def confidence(self, token_confidence: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """`chunk_confidence` of the window's chunks (the padding is unmasked, so it never counts)."""
        return chunk_confidence(self._pad(token_confidence), self._pad(masked), self.chunk_size)

    def masked_counts(self, masked: Tensor) -> Tensor:
        """[B, C] long: the number of `masked` positions in each of the window's chunks."""
        return chunk_sum(self._pad(masked).to(torch.float32), self.chunk_size).round().long()

    def expand(self, chunk_values: Tensor) -> Tensor:
        """[B, C] per-chunk values -> [B, L] per-position values of the window."""
        return expand_chunks(chunk_values, self.lead + self.length, self.chunk_size)[:, self.lead :]


def chunk_stats(refined: Tensor, steps: Tensor, conf0: Tensor | None, k: int) -> dict:
    """What selective refinement did: [B, C] `refined` chunks, the `steps` each ran (of `k`), the backbone's
    chunk confidence `conf0` (None: not computed, and not reported).

    The counts and fractions are 0-d tensors, computed without a host sync (the forward that reports them
    must not wait for the device); `float()` / `int()` them where they are logged.
    """
    total = refined.numel()
    n_refined = refined.sum()
    halted = refined & (steps < k)
    step_sum = torch.where(refined, steps, 0).sum().float()
    stats = {
        "refine_steps": torch.where(n_refined > 0, step_sum / n_refined.clamp_min(1), 0.0),
        "steps_per_chunk": steps.detach(),
        "halted_per_chunk": halted.detach(),
        "chunks_total": total,
        "chunks_refined": n_refined,
        "chunks_halted": halted.sum(),
        "skipped_fraction": 1.0 - n_refined.float() / max(total, 1),
    }
    if conf0 is not None:
        stats["chunk_confidence"] = conf0.detach()
    return stats
