"""Counting the rows a hybrid's sampling calls compute, priced by `floors`: the FLOPs that set each floor.

`FlopMeter` wraps (as instance attributes, like bench_sampler's `RefineTimer`) the backbone's forward, each
refiner's `step` and the hybrid's `lm_head`, and adds up, from the shapes of every call:

    backbone     rows run x backbone_token_flops(keys attended)           (cached windows attend to the cache)
    refiner      per step: refined rows x its row FLOPs (keys = the window's rows)
    LM head      rows the hybrid sends through the LM head (halting probes and the refined rows' logits)
                 besides its one output pass (`output_head`: the backbone's own LM-head pass, counted with it)

and the calls of each (`backbone_calls`, `lm_head_calls`, `refiner_calls`), which the weight-read floor
prices by the bytes each call reads (`floors.backbone_weight_bytes`, ...).

Only counting: the wrapped calls return what they would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import floors
from torch import Tensor

from llada_trm.model.hybrid import LLaDATRMHybrid


@dataclass
class FlopCount:
    backbone: float = 0.0
    refiner: float = 0.0
    lm_head: float = 0.0
    refined_rows: int = 0  # summed over steps
    lm_head_rows: int = 0
    backbone_calls: int = 0
    lm_head_calls: int = 0
    refiner_calls: int = 0
    refiner_read_bytes: int = 0  # each step reads its refiner's weights

    @property
    def overhead(self) -> float:
        """The refinement's floor FLOPs: refined rows x K x row FLOPs plus LM-head rows x 2 d V."""
        return self.refiner + self.lm_head

    def add(self, other: FlopCount) -> None:
        for name in ("backbone", "refiner", "lm_head", "refined_rows", "lm_head_rows", "backbone_calls",
                     "lm_head_calls", "refiner_calls", "refiner_read_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def attended_keys(length: int, past: Any, cache_position: int | None) -> int:
    """Keys a window of `length` positions attends to: its own, plus the cache's outside the window."""
    if past is None:
        return length
    start = past.length if cache_position is None else cache_position
    return max(past.length, start + length)


class FlopMeter:
    """Accumulates a `FlopCount` over the calls made since the last `reset()`."""

    def __init__(self, model: LLaDATRMHybrid) -> None:
        self.count = FlopCount()
        self._wrap_backbone(model)
        self._wrap_lm_head(model)
        self._wrap_output_head(model)
        for refiner in model.refinement_head.values():
            self._wrap_step(refiner)

    def reset(self) -> FlopCount:
        """The count so far, and a fresh one from here on."""
        count, self.count = self.count, FlopCount()
        return count

    def _wrap_backbone(self, model: LLaDATRMHybrid) -> None:
        backbone = model.backbone
        config, original = backbone.config, backbone.forward

        def forward(input_ids: Tensor, *args: Any, **kwargs: Any) -> Any:
            past, position = kwargs.get("past_key_values"), kwargs.get("cache_position")
            keys = attended_keys(input_ids.shape[1], past, position)
            head = kwargs.get("output_logits", True)
            self.count.backbone += input_ids.numel() * floors.backbone_token_flops(config, keys, head)
            self.count.backbone_calls += 1
            return original(input_ids, *args, **kwargs)

        backbone.forward = forward  # instance attribute: Module.__call__ calls self.forward

    def _wrap_lm_head(self, model: LLaDATRMHybrid) -> None:
        row_flops, original = floors.lm_head_row_flops(model.backbone.config), model.lm_head

        def lm_head(h: Tensor) -> Tensor:
            rows = h.shape[:-1].numel()
            self.count.lm_head_rows += rows
            self.count.lm_head_calls += 1
            self.count.lm_head += rows * row_flops
            return original(h)

        model.lm_head = lm_head

    def _wrap_output_head(self, model: LLaDATRMHybrid) -> None:
        row_flops, original = floors.lm_head_row_flops(model.backbone.config), model.output_head

        def output_head(h: Tensor) -> Tensor:
            self.count.backbone += h.shape[:-1].numel() * row_flops  # the backbone call's own head pass
            return original(h)

        model.output_head = output_head

    def _wrap_step(self, refiner: Any) -> None:
        config, original = refiner.config, refiner.step
        slot = hasattr(config, "slot_dims")
        read_bytes = floors.weight_bytes(refiner)

        def step(h: Tensor, state: Any, **kwargs: Any) -> Any:
            active = kwargs.get("active")
            rows = h.shape[0] * h.shape[1] if active is None else int(active.sum())
            with_context = kwargs.get("context") is not None
            if slot:
                per_row = floors.slot_row_flops(config, h.shape[1], state.steps == 0, with_context)
            else:
                per_row = floors.mlp_row_flops(config, with_context)
            self.count.refined_rows += rows
            self.count.refiner_calls += 1
            self.count.refiner_read_bytes += read_bytes
            self.count.refiner += rows * per_row
            return original(h, state, **kwargs)

        refiner.step = step
