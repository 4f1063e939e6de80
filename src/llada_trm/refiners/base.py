"""The recursive-refiner interface shared by the slot refiner and the MLP baseline.

A refiner improves the backbone's final hidden states `h` [B, L, D] by K small residual steps
(Tiny Recursive Models style): `h_{k+1} = h_k + update(h_k)`. `step` is one such update and is all a caller
needs to drive its own loop (per-chunk halting, deep supervision); `forward` is the plain K-step loop.

Positions outside the `active` / `chunk_mask` set are carried through (`torch.where`, or a scatter of the
refined rows into `h`), so they come out bit-identical to their input, whatever the refiner's dtype or
arithmetic. The packing of the refined rows lives in `refiners.rows`, the stats accumulator in
`refiners.stats`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from llada_trm.refiners.halting import HaltingHead
from llada_trm.refiners.rows import ActiveRows
from llada_trm.refiners.stats import StatsAccumulator

ContextInput = Tensor | Sequence[Tensor] | None
ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class RefinerState:
    """What a refiner carries from one step to the next (TRM's "carry").

    `prev` is the refiner's own working representation from the previous step, detached so that the
    recurrence never back-propagates through the carry itself; `None` before the first step. `reuse` holds
    what a refiner may reuse in its next step instead of recomputing it (the slot refiner's attention keys
    and values: `kv_reuse.KeyValueReuse`). It never changes a result: the refiner uses it only after checking
    that it still applies, which it does when each step is given the previous step's output itself,
    unmodified, as `forward` and the hybrid's loop do. `prev_valid` [B, L] marks the rows of `prev` that
    hold a previous representation when only some do (a carry from the last denoising step,
    `refiners.carry`); None: every row of `prev` does, or `prev` is None.
    """

    prev: Tensor | None = None
    steps: int = 0
    reuse: Any = None
    prev_valid: Tensor | None = None


def check_active(active: Tensor | None, h: Tensor, name: str = "active") -> Tensor | None:
    """Validate a [B, L] position mask and return it as bool (accepts 0/1 float or int masks)."""
    if active is None:
        return None
    if active.shape != h.shape[:2]:
        raise ValueError(
            f"{name} must have shape [B, L] = {list(h.shape[:2])} matching the hidden states, "
            f"got {list(active.shape)}"
        )
    return active if active.dtype == torch.bool else active != 0


def context_list(context: ContextInput, h: Tensor, expected_dim: int | None, owner: str) -> list[Tensor]:
    """Normalise an external context (one tensor or several, e.g. one per backbone layer) to a list.

    Every tensor must be [B, L, expected_dim] with the hidden states' B and L. `expected_dim=None` means
    the refiner was built without an external-context input.
    """
    if context is None:
        return []
    tensors = [context] if isinstance(context, Tensor) else list(context)
    for i, c in enumerate(tensors):
        if not isinstance(c, Tensor) or c.dim() != 3 or c.shape[:2] != h.shape[:2]:
            shape = list(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(
                f"context[{i}] must be a [B, L, Dc] tensor with B, L = {list(h.shape[:2])}, got {shape}"
            )
        if expected_dim is None:
            raise ValueError(
                f"{owner} was built without an external-context input; construct it with "
                f"context_dim={c.shape[-1]} to accept contexts of width {c.shape[-1]}"
            )
        if c.shape[-1] != expected_dim:
            raise ValueError(
                f"context width {c.shape[-1]} does not match {owner}'s expected width {expected_dim}; "
                f"construct it with context_dim={c.shape[-1]}"
            )
    return tensors


def apply_update(h: Tensor, update: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor]:
    """`(h_next, update)`: the residual update applied on the active positions only, and zeroed elsewhere.

    `torch.where` rather than a multiply by the mask, so that inactive positions stay bit-identical to `h`
    and the reported update norm is exactly zero there.
    """
    if active is None:
        return h + update, update
    keep = active.unsqueeze(-1)
    update = torch.where(keep, update, torch.zeros_like(update))
    return torch.where(keep, h + update, h), update


class Refiner(nn.Module, ABC):
    """Base class of the recursive refiners: K residual steps on hidden states [B, L, d_model].

    Subclasses implement `step`; the loop, the chunk-mask semantics and the statistics live here so that every
    refiner behaves the same way for the hybrid model and the trainer.
    """

    d_model: int
    num_steps: int
    halting_head: HaltingHead | None  # built when the config's `learned_halting` is set (else None)

    def _configure(
        self, config_type: type[ConfigT], config: ConfigT | int | None, overrides: dict[str, Any]
    ) -> ConfigT:
        """Resolve the constructor's arguments to a config and keep the fields every step reads.

        One rule for every refiner: a config object (keywords override its fields), a bare `d_model`, or
        keywords alone, which must include `d_model`.
        """
        owner = type(self).__name__
        if isinstance(config, int) and not isinstance(config, bool):
            config = config_type(d_model=config, **overrides)
        elif config is None:
            if "d_model" not in overrides:
                name = config_type.__name__
                raise ValueError(f"{owner} needs a config ({name}) or d_model=..., e.g. {owner}(d_model=64)")
            config = config_type(**overrides)
        elif overrides:
            config = type(config)(**{**config.model_dump(), **overrides})
        self.config = config
        self.d_model = config.d_model
        self.num_steps = config.num_steps
        self.delta_scale = config.delta_scale
        self.delta_clamp = config.delta_clamp
        self.halting_head = HaltingHead(config.d_model) if config.learned_halting else None
        return config

    def work_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the steps run in: `x`'s promoted with the refiner's (float32 for bf16 states and an fp32
        refiner), as the hybrid's loop does; a caller driving `step` on low-precision states should use it."""
        param = next(self.parameters(), None)
        return x.dtype if param is None else torch.promote_types(x.dtype, param.dtype)

    def pack(self, active: Tensor | None) -> ActiveRows | None:
        """The rows a step computes: the `active` ones packed in training, or None (every row, dense).

        The one seam that decides. Packing needs the active count on the host (a sync per step); it pays in
        training, where each skipped row saves its backward too, and it keeps training's numerics those of
        the packed computation. In eval mode (sampling, validation) a step runs dense over the window's rows
        and `torch.where` keeps the inactive rows bit-identical: no host sync. At LLaDA-8B width dense costs
        +0.10% of a (32-layer, extrapolated) model call for the slot refiner and -0.25% for the MLP, K = 4,
        32 of 160 rows refined (`bench/bench_rows.py`, 2-core CPU, one thread, bf16): the rows left out are
        cheap next to the weights every step reads, and a GPU sync costs more than either.
        """
        return ActiveRows.pack(active) if self.training else None

    def init_state(self, x: Tensor) -> RefinerState:
        """The carry before the first step (nothing to compare against yet)."""
        return RefinerState()

    def resume_state(self, x: Tensor, latent: Tensor, valid: Tensor) -> RefinerState:
        """The state of a first step that resumes from the last denoising step's `carried` latents
        [B, L, D] (held where `valid` [B, L]; `refiners.carry`). A refiner whose step reads no previous
        state carries nothing: its first step starts as `init_state`'s."""
        return self.init_state(x)

    def carried(self, state: RefinerState) -> Tensor | None:
        """The latent [B, L, D] to carry to the next denoising step from a call's last `state` (None: this
        refiner carries nothing)."""
        return None

    @abstractmethod
    def step(
        self,
        h: Tensor,
        state: RefinerState,
        *,
        context: ContextInput = None,
        active: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, RefinerState, dict[str, Any]]:
        """One recursive step.

        Returns `(h_next, state, step_stats)`; positions where `active` [B, L] is False are bit-identical
        in `h_next`, and only the active rows are computed (`ActiveRows`): a skipped or halted chunk costs
        nothing but its part of the attention's keys. `step_stats` holds per-position tensors: `confidence`
        [B, L] (not detached, so that a calibration loss can train it; zero off the active set),
        `update_norm` [B, L] (detached L2 norm of the applied update, zero off the active set) and, for the
        slot refiner, `slot_norms` {name: [B, L]}.
        """

    def forward(
        self,
        x: Tensor,
        chunk_mask: Tensor | None = None,
        context: ContextInput = None,
        return_stats: bool = False,
        num_steps: int | None = None,
        return_all_steps: bool = False,
        attention_mask: Tensor | None = None,
    ) -> Tensor | list[Tensor] | tuple[Tensor | list[Tensor], dict[str, Any]]:
        """Run K steps (`num_steps` overrides `self.num_steps`; K=0 returns `x` itself).

        `chunk_mask` [B, L] marks the positions to refine (None: all); `context` is the backbone's attention
        context [B, L, Dc] (or a list of them); `attention_mask` [B, L] (1 = real token) keeps padding out of
        the refiner's own attention. Returns the final states, or `[h_1, ..., h_K]` with `return_all_steps`
        (in `x`'s dtype, computed in `work_dtype(x)`), plus the stats dict when `return_stats`.
        """
        k = self.num_steps if num_steps is None else num_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {k!r}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, {self.d_model}] hidden states, got {list(x.shape)}")
        active = check_active(chunk_mask, x, "chunk_mask")
        pad = check_active(attention_mask, x, "attention_mask")

        state = self.init_state(x)
        stats = StatsAccumulator() if return_stats else None
        # The steps run in the promoted dtype, so that K small updates accumulate instead of each being
        # rounded away by bf16 states; the casts back are exact on the positions that were not refined.
        h, all_steps = (x.to(self.work_dtype(x)) if k else x), []
        for _ in range(k):
            h, state, step_stats = self.step(h, state, context=context, active=active, attention_mask=pad)
            if stats is not None:
                stats.add(step_stats, active)
            if return_all_steps:
                all_steps.append(h.to(x.dtype))

        out: Tensor | list[Tensor] = all_steps if return_all_steps else h.to(x.dtype)
        if stats is None:
            return out
        return out, stats.summary(self, x)

    def orthogonality_loss(self) -> Tensor:
        """Regulariser on slot overlap; a refiner without slots has none."""
        param = next(self.parameters(), None)
        device = param.device if param is not None else None
        return torch.zeros((), device=device)

    def gate_values(self, tensors: bool = False) -> dict[str, Any]:
        """Slot-gate openings for logging (floats, or 0-d tensors with `tensors`); empty without gates."""
        return {}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
