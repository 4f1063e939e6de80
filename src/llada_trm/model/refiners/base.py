"""The recursive-refiner interface (`Refiner`) shared by the slot refiner and the MLP baseline, and the pieces
they share: row packing (`ActiveRows`), step statistics (`StatsAccumulator`), the slot refiner's transformer
blocks and its key/value reuse. docs/architecture.md (`llada_trm.model.refiners`) describes the interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ActiveRows:
    """The active positions of each sequence packed to the front, so that a step computes only on them.

    Everything a refiner computes is per row except attention, so the packed rows get the values a full
    computation would (tests/model/test_refiners.py). `index` [B, Q]: per sequence its active positions in
    order, then inactive ones as padding up to Q = the largest active count; `valid` [B, Q] marks the real
    entries. Padding rows are genuine positions: wasted work, never NaNs.
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
        """[B, Q, ...] -> [B, L, ...]: `into` (zeros of `length` rows if None) with the valid rows replaced;
        out of place and differentiable in both `packed` and `into`."""
        if into is None:
            into = packed.new_zeros(packed.shape[0], length, *packed.shape[2:])
        index = self._expand(self.index, packed)
        valid = self.valid.view(*self.valid.shape, *([1] * (packed.dim() - 2)))
        packed = torch.where(valid, packed, into.gather(1, index))  # padding rows write back what was there
        return into.scatter(1, index, packed)


def masked_mean(values: Tensor, active: Tensor | None) -> Tensor:
    """Mean of `values` [B, L] over the active positions, without a host sync; over all positions when none
    is active (not a 0/0 NaN, so that logged metrics stay finite when a batch has no chunk to refine)."""
    values = values.float()
    if active is None:
        return values.mean()
    weights = active.to(values.dtype)
    count = weights.sum()
    return torch.where(count > 0, (values * weights).sum() / count.clamp_min(1.0), values.mean())


class StatsAccumulator:
    """Collects `step` statistics (`add` after each step, on the device) and reduces them to the stats dict
    of `Refiner.forward` and the hybrid's `refine` (`summary`: one host sync, none with `on_device`)."""

    def __init__(self) -> None:
        self.steps = 0
        self._confidence: list[Tensor] = []
        self._delta_norms: list[Tensor] = []
        self._slot_norms: dict[str, list[Tensor]] = {}
        self.final_confidence: Tensor | None = None

    @torch.no_grad()
    def add(self, step_stats: dict[str, Any], active: Tensor | None = None) -> None:
        self.steps += 1
        confidence = step_stats["confidence"].detach()
        self.final_confidence = confidence
        self._confidence.append(masked_mean(confidence, active))
        # The applied update is exactly zero off the active set, so its mean is taken over active positions.
        norms = step_stats["update_norm"].float()
        if active is None:
            self._delta_norms.append(norms.mean())
        else:
            self._delta_norms.append(norms.sum() / active.sum().clamp_min(1))
        for name, values in step_stats.get("slot_norms", {}).items():
            self._slot_norms.setdefault(name, []).append(masked_mean(values.detach(), active))

    def summary(self, refiner: Refiner | None, like: Tensor, on_device: bool = False) -> dict[str, Any]:
        """The stats dict: `steps`, `confidence`, `confidence_per_step`, `delta_norms`, `final_confidence`
        (shaped like `like` [B, L] when no step ran), `slot_norms`, `refiner`'s `gates` (none without one).
        `on_device`: the numbers stay 0-d tensors (no host sync); `float()` them where they are logged."""
        k = self.steps
        if on_device:
            confidence_per_step, delta_norms = list(self._confidence), list(self._delta_norms)
            slot_norms = {name: torch.stack(values).mean() for name, values in self._slot_norms.items()}
            confidence: Any = torch.stack(confidence_per_step).mean() if k else float("nan")
        else:
            scalars = torch.stack(self._confidence + self._delta_norms).tolist() if k else []
            confidence_per_step, delta_norms = scalars[:k], scalars[k:]
            slot_norms = {name: torch.stack(v).mean().item() for name, v in self._slot_norms.items()}
            confidence = sum(confidence_per_step) / k if k else float("nan")
        final = self.final_confidence
        if final is None:  # no step ran: nothing was estimated
            final = torch.full(like.shape[:2], float("nan"), device=like.device)
        return {
            "steps": k,
            "confidence": confidence,
            "confidence_per_step": confidence_per_step,
            "delta_norms": delta_norms,
            "final_confidence": final.float(),
            "slot_norms": slot_norms,
            "gates": {} if refiner is None else refiner.gate_values(tensors=on_device),
        }


