"""Masked diffusion: LLaDA's forward process, its SFT/pre-training loss and its sampler."""

from llada_trm.diffusion.forward_process import answer_lengths_from_prompt, forward_process, prompt_mask
from llada_trm.diffusion.loss import masked_diffusion_loss, masked_token_accuracy
from llada_trm.diffusion.sampler import (
    LLADA_EOS_ID,
    LLADA_EOT_ID,
    LLADA_MASK_ID,
    GenerationResult,
    add_gumbel_noise,
    decode_generated,
    generate,
    generate_with_stats,
    get_num_transfer_tokens,
)

__all__ = [
    "LLADA_EOS_ID",
    "LLADA_EOT_ID",
    "LLADA_MASK_ID",
    "GenerationResult",
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
]
