"""LLaDA's reverse process: start from an all-mask answer and un-mask it block by block.

With the defaults this is token-identical to ``generate`` in ML-GSAI/LLaDA, random draws included;
``threshold`` and ``cache`` switch to Fast-dLLM's decoding (``fast_dllm``). :func:`sample` is the one entry
point; ``Denoiser`` owns the model call, ``commit_step`` the choice of tokens, one block decoder per mode the
steps of a block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llada_trm.diffusion.denoiser import Denoiser
from llada_trm.diffusion.fast_dllm import denoise_block_cached, denoise_block_parallel
from llada_trm.diffusion.options import LLADA_EOS_ID, LLADA_EOT_ID, LLADA_MASK_ID, SamplingOptions
from llada_trm.diffusion.steps import StepCallback, StepObserver, model_chunk_size, report_commit
from llada_trm.diffusion.unmasking import commit_step, get_num_transfer_tokens

BlockDecoder = Callable[[Tensor, Denoiser, int, int, SamplingOptions, torch.Generator | None], None]


@dataclass
class GenerationResult:
    """Output of :func:`sample`: ``model_stats`` the per-call mean and ``model_stats_total`` the sum over
    calls of every numeric statistic the model reported in ``output.stats``."""

    tokens: Tensor
    prompt_length: int
    nfe: int
    elapsed_s: float
    tokens_per_second: float
    model_stats: dict[str, float] = field(default_factory=dict)
    model_stats_total: dict[str, float] = field(default_factory=dict)

    @property
    def generated(self) -> Tensor:
        """[B, gen_length] tokens after the prompt."""
        return self.tokens[:, self.prompt_length :]


def denoise_block_llada(
    x: Tensor,
    denoiser: Denoiser,
    block_start: int,
    block_end: int,
    options: SamplingOptions,
    generator: torch.Generator | None,
) -> None:
    """LLaDA's fixed schedule: ``steps_per_block`` full-sequence steps, each revealing its scheduled count
    (a step with nothing left to reveal still calls the model, as the reference does)."""
    masked = x[:, block_start:block_end] == options.mask_id
    schedule = get_num_transfer_tokens(masked, options.steps_per_block)
    for step in range(options.steps_per_block):
        committed = commit_step(x, denoiser(x), block_end, schedule[:, step], options, generator)
        report_commit(denoiser.observer, x, 0, committed)


def _block_decoder(options: SamplingOptions) -> BlockDecoder:
    if options.cache is not None:
        return denoise_block_cached
    return denoise_block_llada if options.threshold is None else denoise_block_parallel


def _model_config(model: Any) -> Any:
    """The backbone config of a hybrid (``model.backbone.config``) or of a backbone (``model.config``)."""
    model = getattr(model, "module", model)
    config = getattr(getattr(model, "backbone", None), "config", None)
    return config if config is not None else getattr(model, "config", None)


def default_mask_id(model: Any) -> int:
    """The model's own [MASK] id when its config names one, else LLaDA's: a small backbone's vocabulary
    does not reach LLaDA's 126336, so leaving ``mask_id`` out must not index past it."""
    mask_id = getattr(_model_config(model), "mask_token_id", None)
    return int(mask_id) if isinstance(mask_id, int) else LLADA_MASK_ID


def _check_mask_id(model: Any, mask_id: int) -> None:
    """An id past the embedding rows (LLaDA pads them past vocab_size) would be an IndexError deep inside."""
    config = _model_config(model)
    rows = getattr(config, "effective_embedding_size", getattr(config, "vocab_size", None))
    if isinstance(rows, int) and not 0 <= mask_id < rows:
        raise ValueError(
            f"mask_id {mask_id} is outside the model's vocabulary of {rows} token ids; pass the model's "
            "[MASK] id (model.backbone.config.mask_token_id) or leave mask_id out"
        )


def _check_inputs(prompt: Tensor, attention_mask: Tensor | None) -> None:
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [batch, prompt_len] token ids, got shape {tuple(prompt.shape)}")
    if prompt.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if attention_mask is not None and attention_mask.shape != prompt.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal the prompt shape "
            f"{tuple(prompt.shape)}"
        )