ContextInput = Tensor | Sequence[Tensor] | None
ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class RefinerState:
    """What a refiner carries from one step to the next within one model call (TRM's "carry").

    `prev`: its working representation after the previous step, detached (None before the first: each model
    call refines from scratch, docs/levers.md). `reuse`: what the next step may reuse instead of recomputing
    (`KeyValueReuse`, checked before use, so it never changes a result).
    """

    prev: Tensor | None = None
    steps: int = 0
    reuse: Any = None


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
    """Base class of the recursive refiners: K residual steps h_{k+1} = h_k + update(h_k) on hidden states
    [B, L, d_model]. Subclasses implement `step`; `forward` is the plain K-step loop."""

    d_model: int
    num_steps: int

    def _configure(
        self, config_type: type[ConfigT], config: ConfigT | int | None, overrides: dict[str, Any]
    ) -> ConfigT:
        """The constructor's arguments as a config: a config object (keywords override its fields), a bare
        `d_model`, or keywords alone, which must include `d_model`."""
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
        return config

    def work_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the steps run in: `x`'s promoted with the refiner's (float32 for bf16 states and an fp32
        refiner); a caller driving `step` on low-precision states should use it."""
        param = next(self.parameters(), None)
        return x.dtype if param is None else torch.promote_types(x.dtype, param.dtype)

    def pack(self, active: Tensor | None) -> ActiveRows | None:
        """The rows a step computes: the `active` ones packed in training, or None (every row, dense).

        The one seam that decides. Packing needs a host sync per step; it pays in training (a skipped row
        saves its backward too) and keeps training's numerics. Eval steps run dense, `torch.where` keeping the
        inactive rows bit-identical: at LLaDA-8B width dense costs +0.10% (slot) / -0.25% (MLP) of a 32-layer
        model call, K = 4, 32 of 160 rows refined (`bench/bench_rows.py`, 2-core CPU, one thread, bf16).
        """
        return ActiveRows.pack(active) if self.training else None

    def init_state(self, x: Tensor) -> RefinerState:
        """The carry before the first step (nothing to compare against yet)."""
        return RefinerState()

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
        """One recursive step: `(h_next, state, step_stats)`, h_next bit-identical to h where `active` [B, L]
        is False. `step_stats`: `confidence` and `update_norm` [B, L] (zero off the active set) and, for the
        slot refiner, `slot_norms` {name: [B, L]}."""

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
        """Run K steps (`num_steps`, default `self.num_steps`; K=0 returns `x` itself) on the `chunk_mask`
        [B, L] positions (None: all), in `work_dtype(x)`. Returns the final states, or `[h_1, ..., h_K]` with
        `return_all_steps` (in `x`'s dtype), plus the stats dict when `return_stats`."""
        k = self.num_steps if num_steps is None else num_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {k!r}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, {self.d_model}] hidden states, got {list(x.shape)}")
        active = check_active(chunk_mask, x, "chunk_mask")
        pad = check_active(attention_mask, x, "attention_mask")

        state = self.init_state(x)
        stats = StatsAccumulator() if return_stats else None
        # The promoted dtype keeps K small updates from being rounded away by bf16 states.
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


class AttentionContextExtractor(nn.Module):
    """Bidirectional multi-head self-attention that also returns its context: the heads' outputs attn@V,
    concatenated before the output projection (the same form as a backbone layer's context)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of rows x [..., D], before the split into heads."""
        return self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        keys_values: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x [B, Q, D], the asking rows -> (output, context), both [B, Q, D]; `keys_values` of the L rows
        attended to (default: x's own), `attention_mask` [B, L] (True/1 = may be attended) over them."""
        b, n, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, t.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

        keys, values = self.keys_values(x) if keys_values is None else keys_values
        q, k, v = heads(self.q_proj(x)), heads(keys), heads(values)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # keys only: [B, 1, 1, L]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        context = y.transpose(1, 2).reshape(b, n, d)
        return self.o_proj(context), context


class TransformerBlock(nn.Module):
    """Pre-norm transformer block that exposes its attention context: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, int(d_model * mlp_ratio))
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = AttentionContextExtractor(d_model, n_heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, d_model),
            nn.Dropout(dropout),
        )

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The attention's keys and values of rows x [..., D] (normalised as the block normalises them)."""
        return self.attn.keys_values(self.attn_norm(x))

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        queries: ActiveRows | None = None,
        keys_values: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(output, context), [B, Q, D] for the `queries` rows only when given (every row stays a key; its
        `keys_values` may come precomputed), else [B, L, D]."""
        if queries is not None:  # every row is a key, only the query rows ask
            if keys_values is None:
                keys_values = self.keys_values(x)
            x = queries.gather(x)
        attn_out, context = self.attn(self.attn_norm(x), attention_mask, keys_values)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, context


# Key/value reuse between the steps of a single-block slot refiner: a row's key and value depend only on that
# row of h (LayerNorm, then a linear map), and a step leaves h bit-identical outside its active rows, so step
# t+1 may recompute only the rows step t changed, provided it is given step t's output itself, unmodified, and
# the block's weights did not change: `KeyValueReuse` records the version counters that check both (inference
# tensors keep none: there only h's identity is checked). Measured (`bench/bench_kv_reuse.py`, LLaDA-8B width,
# 160 rows, 32 refined, K = 4, 2-core CPU): 12 ms of a 453 ms refine (2.7%), about 0.08% of a 32-layer model
# call; training only. Kept because removing it moves training's gradients by ~1e-6, which would change the
# main job's table; remove it with the next change that regenerates that table (docs/levers.md).


def versions(h: Tensor, block: nn.Module) -> tuple[int | None, ...]:
    """Version counters of `h` and of the block's parameters (None for inference tensors, which keep none)."""
    return tuple(None if t.is_inference() else t._version for t in (h, *block.parameters()))


class KeyValueReuse(NamedTuple):
    """Step t's keys and values of every row [B, L, d_inner], for step t+1."""

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
