"""Slot-based TRM refiner: recursive refinement through four named slots.

Each step reads the current hidden states through the refiner's own small transformer blocks (and,
optionally, the backbone's attention contexts), splits what it sees into four slots and turns them into a
bounded, confidence-weighted residual update:

    u         = blocks(in_proj(h))                   the refiner's working representation, width d_inner
    c         = mean(block contexts [, W_ext c_bb])  concatenated heads attn@V (before the output projection)
    s_ctx     = LN(W_ctx c)                          cross-token context
    s_reason  = LN(W_reason s_ctx)                   slow logical state, read from the context slot
    s_refine  = LN(W_refine (u - sg(u_prev)) / ds)   fast update direction: the change since the last step
    s_conf    = LN(W_conf (u - mean(u))^2)           learned weighted per-token variance of u
    delta     = clamp(MLP([g_i s_i]_i), -c, c)       g_i = sigmoid(gate_i), c = delta_clamp
    p         = sigmoid(head(s_conf))                per-token confidence [B, L, 1]
    h_next    = h + ds * p * delta                   ds = delta_scale

`sg` is stop-gradient. The working width `d_inner` defaults to min(d_model, 512), so the refiner stays near
0.2 % of LLaDA-8B's parameters, and the slot widths default to fractions of it (1/2, 1/4, 1/4, 1/8), which
leaves room for the slot projections reading `d_inner`-wide inputs to be mutually orthogonal.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llada_trm.refiners.base import (
    ActiveRows,
    ContextInput,
    Refiner,
    RefinerState,
    apply_update,
    check_active,
    context_list,
)
from llada_trm.refiners.config import SlotConfig


class SlotOutput(NamedTuple):
    """The four slots of one step, each [B, L, d_slot], gated."""

    ctx: Tensor
    reason: Tensor
    refine: Tensor
    conf: Tensor


SLOT_NAMES: tuple[str, ...] = SlotOutput._fields


class AttentionContextExtractor(nn.Module):
    """Bidirectional multi-head self-attention that also returns its context.

    The context is the concatenation of the heads' outputs attn@V, taken before the output projection: it is
    the cross-token information each position gathered, in the same form as a backbone layer's context.
    """

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
        """x [B, Q, D], the asking rows -> (output, context), both [B, Q, D].

        keys_values: `keys_values(...)` of the L rows attended to (default: x's own, Q = L); attention_mask
        [B, L] (True/1 = real token, may be attended) covers those L rows.
        """
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
        """(output, context), both [B, Q, D] for the `queries` rows only when given, else [B, L, D].

        `keys_values`: the attention's keys and values of every row (`keys_values`), when already known.
        """
        if queries is not None:  # every row is a key, only the query rows ask
            if keys_values is None:
                keys_values = self.keys_values(x)
            x = queries.gather(x)
        attn_out, context = self.attn(self.attn_norm(x), attention_mask, keys_values)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, context


class SlotProjector(nn.Module):
    """Splits the refiner's view of a token into the context, reasoning, refinement and confidence slots.

    Inputs are `d_inner` wide: `h` (the refiner's working representation), `context` (attn@V) and `h_prev`
    (the working representation of the previous step, detached here). Each slot is layer-normed and, with
    `use_gates`, scaled by a learnable scalar gate sigmoid(g) that lets training turn a slot down.
    """

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

    def forward(self, h: Tensor, context: Tensor, h_prev: Tensor | None = None) -> SlotOutput:
        ctx = self.norms["ctx"](self.W_ctx(context))
        reason = self.norms["reason"](self.W_reason(ctx))
        if h_prev is None:  # first step: nothing has changed yet
            change = self.W_refine.weight.new_zeros(*h.shape[:-1], self.W_refine.out_features)
        else:
            change = self.W_refine((h - h_prev.detach()) * self.change_scale)
        refine = self.norms["refine"](change)
        variance = (h - h.mean(dim=-1, keepdim=True)).square()
        conf = self.norms["conf"](self.W_conf(variance))
        slots = SlotOutput(ctx, reason, refine, conf)
        if self.gates is None:
            return slots
        return SlotOutput(*(s * torch.sigmoid(self.gates[name]) for name, s in slots._asdict().items()))

    def projection_weights(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"W_{name}").weight for name in SLOT_NAMES}

    @torch.no_grad()
    def gate_values(self) -> dict[str, float]:
        """sigmoid(gate) per slot; a gate of any shape reports its mean, so logging never breaks on it."""
        if self.gates is None:
            return {}
        return {name: torch.sigmoid(self.gates[name].float()).mean().item() for name in SLOT_NAMES}

    @staticmethod
    @torch.no_grad()
    def slot_norms(slots: SlotOutput) -> dict[str, float]:
        """Mean per-token L2 norm of each slot."""
        return {name: s.float().norm(dim=-1).mean().item() for name, s in slots._asdict().items()}

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


class SlotTRMRefiner(Refiner):
    """Slot-based recursive refiner (see the module docstring for the step equations).

    Build it from a `SlotConfig`, or from keyword arguments: `SlotTRMRefiner(d_model=64, num_steps=2)`;
    keywords given with a config override its fields.
    """

    def __init__(self, config: SlotConfig | int | None = None, **overrides: Any) -> None:
        super().__init__()
        config = self._configure(SlotConfig, config, overrides)
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

    def _external(self, context: ContextInput, like: Tensor) -> list[Tensor]:
        """The backbone contexts as a list, checked against `like`'s [B, L] and the expected width."""
        expected = self.config.context_dim if self.config.context_dim is not None else self.config.d_inner
        return context_list(context, like, expected, "SlotTRMRefiner")

    def _context(self, u: Tensor, block_contexts: list[Tensor], context: ContextInput) -> Tensor:
        """Average the refiner's own block contexts with the backbone's context (its layers averaged first,
        then projected to d_inner), so that the backbone counts as one source however many layers it gives."""
        external = self._external(context, u)
        sources = list(block_contexts)
        if external:
            backbone = external[0] if len(external) == 1 else torch.stack(external).mean(dim=0)
            backbone = backbone.to(u.dtype)
            sources.append(self.context_proj(backbone) if self.context_proj is not None else backbone)
        if not sources:  # no blocks and no backbone context: the representation is its own context
            return u
        return sources[0] if len(sources) == 1 else torch.stack(sources).mean(dim=0)

    def step(
        self,
        h: Tensor,
        state: RefinerState,
        *,
        context: ContextInput = None,
        active: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, RefinerState, dict[str, Any]]:
        active = check_active(active, h)
        # Only the active rows are computed past the last block's keys and values: a skipped or halted chunk
        # costs its share of the attention's keys, nothing more. Everything below is per row except
        # attention, so the packed rows get the same values as a full computation would.
        rows = ActiveRows.pack(active)
        u = self.in_proj(h.to(self._dtype))
        reuse = None
        block_contexts = []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            keys_values = None
            if rows is not None and len(self.blocks) == 1:
                keys_values = self._keys_values(block, u, state.reuse)
                reuse = {"keys": keys_values[0], "values": keys_values[1], "changed": active}
            u, c = block(u, attention_mask, queries=rows if last else None, keys_values=keys_values)
            block_contexts.append(c)
        if rows is not None:
            if not self.blocks:
                u = rows.gather(u)
            block_contexts[:-1] = [rows.gather(c) for c in block_contexts[:-1]]
            context = [rows.gather(c) for c in self._external(context, h)]
        prev = state.prev if rows is None or state.prev is None else rows.gather(state.prev)
        slots = self.slot_proj(u, self._context(u, block_contexts, context), prev)

        delta = self.delta_net(torch.cat(slots, dim=-1)).clamp(-self.delta_clamp, self.delta_clamp)
        confidence = torch.sigmoid(self.confidence_head(slots.conf)).squeeze(-1)  # [B, Q]
        update = (self.delta_scale * confidence.unsqueeze(-1) * delta).to(h.dtype)
        with torch.no_grad():
            slot_norms = {name: s.float().norm(dim=-1) for name, s in slots._asdict().items()}
        u = u.detach()
        if rows is not None:  # back to [B, L]; rows that were not computed read zero
            length = h.shape[1]
            update = rows.scatter(update, length=length)
            confidence = rows.scatter(confidence, length=length)
            slot_norms = {name: rows.scatter(n, length=length) for name, n in slot_norms.items()}
            u = rows.scatter(u, into=state.prev, length=length)
        h_next, update = apply_update(h, update, active)

        step_stats: dict[str, Any] = {
            "update_norm": update.detach().float().norm(dim=-1),
            "slot_norms": slot_norms,
            "confidence": confidence,
        }
        return h_next, RefinerState(prev=u, steps=state.steps + 1, reuse=reuse), step_stats

    @staticmethod
    def _keys_values(
        block: TransformerBlock, u: Tensor, reuse: dict[str, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """The single block's keys and values of every row, recomputed only where the last step changed h.

        A row's key and value depend on its own h alone, and a step changes h only on its active rows, so
        the rest carry over from the previous step: when few chunks are refined, most of the attention's
        projections are skipped.
        """
        if reuse is None or reuse["keys"].shape[:2] != u.shape[:2]:
            return block.keys_values(u)
        changed = ActiveRows.pack(reuse["changed"])
        if changed is None:  # every row changed
            return block.keys_values(u)
        keys, values = block.keys_values(changed.gather(u))
        return changed.scatter(keys, into=reuse["keys"]), changed.scatter(values, into=reuse["values"])

    def orthogonality_loss(self) -> Tensor:
        return self.slot_proj.orthogonality_loss()

    def gate_values(self) -> dict[str, float]:
        return self.slot_proj.gate_values()

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