def _start(
    prompt: Tensor, attention_mask: Tensor | None, options: SamplingOptions
) -> tuple[Tensor, Tensor | None]:
    """The prompt followed by ``gen_length`` masks, and the attention mask over the whole sequence."""
    batch_size, prompt_length = prompt.shape
    device = prompt.device
    length = prompt_length + options.gen_length
    x = torch.full((batch_size, length), options.mask_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt
    if attention_mask is not None:
        # The generated positions are always attended to; only the prompt's left padding is hidden.
        answer_ones = torch.ones((batch_size, options.gen_length), dtype=attention_mask.dtype, device=device)
        attention_mask = torch.cat([attention_mask.to(device), answer_ones], dim=-1)
    return x, attention_mask


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample(
    model: Any,
    prompt: Tensor,
    attention_mask: Tensor | None,
    options: SamplingOptions,
    *,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
) -> GenerationResult:
    """Sample answers to ``prompt`` [B, prompt_len] under ``options``: the tokens, NFE, time and model stats.

    See :func:`generate_with_stats` for the model, prompt, attention mask and every option. ``generator``
    drives the Gumbel noise and random remasking (default: torch's global one). ``on_step`` is called after
    every denoising step with a :class:`~llada_trm.diffusion.steps.StepEvent`; it does not change the samples.
    """
    _check_inputs(prompt, attention_mask)
    _check_mask_id(model, options.mask_id)
    batch_size, prompt_length = prompt.shape
    x, attention_mask = _start(prompt, attention_mask, options)
    observer = None
    if on_step is not None:
        observer = StepObserver(on_step, prompt_length, options.mask_id, model_chunk_size(model))
    denoiser = Denoiser(model, attention_mask, x != options.mask_id, options, observer=observer)
    decode_block = _block_decoder(options)

    _synchronize(x.device)
    start = time.perf_counter()
    for block in range(options.num_blocks):
        block_start = prompt_length + block * options.block_length
        block_end = block_start + options.block_length
        denoiser.block = (block_start, block_end)
        if observer is not None:
            observer.start_block(block)
        decode_block(x, denoiser, block_start, block_end, options, generator)
    _synchronize(x.device)
    elapsed = time.perf_counter() - start

    return GenerationResult(
        tokens=x,
        prompt_length=prompt_length,
        nfe=denoiser.nfe,
        elapsed_s=elapsed,
        tokens_per_second=batch_size * options.gen_length / elapsed if elapsed > 0 else float("inf"),
        model_stats=denoiser.stats_mean,
        model_stats_total=denoiser.stats_total,
    )


def generate_with_stats(  # noqa: PLR0913 - LLaDA's public argument list, kept for its callers
    model: Any,
    prompt: Tensor,
    attention_mask: Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    *,
    threshold: float | None = None,
    cache: str | None = None,
    eos_id: int = LLADA_EOS_ID,
    eot_id: int = LLADA_EOT_ID,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Sample answers with LLaDA's argument list (:func:`sample` with the options built from it): the tokens
    [B, prompt_len + gen_length] with the number of model calls, wall time, throughput and model statistics.

    Args:
        model: ``model(input_ids, attention_mask=None)`` returning logits [B, L, V], or an object (or dict)
            with ``.logits`` and optionally ``.stats``. A model that declares ``refines_masked_positions =
            True`` (``LLaDATRMHybrid``; see ``diffusion.denoiser.MaskedRefiner``) also gets ``masked`` [B, L],
            the masked positions of the current block: the sampler reads no other prediction, so the refiner
            spends nothing on the rest.
        prompt: [B, prompt_len] ids; a batch of different lengths is left-padded (pad id != ``mask_id``).
        attention_mask: [B, prompt_len], 1 for real tokens, 0 for left padding; extended with ones over the
            answer.
        steps: denoising steps in total, split evenly over the blocks (a multiple of the number of blocks).
        gen_length: answer length; a multiple of ``block_length``.
        block_length: semi-autoregressive block size; ``block_length == gen_length`` denoises all at once.
        temperature: Gumbel-max sampling temperature; 0 is greedy.
        cfg_scale: unsupervised classifier-free guidance scale (0 disables it).
        remasking: ``"low_confidence"`` (keep the most probable predictions) or ``"random"``.
        mask_id: the [MASK] token id; None (default) = the model's own (``config.mask_token_id`` of its
            backbone) when it names one, else LLaDA's 126336.
        logits_eos_inf: forbid EOS as a prediction (LLaDA appendix B.4).
        confidence_eos_eot_inf: lower the confidence of EOS/EoT predictions (LLaDA appendix B.4).
        threshold: Fast-dLLM parallel decoding: at each step un-mask every masked token of the current block
            whose confidence is >= threshold, and at least the most confident one; ``steps`` is then ignored.
            None (default) keeps LLaDA's fixed schedule.
        cache: Fast-dLLM's block-wise KV cache (approximate: cached keys are not refreshed within a block).
            None (default): every step runs the whole sequence. ``"prefix"``: each block starts with one full
            forward that also builds the cache of the positions before the block; the block's later steps run
            only the block and what follows it. ``"dual"``: the later steps run only the block, reusing the
            cached keys of the prefix and of the (still masked) suffix. Works with both schedules and with
            ``threshold``; the model must accept ``use_cache``, ``past_key_values`` and ``cache_position``
            and return ``past_key_values`` (``LLaDAModel``, ``LLaDATRMHybrid``). See
            ``fast_dllm.denoise_block_cached`` for the step and NFE accounting.
        eos_id, eot_id: ids used by the two EOS options (LLaDA's 126081 and 126348).
        generator: random generator for the Gumbel noise and random remasking (default: torch's global one).
    """
    options = SamplingOptions(
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        temperature=temperature,
        remasking=remasking,
        threshold=threshold,
        cache=cache,
        cfg_scale=cfg_scale,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        mask_id=default_mask_id(model) if mask_id is None else mask_id,
        eos_id=eos_id,
        eot_id=eot_id,
    )
    return sample(model, prompt, attention_mask, options, generator=generator)


def generate(*args: Any, **kwargs: Any) -> Tensor:
    """LLaDA's ``generate``: :func:`generate_with_stats` (same arguments), returning only the tokens."""
    return generate_with_stats(*args, **kwargs).tokens
