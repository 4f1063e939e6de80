"""The sampler's settings: one frozen, validated object that every entry point builds or takes.

A bad value fails when the options are made (a CLI flag, a compare config, ``generate``'s arguments), with
one message naming the setting, not deep inside the denoising loop.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
LLADA_EOT_ID = 126348
REMASKING_STRATEGIES = ("low_confidence", "random")
CACHE_MODES = ("prefix", "dual")
DIGIT_ORDERS = ("confidence", "lsd_first")
# Ceilings that hold whatever the model: no LLaDA backbone has more positions than MAX_GEN_LENGTH (nor
# needs more steps), and a batch beyond MAX_BATCH_SIZE prompts only exhausts memory. The backbone's own
# max_sequence_length bounds prompt + gen_length where the prompts are known (`evaluate_model`).
MAX_GEN_LENGTH = 32768
MAX_STEPS = 32768
MAX_BATCH_SIZE = 4096

# Token ids are facts of the model's tokenizer, not sampling choices: `to_dict` leaves them out, so a
# summary never records LLaDA-8B's ids for a run that used another tokenizer's.
_TOKEN_ID = {"recorded": False}


@dataclass(frozen=True)
class SamplingOptions:
    """LLaDA's sampler settings, with Fast-dLLM's ``threshold`` decoding and block-wise KV ``cache``
    (docs/architecture.md, `llada_trm.diffusion`, describes each). The defaults suit the embedded tiny
    backbone (answers up to ~114 tokens); LLaDA-8B's GSM8K setting is gen_length 256, block_length 8 or 32,
    steps = gen_length. ``batch_size`` and ``seed`` are read by the callers that batch and seed a whole run
    (``evaluate_model``, which also fills in ``digit_ids`` for ``digit_order="lsd_first"``).
    """

    steps: int = 64
    gen_length: int = 128
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float = 0.0
    batch_size: int = 16
    seed: int = 0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    digit_order: str = "confidence"
    mask_id: int = field(default=LLADA_MASK_ID, metadata=_TOKEN_ID)
    eos_id: int = field(default=LLADA_EOS_ID, metadata=_TOKEN_ID)
    eot_id: int = field(default=LLADA_EOT_ID, metadata=_TOKEN_ID)
    digit_ids: tuple[int, ...] = field(default=(), metadata=_TOKEN_ID)

    def __post_init__(self) -> None:
        for name in ("steps", "gen_length", "block_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.gen_length > MAX_GEN_LENGTH:
            raise ValueError(f"gen_length must be in 1..{MAX_GEN_LENGTH}, got {self.gen_length}")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks gen_length / block_length "
                f"= {self.num_blocks}"
            )
        self._check_choices()

    def _check_choices(self) -> None:
        for name in ("temperature", "cfg_scale", "threshold"):
            value = getattr(self, name)
            if value is None and name == "threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                # NaN passes every `<` test and inf scales every logit: refused here, wherever it came from
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 disables guidance), got {self.cfg_scale}")
        if self.remasking not in REMASKING_STRATEGIES:
            choices = ", ".join(REMASKING_STRATEGIES)
            raise ValueError(f"remasking must be one of {choices}, got {self.remasking!r}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or None, got {self.threshold}")
        if self.cache is not None and self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be None, 'prefix' or 'dual', got {self.cache!r}")
        if self.digit_order not in DIGIT_ORDERS:
            choices = ", ".join(DIGIT_ORDERS)
            raise ValueError(f"digit_order must be one of {choices}, got {self.digit_order!r}")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def float64_confidence(self) -> bool:
        """Fast-dLLM's decoding takes the confidence softmax in float64; LLaDA's in the logits' own dtype."""
        return self.threshold is not None or self.cache is not None

    def to_dict(self) -> dict[str, Any]:
        """The settings a run's summary records (every field but the tokenizer's ids). ``digit_order`` only
        when it is not the default: `compare --resume` compares these dicts, and evaluations recorded
        before the option existed used LLaDA's order."""
        recorded = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("recorded", True)}
        if self.digit_order == "confidence":
            del recorded["digit_order"]
        return recorded
