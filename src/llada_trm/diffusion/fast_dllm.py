"""Fast-dLLM's block decoders: confidence-threshold parallel decoding and block-wise KV caches.

Token-identical to ``generate`` (threshold), ``generate_with_prefix_cache`` and ``generate_with_dual_cache``
of NVlabs/Fast-dLLM's ``llada/generate.py`` (see each function for where the accounting differs). Each
decoder denoises one block ``[block_start, block_end)`` of ``x`` in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llada_trm.diffusion.denoiser import Denoiser
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.steps import report_commit
from llada_trm.diffusion.unmasking import commit_step, get_num_transfer_tokens


def _block_done(x: Tensor, block_start: int, block_end: int, mask_id: int) -> bool:
    return not bool((x[:, block_start:block_end] == mask_id).any())


def denoise_block_parallel(
    x: Tensor,
    denoiser: Denoiser,
    block_start: int,
    block_end: int,
    options: SamplingOptions,
    generator: torch.Generator | None,
) -> None:
    """Threshold decoding without a cache: full-sequence steps until the block has no mask left.

    Each step reveals at least one token, so ``block_length`` steps suffice; the cap only matters for a model
    that predicts the mask token.
    """
    for _ in range(block_end - block_start):
        if _block_done(x, block_start, block_end, options.mask_id):
            break
        committed = commit_step(x, denoiser(x), block_end, None, options, generator)
        report_commit(denoiser.observer, x, 0, committed)


def denoise_block_cached(
    x: Tensor,
    denoiser: Denoiser,
    block_start: int,
    block_end: int,
    options: SamplingOptions,
    generator: torch.Generator | None,
) -> None:
    """Denoise one block with a KV cache, as Fast-dLLM's ``generate_with_prefix_cache`` / ``_dual_cache``.

    Step 0 is a full forward that builds the cache (and counts as one NFE). Then at least one cached step runs
    even if step 0 completed the block (Fast-dLLM counts that call too), and the block ends as soon as it has
    no mask left. With the fixed schedule step i reveals ``schedule[i]`` tokens, so a block stops early when
    the schedule ends in zeros, and never runs more than ``steps_per_block`` steps (where Fast-dLLM would fail
    on a model that keeps predicting the mask token); with ``threshold`` at most ``block_length`` cached steps
    run. Unlike Fast-dLLM's prefix-cache loop, no extra Gumbel noise is drawn and discarded per cached step,
    so at temperature > 0 the random stream (not the distribution) differs from that reference.
    """
    block_length = block_end - block_start
    schedule = None
    if options.threshold is None:
        masked = x[:, block_start:block_end] == options.mask_id
        schedule = get_num_transfer_tokens(masked, options.steps_per_block)
    logits, kv = denoiser.run(x, build_cache=True)
    if kv is None:
        raise ValueError(
            f"cache={options.cache!r} needs a model that returns past_key_values when called with "
            "use_cache=True (LLaDAModel, LLaDATRMHybrid); use cache=None for this model"
        )
    first = None if schedule is None else schedule[:, 0]
    report_commit(denoiser.observer, x, 0, commit_step(x, logits, block_end, first, options, generator))
    # The prefix cache keeps the positions before the block and runs the block plus everything after it;
    # the dual cache keeps the whole sequence and runs only the block.
    window_end = None if options.cache == "prefix" else block_end
    if options.cache == "prefix":
        kv = kv.truncate(block_start)
    window = x[:, block_start:window_end]  # a view: commits write through to x
    limit = block_length + 1 if schedule is None else options.steps_per_block
    for step in range(1, limit):
        logits, _ = denoiser.run(x, cache=kv, start=block_start, end=window_end)
        transfer = None if schedule is None else schedule[:, step]
        committed = commit_step(window, logits, block_length, transfer, options, generator)
        report_commit(denoiser.observer, x, block_start, committed)
        if _block_done(x, block_start, block_end, options.mask_id):
            break
