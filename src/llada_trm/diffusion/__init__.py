"""Masked diffusion: LLaDA's forward process, its SFT/pre-training loss and its sampler.

``decode_generated`` lives with the tokenizer (``llada_trm.data.tokenizer``) and is re-exported here on first
use, so importing the diffusion code does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llada_trm.diffusion.forward_process import (
    answer_lengths_from_prompt,
    forward_process,
    masked_diffusion_loss,
    masked_token_accuracy,
    prompt_mask,
)
from llada_trm.diffusion.options import LLADA_EOS_ID, LLADA_EOT_ID, LLADA_MASK_ID, SamplingOptions
from llada_trm.diffusion.sampler import GenerationResult, generate, generate_with_stats, sample
from llada_trm.diffusion.steps import StepEvent
from llada_trm.diffusion.unmasking import add_gumbel_noise, get_num_transfer_tokens

__all__ = [
    "LLADA_EOS_ID",
    "LLADA_EOT_ID",
    "LLADA_MASK_ID",
    "GenerationResult",
    "SamplingOptions",
    "StepEvent",
    "add_gumbel_noise",
    "answer_lengths_from_prompt",
    "decode_generated",
    "forward_process",
    "generate",
    "generate_with_stats",
    "get_num_transfer_tokens",
    "masked_diffusion_loss",
    "masked_token_accuracy",
    "prompt_mask",
    "sample",
]


def __getattr__(name: str):
    if name != "decode_generated":
        raise AttributeError(f"module 'llada_trm.diffusion' has no attribute {name!r}")
    value = importlib.import_module("llada_trm.data.tokenizer").decode_generated
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from llada_trm.data.tokenizer import decode_generated
