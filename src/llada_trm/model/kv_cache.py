"""Block-wise key/value cache for fast masked-diffusion sampling (Fast-dLLM, arXiv:2505.22618).

A cached key is exact only while everything it attended to is unchanged; semi-autoregressive sampling keeps
the keys close enough (Fast-dLLM's observation). The prefix and dual caches are one rule here: a forward on
the tokens at absolute positions `start .. start+S-1` attends to `cache[:start] ++ new ++ cache[start+S:]`.
Keys are stored after RoPE (rotation depends only on the absolute position, so this equals the reference's
rotating the concatenation each time, and is cheaper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Per-layer keys and values of a token sequence, plus its padding mask.

    keys[i], values[i]: [B, n_kv_heads, T, head_dim] of block i (keys with RoPE at absolute positions 0..T-1).
    attention_mask: [B, T] (1 = real token) for the cached positions, or None when none is padded.
    """

    keys: list[Tensor]
    values: list[Tensor]
    attention_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError(f"KVCache has {len(self.keys)} key tensors but {len(self.values)} value tensors")
        if self.attention_mask is not None and self.keys and self.attention_mask.shape != (
            self.batch_size,
            self.length,
        ):
            raise ValueError(
                f"KVCache attention_mask shape {tuple(self.attention_mask.shape)} must be "
                f"[batch, cached length] = {[self.batch_size, self.length]}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        """Number of cached positions T."""
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def truncate(self, length: int) -> KVCache:
        """The cache of the first `length` positions (views, no copy): what a prefix cache keeps."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        mask = None if self.attention_mask is None else self.attention_mask[:, :length]
        return KVCache(
            keys=[k[:, :, :length] for k in self.keys],
            values=[v[:, :, :length] for v in self.values],
            attention_mask=mask,
        )

    def check_window(self, start: int, new_length: int, batch_size: int) -> None:
        """Validate that `new_length` tokens at `start` can be combined with this cache."""
        if self.batch_size != batch_size:
            raise ValueError(
                f"the cache holds a batch of {self.batch_size} but the input has {batch_size} rows; "
                "build the cache from the same batch"
            )
        if not 0 <= start <= self.length:
            raise ValueError(
                f"cache_position {start} must lie in 0..{self.length} (the cached length): the new tokens "
                "either follow the cache or replace some of its entries"
            )

    @staticmethod
    def splice(cached: Tensor, new: Tensor, start: int) -> Tensor:
        """`cached[..., :start, :] ++ new ++ cached[..., start+S:, :]` along the position axis (dim 2)."""
        end = start + new.shape[2]
        if start == cached.shape[2]:  # prefix cache: a plain append
            return torch.cat((cached, new), dim=2)
        return torch.cat((cached[:, :, :start], new, cached[:, :, end:]), dim=2)

    def key_mask(self, start: int, new_mask: Tensor | None, new_length: int) -> Tensor | None:
        """[B, total] padding mask of the keys a cached forward attends to (None when nothing is padded)."""
        if self.attention_mask is None and new_mask is None:
            return None
        batch, device = self.batch_size, self.keys[0].device
        cached = self.attention_mask
        if cached is None:
            cached = torch.ones(batch, self.length, dtype=torch.long, device=device)
        if new_mask is None:
            new_mask = torch.ones(batch, new_length, dtype=cached.dtype, device=device)
        new_mask = new_mask.to(device=cached.device, dtype=cached.dtype)
        return torch.cat((cached[:, :start], new_mask, cached[:, start + new_length :]), dim=1)
