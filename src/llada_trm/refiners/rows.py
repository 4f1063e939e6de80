"""Packing the active rows of a batch, so that a refiner step computes only the positions it refines.

Everything a refiner computes is per row except attention, so computing on the packed rows gives the values a
full computation would, at the cost of the active rows only (tests/test_refiners.py checks values and
gradients against the full computation).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActiveRows:
    """The active positions of each sequence, packed to the front, so that a step computes only on them.

    `index` [B, Q] holds, per sequence, the positions of its active rows first (in order), then inactive
    positions as padding up to Q = the largest active count; `valid` [B, Q] marks the real entries. Padding
    rows are genuine positions, so computing on them is wasted work but never produces NaNs.
    """

    def __init__(self, index: Tensor, valid: Tensor) -> None:
        self.index = index
        self.valid = valid

    @classmethod
    def pack(cls, active: Tensor | None) -> ActiveRows | None:
        """The packing of a [B, L] bool mask; None when every position is active (nothing to save)."""
        if active is None or bool(active.all()):
            return None
        counts = active.sum(dim=1)
        width = int(counts.max())
        order = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=active.device) < counts[:, None]
        return cls(order, valid)

    def _expand(self, index: Tensor, like: Tensor) -> Tensor:
        return index.view(*index.shape, *([1] * (like.dim() - 2))).expand(*index.shape, *like.shape[2:])

    def gather(self, x: Tensor) -> Tensor:
        """[B, L, ...] -> [B, Q, ...]: the packed rows of x."""
        return x.gather(1, self._expand(self.index, x))

    def scatter(self, packed: Tensor, into: Tensor | None = None, length: int | None = None) -> Tensor:
        """[B, Q, ...] -> [B, L, ...]: `into` (zeros of `length` rows if None) with the valid rows replaced.

        Out of place and differentiable in both `packed` and `into`.
        """
        if into is None:
            if length is None:
                raise ValueError("ActiveRows.scatter needs `into` or `length`")
            into = packed.new_zeros(packed.shape[0], length, *packed.shape[2:])
        index = self._expand(self.index, packed)
        valid = self.valid.view(*self.valid.shape, *([1] * (packed.dim() - 2)))
        packed = torch.where(valid, packed, into.gather(1, index))  # padding rows write back what was there
        return into.scatter(1, index, packed)


