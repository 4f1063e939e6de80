"""FLOP floors: what an overhead would cost if only the matrix products it cannot avoid were computed.

A benchmark's measured overhead means little until it is set against its floor: the work the shapes and the
counted rows force. Every count here is of matrix products only, at 2 FLOPs per multiply-add (the convention
of `torch.utils.flop_counter.FlopCounterMode`, which the tests check these formulas against); norms,
activations, softmax and biases are left out, as they are small next to the products at any width that
matters. Per row (a token position of one sequence):

    backbone token   = n_layers x [2 d (d + 2 kv + d)  + 4 S d  + 6 d F]  (+ 2 d V with the LM head)
                       projections q k v o, scores and attn@V over S keys, SwiGLU gate/up/down
    slot refiner row = 2 D di [in_proj] + 2 C di [context_proj]
                       + n_blocks x [8 di^2 + 4 S di + 4 di H]
                       + 2 (di c_ctx + c_ctx c_reason + di c_refine + di c_conf)    (no W_refine on step 1)
                       + 2 (T di + di D) [delta_net] + 2 (c_conf h + h) [confidence head]
    MLP refiner row  = 2 D Hm + 2 Hm D + 2 D [+ 2 C D with a context]
    LM-head row      = 2 d V

(d, F, V, kv: the backbone's width, SwiGLU width, embedding rows and key/value width; D, di, C, H: the
refiner's d_model, d_inner, context width and block MLP width; c_*: slot widths, T their sum, h = c_conf / 2.)
The refiner's floor is the rows it refines times those per-row costs, step by step: it counts the refined
rows' own keys and values but treats the other rows' (which serve as keys) as free, so a refiner that computes
more rows than it refines (earlier blocks on every row, keys of rows it leaves alone) shows above its floor.

Weight reads. At batch 1 a sampling call computes a few dozen rows, and each matrix product is bound by
reading its weights, not by its FLOPs (LLaDA-8B's LM head is 1.04 GB in bf16: reading it once costs more than
multiplying 100 rows by it on a CPU, and about as much as 200 rows on an H200). The weight-read floor counts
bytes instead: every backbone call reads its layers and LM head once, every LM-head call inside refinement
the LM head again, every refiner step the refiner's weights (`weight_bytes`). A measured overhead then lies
between its FLOP floor (large batches) and its weight-read floor (batch 1 on a bandwidth-bound machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.refiners.config import MLPRefinerConfig, SlotConfig

LLADA_8B_LAYERS = 32


def linear(d_in: int, d_out: int) -> int:
    """FLOPs of one row through a d_in -> d_out linear layer."""
    return 2 * d_in * d_out


def attention_core(keys: int, width: int) -> int:
    """FLOPs of one query row's scores over `keys` keys plus its attn@V, `width` = heads x head_dim."""
    return 4 * keys * width


def backbone_token_flops(config: LLaDAConfig, keys: int, with_lm_head: bool = True) -> int:
    """FLOPs of one token through the LLaDA backbone attending to `keys` positions (its own included)."""
    d, hidden = config.d_model, config.effective_mlp_hidden_size
    kv = config.effective_n_kv_heads * config.head_dim
    per_layer = (
        linear(d, d) + 2 * linear(d, kv) + linear(d, d)  # q, k, v, attn_out
        + attention_core(keys, config.n_heads * config.head_dim)
        + 2 * linear(d, hidden) + linear(hidden, d)  # SwiGLU: ff_proj (gate), up_proj, ff_out
    )
    head = lm_head_row_flops(config) if with_lm_head else 0
    return config.n_layers * per_layer + head


def lm_head_weight_bytes(config: LLaDAConfig, element_bytes: int) -> int:
    """Bytes of the LM head's weight (d x V), read once per call whatever its row count."""
    return config.d_model * config.effective_embedding_size * element_bytes


