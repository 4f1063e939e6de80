"""Reusing a single-block slot refiner's attention keys and values from one step to the next.

Contract. Step t+1 may take step t's keys and values for every row that step t did not change, and recompute
only the rest, because
  1. a row's key and value are a function of that row of h alone (LayerNorm, then a linear map), and
  2. step t leaves h bit-identical outside its active rows, so those rows of step t+1's input are step t's.
(2) holds only if step t+1 is given step t's output itself, unmodified, and the keys depend on the block's
weights as well; so `KeyValueReuse` records that output and the version counters of it and of the block's
parameters, and `keys_values` recomputes every row unless all of them match (a caller that detaches or
copies h, edits it in place, or takes an optimizer step between steps gets the full computation; under
`torch.inference_mode` only the identity of h is checked, as inference tensors keep no version counter).
With more than one block the last block's input mixes rows through attention, so nothing is reused there.

Measured (`bench/bench_kv_reuse.py`, LLaDA-8B width, 160 rows, 32 refined, K = 4, 2-core CPU, one thread): it
saves 12 ms of a 453 ms refine (2.7%), about 0.08% of a 32-layer model call at that length; it runs only in
training (eval steps run dense, `Refiner.pack`). Kept because removing it changes training's gradients in
the last bits (1e-6), and the main job's table must reproduce to the last digit; remove it with the next
change that regenerates that table (docs/levers.md).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from llada_trm.refiners.blocks import TransformerBlock
from llada_trm.refiners.rows import ActiveRows


def versions(h: Tensor, block: nn.Module) -> tuple[int | None, ...]:
    """Version counters of `h` and of the block's parameters: any in-place change bumps one of them.

    Tensors made under `torch.inference_mode` keep no counter (None): their in-place edits go unseen.
    """
    return tuple(None if t.is_inference() else t._version for t in (h, *block.parameters()))


class KeyValueReuse(NamedTuple):
    """Step t's keys and values of every row [B, L, d_inner], for step t+1 (see the module docstring)."""

    keys: Tensor
    values: Tensor
    changed: Tensor | None  # [B, L] bool: the rows step t changed (None: all)
    h_next: Tensor  # step t's output, which step t+1 must be given as is
    versions: tuple[int | None, ...]  # `versions(h_next, block)` when step t ended

    @classmethod
    def record(
        cls, keys_values: tuple[Tensor, Tensor], changed: Tensor | None, h_next: Tensor, block: nn.Module
    ) -> KeyValueReuse:
        return cls(*keys_values, changed, h_next, versions(h_next, block))


def keys_values(
    block: TransformerBlock, u: Tensor, h: Tensor, reuse: KeyValueReuse | None
) -> tuple[Tensor, Tensor]:
    """The block's keys and values of every row of u = in_proj(h), recomputed only on the rows the last step
    changed when `reuse` is valid for `h` (when few chunks are refined, most projections are skipped)."""
    if reuse is None or reuse.h_next is not h or reuse.versions != versions(h, block):
        return block.keys_values(u)
    changed = ActiveRows.pack(reuse.changed)
    if changed is None:  # every row changed
        return block.keys_values(u)
    keys, values = block.keys_values(changed.gather(u))
    return changed.scatter(keys, into=reuse.keys), changed.scatter(values, into=reuse.values)
