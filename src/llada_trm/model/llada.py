"""The LLaDA backbone: a llama-style transformer with bidirectional attention. Per block (pre-norm, as in
LLaDA's `LLaDALlamaBlock`):

    c = softmax(RoPE(q) RoPE(k)^T / sqrt(head_dim) + padding_bias) v      q, k, v from attn_norm(x)
    x = x + attn_out(c)
    h = ff_norm(x)
    x = x + ff_out(silu(ff_proj(h)) * up_proj(h))                          ff_proj is the gate

then `ln_f` and the output layer. Module names reproduce LLaDA's state-dict keys, so released checkpoints
load without renaming. Numerics follow the reference: RMSNorm statistics and RoPE in float32, RoPE on
absolute positions with the rotate-half convention, padding as an additive `finfo.min` bias on padded keys.
With a `KVCache` (Fast-dLLM's prefix and dual caches) the forward runs on a window of the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llada_trm.errors import ConfigError
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.llada_weights import (
    DTypeLike,
    check_layout,
    load_weights,
    read_config,
    save_state_dict,
)

# Fast-dLLM's block-wise key/value cache (arXiv:2505.22618). A cached key is exact only while everything it
# attended to is unchanged; semi-autoregressive sampling keeps keys close enough (Fast-dLLM's observation).
# The prefix and dual caches are one rule: a forward on the tokens at absolute positions start .. start+S-1
# attends to cache[:start] ++ new ++ cache[start+S:]. Keys are stored after RoPE (rotation depends only on the
# absolute position, so this equals the reference's rotating the concatenation each time, and is cheaper).


@dataclass
class KVCache:
    """Per-layer keys and values of a token sequence, plus its padding mask.

    keys[i], values[i]: [B, n_kv_heads, T, head_dim] of block i (keys with RoPE at absolute positions 0..T-1).
    attention_mask: [B, T] (1 = real token) for the cached positions, or None when none is padded.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attention_mask: torch.Tensor | None = None

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
    def splice(cached: torch.Tensor, new: torch.Tensor, start: int) -> torch.Tensor:
        """`cached[..., :start, :] ++ new ++ cached[..., start+S:, :]` along the position axis (dim 2)."""
        end = start + new.shape[2]
        if start == cached.shape[2]:  # prefix cache: a plain append
            return torch.cat((cached, new), dim=2)
        return torch.cat((cached[:, :, :start], new, cached[:, :, end:]), dim=2)

    def key_mask(self, start: int, new_mask: torch.Tensor | None, new_length: int) -> torch.Tensor | None:
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


@dataclass
class BackboneOutput:
    """What one backbone pass returns: `attention_contexts[i]` is block i's concatenated head outputs (attn @
    V, the input of its `attn_out`), keyed by the layer index as the caller passed it (`-1` stays `-1`)."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    attention_contexts: dict[int, torch.Tensor] = field(default_factory=dict)
    past_key_values: KVCache | None = None


class RMSNorm(nn.Module):
    """RMSNorm with float32 statistics even for bf16/fp16 activations (LLaDA's `RMSLayerNorm`)."""

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        x = self.weight * x
        return x + self.bias if self.bias is not None else x


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (sin, cos) of shape [L, head_dim] for absolute positions offset..offset+L-1.

    Frequency j is used by both dims j and j + head_dim/2. Each entry depends only on its own position, so a
    window's tables equal the matching rows of the full sequence's tables bit for bit.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.sin(), angles.cos()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, L, head_dim] queries or keys; computed in float32 and cast back, as LLaDA does."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with LLaDA's parameter names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        d, hidden = config.d_model, config.effective_mlp_hidden_size
        kv_dim = config.effective_n_kv_heads * config.head_dim
        qkv_bias = config.include_bias or config.include_qkv_bias
        bias = config.include_bias

        self.attn_norm = RMSNorm(d, config.rms_norm_eps, bias=config.layer_norm_bias)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, bias=config.layer_norm_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)  # gate
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)
        self.dropout = nn.Dropout(config.residual_dropout)

    def attention(
        self,
        x: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        attn_bias: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: int = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Bidirectional attention of the L input positions over every key.

        Without `past` the keys are the inputs' own. With `past` (cached rotated keys and values
        [B, n_kv_heads, T, head_dim]) the inputs sit at absolute positions `cache_position..+L-1` and the keys
        are `past[:cache_position] ++ own ++ past[cache_position+L:]`. Returns the concatenated head outputs
        [B, L, n_heads*head_dim] and the (keys, values) attended to, for the caller's cache.
        """
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        if past is not None:
            k = KVCache.splice(past[0], k, cache_position)
            v = KVCache.splice(past[1], v, cache_position)
        present = (k, v)
        if self.n_kv_heads != self.n_heads:  # grouped KV: query head h reads kv head h // group
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if attn_bias is not None and attn_bias.dtype != q.dtype:  # autocast: recast, keeping it finite
            attn_bias = attn_bias.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
        dropout = self.attention_dropout if self.training else 0.0
        c = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout, is_causal=False)
        return c.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim), present

    def forward(
        self,
        x: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        attn_bias: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns (new residual stream, attention context, (keys, values) attended to)."""
        context, present = self.attention(self.attn_norm(x), sin, cos, attn_bias, past, cache_position)
        x = x + self.dropout(self.attn_out(context))
        h = self.ff_norm(x)
        x = x + self.dropout(self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)))
        return x, context, present