def backbone_weight_bytes(config: LLaDAConfig, element_bytes: int) -> int:
    """Bytes of the weights one backbone call reads: every layer's projections and the LM head (the
    embedding lookup reads only the rows it needs, and norms are vectors)."""
    d, hidden = config.d_model, config.effective_mlp_hidden_size
    kv = config.effective_n_kv_heads * config.head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * hidden
    return config.n_layers * per_layer * element_bytes + lm_head_weight_bytes(config, element_bytes)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters: what one call of it reads (a refiner step reads all of its own)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def lm_head_row_flops(config: LLaDAConfig) -> int:
    """FLOPs of the LM head on one row: d x V multiply-adds (V = the embedding rows it returns)."""
    return linear(config.d_model, config.effective_embedding_size)


def slot_row_flops(config: SlotConfig, keys: int, first_step: bool = False, with_context: bool = True) -> int:
    """FLOPs of one refined row through one `slot_step`, its blocks attending to `keys` rows.

    `first_step`: W_refine is skipped (there is no change yet). `with_context`: the backbone's attention
    context is projected (when its width differs from d_inner).
    """
    di, dims = config.d_inner, config.slot_dims
    hidden = max(1, int(di * config.mlp_ratio))
    flops = linear(config.d_model, di) if di != config.d_model else 0
    if with_context and config.context_dim is not None and config.context_dim != di:
        flops += linear(config.context_dim, di)
    block = 4 * linear(di, di) + attention_core(keys, di) + linear(di, hidden) + linear(hidden, di)
    flops += config.n_blocks * block
    flops += linear(di, dims["ctx"]) + linear(dims["ctx"], dims["reason"]) + linear(di, dims["conf"])
    if not first_step:
        flops += linear(di, dims["refine"])
    flops += linear(config.slot_total, di) + linear(di, config.d_model)
    conf_hidden = max(1, dims["conf"] // 2)
    return flops + linear(dims["conf"], conf_hidden) + linear(conf_hidden, 1)


def mlp_row_flops(config: MLPRefinerConfig, with_context: bool = False) -> int:
    """FLOPs of one refined row through the MLP baseline's step (the hybrid passes it no context)."""
    d, hidden = config.d_model, config.hidden_dim
    flops = linear(d, hidden) + linear(hidden, d) + linear(d, 1)
    if with_context and config.context_dim is not None:
        flops += linear(config.context_dim, d)
    return flops


@dataclass(frozen=True)
class Floor:
    """An overhead's floor: its FLOPs and their share of a reference (the backbone's FLOPs, same work)."""

    flops: float
    reference_flops: float

    @property
    def fraction(self) -> float:
        """flops / reference_flops: the overhead, as a fraction of the reference, that the shapes force."""
        return self.flops / self.reference_flops if self.reference_flops > 0 else math.nan


def measured_over_floor(measured: float, floor: float) -> float:
    """measured / floor, nan when the floor is not positive (nothing forced: no ratio to speak of)."""
    return measured / floor if floor > 0 and math.isfinite(floor) else math.nan


@dataclass(frozen=True)
class Extrapolated:
    """A quantity carried from the `measured_layers` of a run to `layers`: labelled, never measured."""

    value: float
    measured_layers: int
    layers: int

    @property
    def label(self) -> str:
        return f"extrapolated from {self.measured_layers} to {self.layers} layers"


def extrapolate_layers(
    fixed: float, per_layer_total: float, measured_layers: int, layers: int = LLADA_8B_LAYERS
) -> Extrapolated:
    """fixed + per_layer_total x layers / measured_layers: a cost measured on `measured_layers` layers (the
    per-layer part `per_layer_total`, the rest `fixed`, e.g. embedding and LM head) at `layers` layers.

    Linear in the layer count because every layer has the same shapes; a measurement's fixed part (the LM
    head, the refiner) does not grow with depth, which is why ratios move when the depth does.
    """
    if measured_layers < 1 or layers < 1:
        raise ValueError(f"layer counts must be positive, got {measured_layers} and {layers}")
    return Extrapolated(fixed + per_layer_total * layers / measured_layers, measured_layers, layers)
