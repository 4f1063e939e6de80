"""Slot-based TRM refiner: each step reads h through its own small transformer blocks (and the backbone's
attention contexts), splits what it sees into four named slots (context, reasoning, refinement, confidence)
and turns them into a bounded, confidence-weighted residual update; `slot_step` holds the equations.

The working width `d_inner` defaults to min(d_model, 512), so the refiner stays near 0.2 % of LLaDA-8B's
parameters; the slot widths default to 1/2, 1/4, 1/4, 1/8 of it, which leaves room for the slot projections
reading `d_inner`-wide inputs to be mutually orthogonal.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from llada_trm.errors import ConfigError
from llada_trm.model.refiners.base import (
    ActiveRows,
    ContextInput,
    KeyValueReuse,
    Refiner,
    RefinerState,
    TransformerBlock,
    check_active,
    context_list,
    keys_values,
)
from llada_trm.model.refiners.config import SlotConfig


class SlotOutput(NamedTuple):
    """The four slots of one step, each [B, L, d_slot], gated."""

    ctx: Tensor
    reason: Tensor
    refine: Tensor
    conf: Tensor


SLOT_NAMES: tuple[str, ...] = SlotOutput._fields


class SlotProjector(nn.Module):
    """The slot projections, their LayerNorms and (with `use_gates`) the scalar gates sigmoid(g) that let
    training turn a slot down; `slot_step` applies them."""

    def __init__(self, config: SlotConfig) -> None:
        super().__init__()
        d_in, dims = config.d_inner, config.slot_dims
        self.W_ctx = nn.Linear(d_in, dims["ctx"], bias=False)
        self.W_reason = nn.Linear(dims["ctx"], dims["reason"], bias=False)
        self.W_refine = nn.Linear(d_in, dims["refine"], bias=False)
        self.W_conf = nn.Linear(d_in, dims["conf"], bias=False)
        # The change is measured in units of the update's own scale (h moves by delta_scale * p * delta), so
        # the slot sees O(delta) values rather than ones the LayerNorm's eps would flatten.
        self.change_scale = 1.0 / config.delta_scale
        self.norms = nn.ModuleDict({name: nn.LayerNorm(dim) for name, dim in dims.items()})
        # sigmoid(0) = 0.5: every slot starts half open, where the gate's gradient is largest.
        self.gates = (
            nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in SLOT_NAMES})
            if config.use_gates
            else None
        )

    def projection_weights(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"W_{name}").weight for name in SLOT_NAMES}

    @torch.no_grad()
    def gate_values(self, tensors: bool = False) -> dict[str, Any]:
        """sigmoid(gate) per slot; a gate of any shape reports its mean, so logging never breaks on it.
        `tensors`: 0-d tensors instead of floats (no host sync, for stats read later)."""
        if self.gates is None:
            return {}
        means = {name: torch.sigmoid(self.gates[name].float()).mean() for name in SLOT_NAMES}
        return means if tensors else {name: value.item() for name, value in means.items()}

    def orthogonality_loss(self) -> Tensor:
        """Mean overlap of the slot projections that read inputs of the same width.

        For such a pair, with G = W^T W the operator by which a projection reads its input,
            overlap(W_i, W_j) = <G_i, G_j>_F / (||G_i||_F ||G_j||_F)
                              = ||W_i W_j^T||_F^2 / (||W_i W_i^T||_F ||W_j W_j^T||_F),
        the cosine between the two reading operators: 0 exactly when the projections read orthogonal
        subspaces, 1 when they read the same one the same way. It is scale-free, so it cannot be lowered by
        shrinking weights (the slot LayerNorms would undo that anyway). With the default widths the pairs are
        ctx/refine/conf, which read d_inner-wide inputs; zero when no two projections share an input width.
        """
        weights = list(self.projection_weights().values())
        pairs = [(a, b) for a, b in itertools.combinations(weights, 2) if a.shape[1] == b.shape[1]]
        if not pairs:
            return weights[0].new_zeros((), dtype=torch.float32)
        overlaps = []
        for a, b in pairs:
            a, b = a.float(), b.float()
            cross = (a @ b.T).square().sum()
            overlaps.append(cross / ((a @ a.T).norm() * (b @ b.T).norm()).clamp_min(1e-12))
        return torch.stack(overlaps).mean()


class SlotStep(NamedTuple):
    """What `slot_step` computes for its rows."""

    h_next: Tensor  # h + update, in the promoted dtype of h and the refiner
    update: Tensor  # ds * p * delta
    confidence: Tensor  # p, without its trailing unit dimension
    slots: SlotOutput  # gated


def slot_step(m: SlotTRMRefiner, h: Tensor, u: Tensor, c: Tensor, u_prev: Tensor | None) -> SlotStep:
    """The math of one slot-refiner step, on rows that are all refined (`m` holds the parameters).

        s_ctx    = g_ctx    LN(W_ctx c)                         context (d_inner/2); c = attn@V, the multi-
                                                                head attention's concatenated head outputs
        s_reason = g_reason LN(W_reason LN(W_ctx c))            reasoning (d_inner/4): linear from the context
        s_refine = g_refine LN(W_refine (u - sg(u_prev)) / ds)  refinement (d_inner/4): the change since the
                                                                previous step; 0 on the first (u_prev None)
        s_conf   = g_conf   LN(W_conf (u - mean(u))^2)          confidence (d_inner/8): a learned weighted
                                                                variance of u's features
        delta    = clamp(delta_net([s_ctx, s_reason, s_refine, s_conf]), -delta_clamp, delta_clamp)
        p        = sigmoid(confidence_head(s_conf))
        h_next   = h + ds * p * delta                           the confidence-weighted residual update

    g_i = sigmoid(gate_i) (1 without gates), ds = delta_scale, sg = stop-gradient. `h` is d_model wide; `u`
    = blocks(in_proj(h)), `c` = mean(block contexts [, W_ext backbone context]) and `u_prev` are d_inner
    wide, gathered for the refined rows by `SlotTRMRefiner.step`.
    """
    proj = m.slot_proj
    ctx = proj.norms["ctx"](proj.W_ctx(c))
    reason = proj.norms["reason"](proj.W_reason(ctx))
    if u_prev is None:  # first step: nothing has changed yet
        change = proj.W_refine.weight.new_zeros(*u.shape[:-1], proj.W_refine.out_features)
    else:
        change = proj.W_refine((u - u_prev.detach()) * proj.change_scale)
    refine = proj.norms["refine"](change)
    conf = proj.norms["conf"](proj.W_conf((u - u.mean(dim=-1, keepdim=True)).square()))
    slots = SlotOutput(ctx, reason, refine, conf)
    if proj.gates is not None:
        slots = SlotOutput(*(s * torch.sigmoid(proj.gates[n]) for n, s in slots._asdict().items()))
    delta = m.delta_net(torch.cat(slots, dim=-1)).clamp(-m.delta_clamp, m.delta_clamp)
    p = torch.sigmoid(m.confidence_head(slots.conf))
    update = m.delta_scale * p * delta
    return SlotStep(h + update, update, p.squeeze(-1), slots)


# The seed's constructor keywords (the original integration guide's), accepted as aliases of SlotConfig's.
SEED_ALIASES: dict[str, str] = {"n_layers": "n_blocks", "K": "num_steps", "use_gating": "use_gates"}
SLOT_DIM_FIELDS: tuple[str, ...] = tuple(f"d_{name}" for name in SLOT_NAMES)


def _resolve_aliases(overrides: dict[str, Any]) -> dict[str, Any]:
    """SlotConfig's field names for the seed's: `n_layers`, `K`, `use_gating` and the 4-tuple `slot_dims`."""
    resolved = dict(overrides)
    named = {SEED_ALIASES[a]: (a, resolved.pop(a)) for a in list(resolved) if a in SEED_ALIASES}
    if "slot_dims" in resolved:
        dims = resolved.pop("slot_dims")
        if not isinstance(dims, (tuple, list)) or len(dims) != len(SLOT_DIM_FIELDS):
            raise ConfigError(f"slot_dims must be 4 widths (ctx, reason, refine, conf), got {dims!r}")
        named |= {name: ("slot_dims", d) for name, d in zip(SLOT_DIM_FIELDS, dims, strict=True)}
    for name, (alias, value) in named.items():
        if name in resolved:
            raise ConfigError(f"SlotTRMRefiner got {alias} (the seed's name of {name}) and {name}; drop one")
        resolved[name] = value
    return resolved


class SlotTRMRefiner(Refiner):
    """Slot-based recursive refiner, built from a `SlotConfig` or keywords (`SlotTRMRefiner(d_model=64)`;
    keywords given with a config override its fields). The seed's keywords are aliases: `n_layers`, `K`,
    `use_gating` and `slot_dims=(ctx, reason, refine, conf)`; an alias given with its SlotConfig name fails.
    """

    def __init__(self, config: SlotConfig | int | None = None, **overrides: Any) -> None:
        super().__init__()
        config = self._configure(SlotConfig, config, _resolve_aliases(overrides))
        d_inner = config.d_inner

        self.in_proj = (
            nn.Linear(config.d_model, d_inner, bias=False) if d_inner != config.d_model else nn.Identity()
        )
        self.context_proj = (
            nn.Linear(config.context_dim, d_inner, bias=False)
            if config.context_dim is not None and config.context_dim != d_inner
            else None
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(d_inner, config.n_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.slot_proj = SlotProjector(config)
        self.delta_net = nn.Sequential(
            nn.Linear(config.slot_total, d_inner),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(d_inner, config.d_model),
        )
        conf_hidden = max(1, config.d_conf // 2)
        self.confidence_head = nn.Sequential(
            nn.Linear(config.d_conf, conf_hidden), nn.GELU(), nn.Linear(conf_hidden, 1)
        )
        # Near-identity start: the last delta layer is small (not zero), so the untrained refiner barely moves
        # h while every earlier layer still receives gradient through it.
        nn.init.normal_(self.delta_net[-1].weight, std=1e-3)
        nn.init.zeros_(self.delta_net[-1].bias)

    @property
    def _dtype(self) -> torch.dtype:
        return self.delta_net[-1].weight.dtype

    def step(
        self,
        h: Tensor,
        state: RefinerState,
        *,
        context: ContextInput = None,
        active: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, RefinerState, dict[str, Any]]:
        """`slot_step` on the active rows only, packed (`ActiveRows`); everything in it is per row, so the
        packed rows get the values a full computation would. h_next has h's dtype (see `work_dtype`)."""
        active = check_active(active, h)
        expected = self.config.context_dim if self.config.context_dim is not None else self.config.d_inner
        external = context_list(context, h, expected, "SlotTRMRefiner")
        rows = self.pack(active)
        u, block_contexts, kv = self._read(h, rows, state.reuse, attention_mask)
        prev, h_rows = state.prev, h
        if rows is not None:
            external = [rows.gather(c) for c in external]
            prev = None if prev is None else rows.gather(prev)
            h_rows = rows.gather(h)
        out = slot_step(self, h_rows, u, self._context(u, block_contexts, external), prev)

        h_next, update, confidence = out.h_next.to(h.dtype), out.update, out.confidence
        with torch.no_grad():
            slot_norms = {name: s.float().norm(dim=-1) for name, s in out.slots._asdict().items()}
        u = u.detach()
        if rows is not None:  # back to [B, L]; rows that were not computed keep h and read zero
            length = h.shape[1]
            h_next = rows.scatter(h_next, into=h)
            update = rows.scatter(update, length=length)
            confidence = rows.scatter(confidence, length=length)
            slot_norms = {name: rows.scatter(n, length=length) for name, n in slot_norms.items()}
            u = rows.scatter(u, into=state.prev, length=length)
        elif active is not None:  # every row was computed: carry the inactive ones through
            keep = active.unsqueeze(-1)
            h_next, update = torch.where(keep, h_next, h), torch.where(keep, update, torch.zeros_like(update))

        step_stats: dict[str, Any] = {
            "update_norm": update.detach().float().norm(dim=-1),
            "slot_norms": slot_norms,
            "confidence": confidence,
        }
        reuse = None if kv is None else KeyValueReuse.record(kv, active, h_next, self.blocks[0])
        return h_next, RefinerState(prev=u, steps=state.steps + 1, reuse=reuse), step_stats

    def _read(
        self,
        h: Tensor,
        rows: ActiveRows | None,
        reuse: KeyValueReuse | None,
        attention_mask: Tensor | None,
    ) -> tuple[Tensor, list[Tensor], tuple[Tensor, Tensor] | None]:
        """u = blocks(in_proj(h)) and each block's attention context, for the `rows` only (all when None).

        Every row is a key of the attention, so the blocks before the last run on every row; the last one
        computes its queries, MLP and output for the packed rows only. A single block's keys and values
        come from `keys_values` and are returned for the next step to reuse (else None).
        """
        u = self.in_proj(h.to(self._dtype))
        contexts, kept = [], None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if rows is not None and len(self.blocks) == 1:
                kept = keys_values(block, u, h, reuse)
            u, c = block(u, attention_mask, queries=rows if last else None, keys_values=kept)
            contexts.append(c)
        if rows is not None:
            if not self.blocks:
                u = rows.gather(u)
            contexts[:-1] = [rows.gather(c) for c in contexts[:-1]]
        return u, contexts, kept

    def _context(self, u: Tensor, block_contexts: list[Tensor], external: list[Tensor]) -> Tensor:
        """c: the mean of the refiner's own block contexts and the backbone's (its layers averaged first, then
        projected to d_inner), so that the backbone counts as one source however many layers it gives."""
        sources = list(block_contexts)
        if external:
            backbone = external[0] if len(external) == 1 else torch.stack(external).mean(dim=0)
            backbone = backbone.to(u.dtype)
            sources.append(self.context_proj(backbone) if self.context_proj is not None else backbone)
        if not sources:  # no blocks and no backbone context: the representation is its own context
            return u
        return sources[0] if len(sources) == 1 else torch.stack(sources).mean(dim=0)

    def orthogonality_loss(self) -> Tensor:
        return self.slot_proj.orthogonality_loss()

    def gate_values(self, tensors: bool = False) -> dict[str, Any]:
        return self.slot_proj.gate_values(tensors)

    @torch.no_grad()
    def slot_statistics(self) -> dict[str, float]:
        """Flat, CSV-friendly parameter statistics: gate openings, projection norms, orthogonality."""
        stats = {f"gate_{name}": value for name, value in self.gate_values().items()}
        for name, w in self.slot_proj.projection_weights().items():
            stats[f"w_{name}_norm"] = w.float().norm().item()
        stats["orthogonality"] = self.orthogonality_loss().item()
        return stats


SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_blocks": 1, "mlp_ratio": 2.0},
    "base": {},
    "large": {"n_blocks": 4},
}


def create_slot_trm_refiner(d_model: int, size: str = "base", **overrides: Any) -> SlotTRMRefiner:
    """A `SlotTRMRefiner` from a size preset ('tiny', 'base', 'large'); keywords override the preset."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown refiner size {size!r}; choose one of {sorted(SIZE_PRESETS)}")
    return SlotTRMRefiner(SlotConfig(d_model=d_model, **{**SIZE_PRESETS[size], **overrides}))
