"""The slot refiner's transformer blocks: bidirectional attention that also hands out its context.

A block can compute its attention for a subset of the rows (the refined ones) against the keys and values of
every row, and take those keys and values precomputed; the slot refiner uses both to skip the rows it does not
refine (see `SlotTRMRefiner.step`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llada_trm.refiners.rows import ActiveRows


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
