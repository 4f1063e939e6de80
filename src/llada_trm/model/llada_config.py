"""`LLaDAConfig`: the architecture hyper-parameters, spelled exactly as in LLaDA's own `config.json`, so a
released checkpoint's config loads as is and one we save loads in LLaDA's code.

Of OLMo's many fields (LLaDA inherits its config) only those that change the network's math are kept; other
keys are ignored on load, and variants no LLaDA model uses (ALiBi, QK-norm, a non-llama block, ...) are
refused rather than silently mis-computed. Defaults are LLaDA-8B's values (OLMo's describe GPT-2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llada_trm.errors import ConfigError
from llada_trm.text import read_utf8

# Fields without which no model can be built; a config.json lacking one is an error, not a default.
REQUIRED_FIELDS = ("d_model", "n_heads", "n_layers", "vocab_size")

# Ceilings on every size, checked before a single block is built: LLaDA-8B uses at most a tenth of each, and
# past them a typo (`n_layers: 100000`) would spend minutes building modules (or exhaust memory) before the
# weights could disagree with it.
MAX_SIZES = {
    "d_model": 65536,
    "n_heads": 1024,
    "n_kv_heads": 1024,
    "n_layers": 1024,
    "vocab_size": 4_194_304,
    "embedding_size": 4_194_304,
    "mlp_ratio": 64,
    "mlp_hidden_size": 1_048_576,
    "max_sequence_length": 1_048_576,
    "block_group_size": 1024,
}
_TOKEN_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id")

# The only values of LLaDA's "which variant" switches that this implementation computes.
_SUPPORTED = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "rope": (True,),
    "rope_full_precision": (True,),
    "alibi": (False,),
    "attention_layer_norm": (False,),
    "layer_norm_with_affine": (True,),
    "block_group_size": (1,),
}


@dataclass
class LLaDAConfig:
    """Hyper-parameters of a LLaDA backbone (llama-style bidirectional transformer)."""

    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None  # None: mlp_ratio * d_model
    embedding_size: int | None = None  # rows of wte / ff_out; None: vocab_size
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    bias_for_layer_norm: bool | None = None  # None: follows include_bias
    scale_logits: bool = False  # logits / sqrt(d_model)
    input_emb_norm: bool = False  # embeddings * sqrt(d_model)
    multi_query_attention: bool | None = None
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    init_std: float = 0.02
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    # Variant switches: stored so a saved config states them, validated against _SUPPORTED.
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    rope: bool = True
    rope_full_precision: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    layer_norm_with_affine: bool = True
    block_group_size: int = 1

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        """Number of key/value heads, resolving LLaDA's `n_kv_heads` / `multi_query_attention` pair."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        """Rows of the embedding and output matrices (>= vocab_size; LLaDA pads it for throughput)."""
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    def num_parameters(self) -> int:
        """The parameter count a model of this config holds (biases aside), known before building it."""
        d, kv = self.d_model, self.effective_n_kv_heads * self.head_dim
        block = d * d * 2 + d * kv * 2 + 3 * d * self.effective_mlp_hidden_size + 2 * d
        embeddings = self.effective_embedding_size * d * (1 if self.weight_tying else 2)
        return self.n_layers * block + embeddings + d

    @property
    def layer_norm_bias(self) -> bool:
        return self.include_bias if self.bias_for_layer_norm is None else self.bias_for_layer_norm

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kinds = str(f.type)
            if value is None:
                if "None" not in kinds:
                    raise ConfigError(f"LLaDAConfig.{f.name} must not be None")
                continue
            if kinds.startswith("bool"):
                ok = isinstance(value, bool)
            elif kinds.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kinds.startswith("float"):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    setattr(self, f.name, float(value))
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ConfigError(f"LLaDAConfig.{f.name} must be {kinds}, got {value!r}")

    def validate(self) -> None:
        """Raise `ConfigError` on sizes that cannot build a model or variants this code does not compute."""
        self._check_variants()
        self._check_sizes()
        self._check_numbers()

    def _check_variants(self) -> None:
        for name, allowed in _SUPPORTED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"LLaDAConfig.{name}={value!r} is not supported (LLaDA models use {allowed[0]!r}); "
                    f"only LLaDA's llama-style architecture is implemented"
                )

    def _check_ceilings(self) -> None:
        """Every size under `MAX_SIZES`, every token id >= 0 (before any module is built)."""
        for name, ceiling in MAX_SIZES.items():
            value = getattr(self, name)
            if value is not None and value > ceiling:
                raise ConfigError(
                    f"LLaDAConfig.{name}={value} is past this package's ceiling of {ceiling}; the "
                    "config.json is damaged or not a LLaDA model's"
                )
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if not 0 <= value < MAX_SIZES["embedding_size"]:  # the tokenizer's ids are checked on load
                raise ConfigError(f"LLaDAConfig.{name} must be a token id (>= 0), got {value}")

    def _check_sizes(self) -> None:
        """Positive sizes that divide as attention needs (heads, rotary halves, key/value groups)."""
        for name in ("d_model", "n_heads", "n_layers", "vocab_size", "max_sequence_length", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LLaDAConfig.{name} must be positive, got {getattr(self, name)}")
        self._check_ceilings()
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads is not None and self.multi_query_attention is not None:
            expected = 1 if self.multi_query_attention else self.n_heads
            if self.n_kv_heads != expected:
                mqa = self.multi_query_attention
                raise ConfigError(f"n_kv_heads={self.n_kv_heads} contradicts multi_query_attention={mqa}")
        kv = self.effective_n_kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ConfigError(f"n_heads={self.n_heads} must be a positive multiple of n_kv_heads={kv}")
        if self.effective_mlp_hidden_size <= 0:
            raise ConfigError(f"mlp_hidden_size must be positive, got {self.effective_mlp_hidden_size}")
        if self.effective_embedding_size < self.vocab_size:
            raise ConfigError(
                f"embedding_size={self.embedding_size} is smaller than vocab_size={self.vocab_size}"
            )

    def _check_numbers(self) -> None:
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if not (0 < self.rms_norm_eps < 1):
            raise ConfigError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if not (0 <= self.init_std < math.inf):
            raise ConfigError(f"init_std must be a finite number >= 0, got {self.init_std}")
        for name in ("embedding_dropout", "attention_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> LLaDAConfig:
        """Build from a LLaDA-style dict; unknown keys (OLMo's init/precision fields, HF's) are ignored.

        `source` names where the dict came from, for error messages.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [name for name in REQUIRED_FIELDS if data.get(name) is None]
        if missing:
            raise ConfigError(f"{source}: missing required LLaDA config field(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> LLaDAConfig:
        path = Path(path)
        try:
            text = read_utf8(path, ConfigError)  # a non-UTF-8 byte is named with the file, line and column
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to read; restore the model's config.json") from None
        return cls.from_dict(data, source=str(path))

    def to_llada_json_dict(self) -> dict[str, Any]:
        """The dict written as config.json: our fields plus the HF markers LLaDA's own config carries."""
        return {**self.to_dict(), "architectures": ["LLaDAModelLM"], "model_type": "llada"}

    def save(self, path: str | Path) -> None:
        """Write as a LLaDA-style config.json (atomically)."""
        from llada_trm.io import write_text_atomic  # imports torch, which reading a config does not need

        write_text_atomic(path, json.dumps(self.to_llada_json_dict(), indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def llada_8b(cls) -> LLaDAConfig:
        """LLaDA-8B (Base and Instruct share the architecture)."""
        return cls(
            d_model=4096,
            n_heads=32,
            n_kv_heads=32,
            n_layers=32,
            mlp_hidden_size=12288,
            vocab_size=126464,
            embedding_size=126464,
        )  # every other field's default is LLaDA-8B's value