def init_module(module: nn.Module, std: float) -> None:
    """One module's init from scratch: linear and embedding weights N(0, std), RMSNorm weights 1, biases 0;
    other modules (containers) are left as they are."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LLaDAModel(nn.Module):
    """LLaDA's network under LLaDA's parameter names (`model.transformer.*`)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.head_dim = config.head_dim  # read once here, so a forward runs no config code
        self.gradient_checkpointing = False  # recompute each block in backward (training only)
        vocab_rows = config.effective_embedding_size
        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_rows, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps, bias=config.layer_norm_bias),
            }
        )
        if not config.weight_tying:
            transformer["ff_out"] = nn.Linear(config.d_model, vocab_rows, bias=config.include_bias)
        # LLaDA's checkpoints come from an HF wrapper holding the network as `.model`; mirror that nesting.
        self.model = nn.ModuleDict({"transformer": transformer})
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------------ convenient handles
    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.transformer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def wte(self) -> nn.Embedding:
        return self.model.transformer.wte

    @property
    def ln_f(self) -> RMSNorm:
        return self.model.transformer.ln_f

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def reset_parameters(self) -> None:
        """Init for training from scratch: N(0, init_std), residual outputs scaled by 1/sqrt(2 n_layers)."""
        for name, module in self.named_modules():
            residual_out = isinstance(module, nn.Linear) and name.endswith((".attn_out", ".ff_out"))
            residual_out = residual_out and ".blocks." in name
            scale = 1 / math.sqrt(2 * self.config.n_layers) if residual_out else 1.0
            init_module(module, self.config.init_std * scale)

    # ------------------------------------------------------------------ forward
    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., embedding_size] from hidden states already normalised by `ln_f`."""
        weight = self.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        bias = None if self.config.weight_tying else self.transformer.ff_out.bias
        logits = F.linear(h, weight, bias)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return logits

    def lm_head_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The output layer's rows of `token_ids` [..., d_model], scaled as `lm_head` scales its logits, so
        that logit_v(h) = rows[v] . h + bias_v: what an update of h can do to each logit."""
        weight = self.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        rows = weight[token_ids]
        if self.config.scale_logits:
            rows = rows * (1 / math.sqrt(self.config.d_model))
        return rows

    def resolve_layers(self, context_layers: Sequence[int]) -> dict[int, int]:
        """Each asked layer index (negative ones count from the end) -> its block index."""
        n = self.config.n_layers
        resolved = {}
        for index in context_layers:
            if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
                raise ConfigError(
                    f"context layer {index!r} is out of range for a {n}-layer backbone (use -{n}..{n - 1})"
                )
            resolved[index] = index % n
        return resolved

    @staticmethod
    def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention bias [B, 1, 1, L] that removes padded keys; None when nothing is padded."""
        if attention_mask is None:
            return None
        keep = attention_mask.bool()
        if bool(keep.all()):
            return None
        bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        bias.masked_fill_(~keep, torch.finfo(dtype).min)  # finite, so an all-padding row gives no NaN
        return bias[:, None, None, :]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_layers: Sequence[int] = (),
        output_logits: bool = True,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        cache_position: int | None = None,
    ) -> BackboneOutput:
        """Run on token ids [B, L]; `attention_mask` [B, L] has 1 for real tokens, 0 for padding.

        With `past_key_values` (`KVCache`), `input_ids` sit at absolute positions `cache_position..+L-1`
        (default: right after the cache) and attend to the cached keys around them plus their own;
        `attention_mask` covers only `input_ids`, and every output only the L positions run. `use_cache=True`
        also returns `past_key_values`: the cache of all attended positions.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            shapes = f"{tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            raise ValueError(f"attention_mask shape {shapes}")
        start = self._cache_start(past_key_values, cache_position, input_ids.shape)
        wanted = self.resolve_layers(context_layers)
        x = self.wte(input_ids)
        if self.config.input_emb_norm:
            x = x * (self.config.d_model**0.5)
        x = self.embedding_dropout(x)
        sin, cos = rotary_tables(
            input_ids.shape[1], self.head_dim, self.config.rope_theta, x.device, offset=start
        )
        key_mask = attention_mask
        if past_key_values is not None:
            key_mask = past_key_values.key_mask(start, attention_mask, input_ids.shape[1])
        attn_bias = self.padding_bias(key_mask, x.dtype)

        contexts: dict[int, torch.Tensor] = {}
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            past = None
            if past_key_values is not None:
                past = (past_key_values.keys[i], past_key_values.values[i])
            if use_checkpoint:
                x, context, (k, v) = checkpoint(
                    block, x, sin, cos, attn_bias, past, start, use_reentrant=False
                )
            else:
                x, context, (k, v) = block(x, sin, cos, attn_bias, past, start)
            if use_cache:
                keys.append(k)
                values.append(v)
            for asked, layer in wanted.items():
                if layer == i:
                    contexts[asked] = context
        h = self.ln_f(x)
        logits = self.lm_head(h) if output_logits else None
        cache = KVCache(keys, values, key_mask) if use_cache else None
        return BackboneOutput(
            logits=logits, hidden_states=h, attention_contexts=contexts, past_key_values=cache
        )

    def _cache_start(
        self, cache: KVCache | None, cache_position: int | None, shape: tuple[int, ...]
    ) -> int:
        """Absolute position of input_ids[:, 0]: 0 without a cache, else cache_position (default: its end)."""
        if cache is None:
            if cache_position is not None:
                raise ValueError(
                    "cache_position only applies with past_key_values; pass the cache built by a forward "
                    "with use_cache=True, or leave cache_position unset"
                )
            return 0
        if not isinstance(cache, KVCache):
            raise ValueError(
                f"past_key_values must be a KVCache returned by a forward with use_cache=True, "
                f"got {type(cache).__name__}"
            )
        if cache.num_layers != self.config.n_layers:
            raise ValueError(
                f"past_key_values has {cache.num_layers} layers but the model has {self.config.n_layers}"
            )
        start = cache.length if cache_position is None else cache_position
        if isinstance(start, bool) or not isinstance(start, int):
            raise ValueError(f"cache_position must be an int, got {start!r}")
        cache.check_window(start, shape[1], shape[0])
        return start

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: DTypeLike = None, device: str | torch.device | None = None
    ) -> LLaDAModel:
        """Load a LLaDA-layout checkpoint (config.json + model.safetensors or a sharded index).

        The model is built on the meta device and each tensor is read from its shard straight into place, so
        peak memory is one copy of the weights. `dtype=None` keeps the stored dtype. Returns it in eval mode.
        """
        config = read_config(path)
        check_layout(config, path)  # the config's sizes against the weights' headers, before any module
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, path, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_size: int | str | None = None) -> None:
        """Write config.json and safetensors weights (sharded HF-style above `max_shard_size`, e.g. "2GB")."""
        save_state_dict(self.state_dict(), self.config, path, max_shard_size=max_shard_size)
