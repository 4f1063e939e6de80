"""LLaDA's reverse process: start from an all-mask answer and un-mask it block by block.

Every denoising step predicts all masked tokens at once (x0 = argmax, optionally Gumbel-perturbed) and keeps
only the most confident ones; the rest stay masked for later steps. With the defaults this is token-identical
to ``generate`` in ML-GSAI/LLaDA, random-number draws included. ``threshold`` switches to Fast-dLLM's
confidence-aware parallel decoding and ``cache`` to its block-wise KV caches (``generate_with_prefix_cache`` /
``generate_with_dual_cache`` of NVlabs/Fast-dLLM's ``llada/generate.py``).

The loop is split so that options slot in without a rewrite: ``_Denoiser`` owns the model call (CFG batching,
KV cache arguments, NFE count, refinement statistics) and ``_commit_step`` owns the choice of tokens to
un-mask.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
LLADA_EOT_ID = 126348
REMASKING_STRATEGIES = ("low_confidence", "random")
CACHE_MODES = ("prefix", "dual")


@dataclass
class GenerationResult:
    """Output of :func:`generate_with_stats`.

    ``model_stats`` holds the per-call mean and ``model_stats_total`` the sum over calls of every numeric
    statistic the model reported in ``output.stats`` (e.g. ``refine_steps``, ``chunks_skipped``).
    """

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


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Perturb logits so that their argmax is a sample from softmax(logits / temperature).

    ``exp(l) / (-log u) ** T`` is a monotone transform of ``l / T + Gumbel``. It is done in float64 because
    low-precision Gumbel-max degrades masked-diffusion samples (arXiv:2409.02908). Temperature 0 returns the
    logits themselves (greedy decoding, no random draw).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    uniform = torch.rand_like(logits, dtype=torch.float64, generator=generator)
    return logits.exp() / (-torch.log(uniform)) ** temperature


def get_num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to un-mask per step: the masked count spread evenly, remainder to the first steps.

    The linear noise schedule makes the expected number of tokens revealed per step constant.
    """
    masked_count = mask_index.sum(dim=1, keepdim=True)
    base, remainder = masked_count // steps, masked_count % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]
    return (base + (step < remainder).long()).to(torch.int64)


class _StatsAccumulator:
    """Sums and counts the scalar statistics returned by each model call."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, stats: Mapping[str, Any] | None) -> None:
        for key, value in (stats or {}).items():
            number = _as_number(value)
            if number is None:
                continue
            self.total[key] = self.total.get(key, 0.0) + number
            self.count[key] = self.count.get(key, 0) + 1

    def mean(self) -> dict[str, float]:
        return {key: total / self.count[key] for key, total in self.total.items()}


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool | int | float):
        return float(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach().float().item())
    return None


class _Denoiser:
    """One model evaluation per denoising step, with LLaDA's unsupervised classifier-free guidance.

    CFG runs the conditional and the unconditional (prompt masked) copies as one batch of 2B, so it costs one
    forward call (one NFE) per step, as in the reference.
    """

    def __init__(
        self,
        model: Any,
        attention_mask: Tensor | None,
        prompt_index: Tensor,
        cfg_scale: float,
        mask_id: int,
    ) -> None:
        self.model = model
        self.attention_mask = attention_mask
        self.prompt_index = prompt_index
        self.cfg_scale = cfg_scale
        self.mask_id = mask_id
        self.nfe = 0
        self.stats = _StatsAccumulator()
        # A model whose forward takes `masked` (the hybrid) is told which positions to refine: the masked
        # tokens of the current block, the only ones whose predictions the sampler reads.
        self.refines = accepts_keyword(model, "masked")
        self.block: tuple[int, int] | None = None

    def _refine_mask(self, window: Tensor, start: int) -> dict[str, Tensor]:
        if not self.refines or self.block is None:
            return {}
        positions = torch.arange(start, start + window.shape[1], device=window.device)
        in_block = (positions >= self.block[0]) & (positions < self.block[1])
        return {"masked": (window == self.mask_id) & in_block}

    def _call(
        self, x: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any]
    ) -> tuple[Tensor, Any]:
        output = self.model(x, attention_mask=attention_mask, **kwargs)
        self.nfe += 1
        if isinstance(output, Tensor):
            return output, None
        if isinstance(output, Mapping):
            self.stats.add(output.get("stats"))
            return output["logits"], output.get("past_key_values")
        self.stats.add(getattr(output, "stats", None))
        return output.logits, getattr(output, "past_key_values", None)

    def __call__(self, x: Tensor) -> Tensor:
        """Logits [B, L, V] of the whole sequence (no cache)."""
        return self.run(x)[0]

    def run(
        self,
        x: Tensor,
        *,
        build_cache: bool = False,
        cache: Any = None,
        start: int = 0,
        end: int | None = None,
    ) -> tuple[Tensor, Any]:
        """Logits of positions ``start:end`` of ``x``, and the model's cache when ``build_cache``.

        With ``cache`` the model runs only on that window, as ``model(x[:, start:end], attention_mask=...,
        past_key_values=cache, cache_position=start)``; ``build_cache`` asks for ``use_cache=True`` on a full
        call. Without either option the model is called exactly as LLaDA's sampler calls it.
        """
        cache_kwargs: dict[str, Any] = {}
        if build_cache:
            cache_kwargs["use_cache"] = True
        if cache is not None:
            cache_kwargs.update(past_key_values=cache, cache_position=start)
        window = x[:, start:end]
        cache_kwargs.update(self._refine_mask(window, start))
        attention_mask = None if self.attention_mask is None else self.attention_mask[:, start:end]
        if self.cfg_scale <= 0:
            return self._call(window, attention_mask, cache_kwargs)
        unconditional = x.clone()
        unconditional[self.prompt_index] = self.mask_id
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask], dim=0)
        if "masked" in cache_kwargs:  # the prompt is outside the block: both copies refine the same positions
            cache_kwargs["masked"] = torch.cat([cache_kwargs["masked"]] * 2, dim=0)
        both = torch.cat([window, unconditional[:, start:end]], dim=0)
        logits, new_cache = self._call(both, attention_mask, cache_kwargs)
        cond_logits, uncond_logits = torch.chunk(logits, 2, dim=0)
        return uncond_logits + (self.cfg_scale + 1) * (cond_logits - uncond_logits), new_cache


def accepts_keyword(model: Any, name: str) -> bool:
    """Whether ``model(...)`` takes the keyword ``name`` (looking through DDP-style ``.module`` wrappers)."""
    target = getattr(model, "module", model)
    target = getattr(target, "forward", target)
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins and C callables have no signature
        return False


def _set_logit(logits: Tensor, token_id: int, value: float) -> Tensor:
    """Copy of ``logits`` with one vocabulary column overwritten (the model's own output stays intact)."""
    logits = logits.clone()
    logits[..., token_id] = value
    return logits


def _commit_step(
    x: Tensor,
    logits: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    *,
    temperature: float,
    remasking: str,
    mask_id: int,
    threshold: float | None,
    float64_confidence: bool,
    logits_eos_inf: bool,
    confidence_eos_eot_inf: bool,
    eos_id: int,
    eot_id: int,
    generator: torch.Generator | None,
) -> None:
    """Predict every masked token, then un-mask (in place in ``x``) the ones chosen by the schedule/threshold.

    ``x`` [B, L] may be a window (a view) of the sequence with ``logits`` [B, L, V] of the same positions and
    ``block_end`` relative to it. Random draws happen in LLaDA's order: the Gumbel uniforms [B, L, V] first,
    then (``random`` remasking) the [B, L] confidences, so seeded runs reproduce the reference bit for bit.
    """
    mask_index = x == mask_id
    if logits_eos_inf:
        logits = _set_logit(logits, eos_id, -torch.inf)

    x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)

    if confidence_eos_eot_inf:
        # LLaDA writes -inf into the EOS column of the noisy logits and the EoT column of the clean ones; at
        # temperature 0 those are one tensor, so both columns reach the softmax, otherwise only EoT does.
        logits = _set_logit(logits, eot_id, -torch.inf)
        if temperature == 0:
            logits[..., eos_id] = -torch.inf

    if remasking == "low_confidence":
        # LLaDA takes the softmax in the logits' own dtype; Fast-dLLM's sampling functions use float64.
        probs = F.softmax(logits.to(torch.float64) if float64_confidence else logits, dim=-1)
        x0_p = torch.gather(probs, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    else:
        x0_p = torch.rand(x0.shape, device=x0.device, generator=generator)
    x0_p[:, block_end:] = -torch.inf  # nothing past the current block may be un-masked yet

    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)

    transfer = torch.zeros_like(mask_index)
    for row in range(x.shape[0]):
        if threshold is None:
            k = int(num_transfer[row])
            if k > 0:
                transfer[row, torch.topk(confidence[row], k=k).indices] = True
        else:
            candidates = mask_index[row].clone()
            candidates[block_end:] = False
            if candidates.any():
                transfer[row] = candidates & (confidence[row] >= threshold)
                transfer[row, torch.topk(confidence[row], k=1).indices] = True
    x[transfer] = x0[transfer]


def _check_arguments(
    prompt: Tensor,
    attention_mask: Tensor | None,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float,
    cfg_scale: float,
    remasking: str,
    threshold: float | None,
    cache: str | None,
) -> None:
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [batch, prompt_len] token ids, got shape {tuple(prompt.shape)}")
    if prompt.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if attention_mask is not None and attention_mask.shape != prompt.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal the prompt shape "
            f"{tuple(prompt.shape)}"
        )
    if gen_length <= 0 or block_length <= 0:
        raise ValueError(f"gen_length ({gen_length}) and block_length ({block_length}) must be positive")
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps <= 0 or steps % num_blocks != 0:
        raise ValueError(
            f"steps ({steps}) must be a positive multiple of the number of blocks "
            f"gen_length / block_length = {num_blocks}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (0 disables guidance), got {cfg_scale}")
    if remasking not in REMASKING_STRATEGIES:
        raise ValueError(f"remasking must be one of {REMASKING_STRATEGIES}, got {remasking!r}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] or None, got {threshold}")
    if cache is not None and cache not in CACHE_MODES:
        raise ValueError(f"cache must be None, 'prefix' or 'dual', got {cache!r}")


def _denoise_block_cached(
    x: Tensor,
    denoiser: _Denoiser,
    block_start: int,
    block_end: int,
    steps_per_block: int,
    threshold: float | None,
    cache: str,
    mask_id: int,
    step_options: dict[str, Any],
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
    if threshold is None:
        schedule = get_num_transfer_tokens(x[:, block_start:block_end] == mask_id, steps_per_block)
    logits, kv = denoiser.run(x, build_cache=True)
    if kv is None:
        raise ValueError(
            f"cache={cache!r} needs a model that returns past_key_values when called with use_cache=True "
            "(LLaDAModel, LLaDATRMHybrid); use cache=None for this model"
        )
    _commit_step(x, logits, block_end, None if schedule is None else schedule[:, 0], **step_options)
    # The prefix cache keeps the positions before the block and runs the block plus everything after it;
    # the dual cache keeps the whole sequence and runs only the block.
    window_end = None if cache == "prefix" else block_end
    if cache == "prefix":
        kv = kv.truncate(block_start)
    window = x[:, block_start:window_end]  # a view: commits write through to x
    limit = block_length + 1 if schedule is None else steps_per_block
    for step in range(1, limit):
        logits, _ = denoiser.run(x, cache=kv, start=block_start, end=window_end)
        transfer = None if schedule is None else schedule[:, step]
        _commit_step(window, logits, block_length, transfer, **step_options)
        if not bool((x[:, block_start:block_end] == mask_id).any()):
            break


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_with_stats(
    model: Any,
    prompt: Tensor,
    attention_mask: Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = LLADA_MASK_ID,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    *,
    threshold: float | None = None,
    cache: str | None = None,
    eos_id: int = LLADA_EOS_ID,
    eot_id: int = LLADA_EOT_ID,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """:func:`generate`, plus the number of model calls, wall time, throughput and the model's statistics."""
    _check_arguments(
        prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale, remasking, threshold,
        cache,
    )
    batch_size, prompt_length = prompt.shape
    device = prompt.device

    x = torch.full((batch_size, prompt_length + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt
    if attention_mask is not None:
        # The generated positions are always attended to; only the prompt's left padding is hidden.
        answer_ones = torch.ones((batch_size, gen_length), dtype=attention_mask.dtype, device=device)
        attention_mask = torch.cat([attention_mask.to(device), answer_ones], dim=-1)
    denoiser = _Denoiser(model, attention_mask, x != mask_id, cfg_scale, mask_id)
    step_options = dict(
        temperature=temperature,
        remasking=remasking,
        mask_id=mask_id,
        threshold=threshold,
        float64_confidence=threshold is not None or cache is not None,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        eos_id=eos_id,
        eot_id=eot_id,
        generator=generator,
    )

    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    _synchronize(device)
    start = time.perf_counter()
    for block in range(num_blocks):
        block_start = prompt_length + block * block_length
        block_end = block_start + block_length
        denoiser.block = (block_start, block_end)
        if cache is not None:
            _denoise_block_cached(
                x, denoiser, block_start, block_end, steps_per_block, threshold, cache, mask_id, step_options
            )
        elif threshold is None:
            schedule = get_num_transfer_tokens(x[:, block_start:block_end] == mask_id, steps_per_block)
            for step in range(steps_per_block):
                _commit_step(x, denoiser(x), block_end, schedule[:, step], **step_options)
        else:
            # Fast-dLLM: denoise the block until it is complete. Each step reveals at least one token, so
            # block_length steps suffice; the cap only matters for a model that predicts the mask token.
            for _ in range(block_length):
                if not bool((x[:, block_start:block_end] == mask_id).any()):
                    break
                _commit_step(x, denoiser(x), block_end, None, **step_options)
    _synchronize(device)
    elapsed = time.perf_counter() - start

    return GenerationResult(
        tokens=x,
        prompt_length=prompt_length,
        nfe=denoiser.nfe,
        elapsed_s=elapsed,
        tokens_per_second=batch_size * gen_length / elapsed if elapsed > 0 else float("inf"),
        model_stats=denoiser.stats.mean(),
        model_stats_total=dict(denoiser.stats.total),
    )


def generate(
    model: Any,
    prompt: Tensor,
    attention_mask: Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = LLADA_MASK_ID,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    *,
    threshold: float | None = None,
    cache: str | None = None,
    eos_id: int = LLADA_EOS_ID,
    eot_id: int = LLADA_EOT_ID,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample answers with LLaDA's low-confidence remasking; returns [B, prompt_len + gen_length] tokens.

    Args:
        model: ``model(input_ids, attention_mask=None)`` returning logits [B, L, V], or an object (or dict)
            with ``.logits`` and optionally ``.stats``. A model whose forward also takes ``masked`` [B, L]
            (``LLaDATRMHybrid``) gets the masked positions of the current block there: the sampler reads no
            other prediction, so the refiner spends nothing on the rest.
        prompt: [B, prompt_len] ids; a batch of different lengths is left-padded (pad id != ``mask_id``).
        attention_mask: [B, prompt_len], 1 for real tokens, 0 for left padding; extended with ones over the
            answer.
        steps: denoising steps in total, split evenly over the blocks (a multiple of the number of blocks).
        gen_length: answer length; a multiple of ``block_length``.
        block_length: semi-autoregressive block size; ``block_length == gen_length`` denoises all at once.
        temperature: Gumbel-max sampling temperature; 0 is greedy.
        cfg_scale: unsupervised classifier-free guidance scale (0 disables it).
        remasking: ``"low_confidence"`` (keep the most probable predictions) or ``"random"``.
        mask_id: the [MASK] token id.
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
            ``_denoise_block_cached`` for the step and NFE accounting.
        eos_id, eot_id: ids used by the two EOS options (LLaDA's 126081 and 126348).
        generator: random generator for the Gumbel noise and random remasking (default: torch's global one).
    """
    return generate_with_stats(
        model,
        prompt,
        attention_mask,
        steps,
        gen_length,
        block_length,
        temperature,
        cfg_scale,
        remasking,
        mask_id,
        logits_eos_inf,
        confidence_eos_eot_inf,
        threshold=threshold,
        cache=cache,
        eos_id=eos_id,
        eot_id=eot_id,
        generator=generator,
    ).tokens


def _stop_ids(tokenizer: Any) -> list[int]:
    """EOS and, when the vocabulary has it, ``<|eot_id|>``: the tokens that end an answer."""
    ids = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(int(eos))
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        eot = convert("<|eot_id|>")
        if isinstance(eot, int) and eot != getattr(tokenizer, "unk_token_id", None):
            ids.append(eot)
    return ids


def decode_generated(
    tokenizer: Any,
    tokens: Tensor | Sequence[Sequence[int]],
    prompt_length: int,
    stop_ids: Iterable[int] | None = None,
) -> list[str]:
    """Decode each row's answer (tokens after ``prompt_length``), cut at its first EOS / ``<|eot_id|>``.

    ``stop_ids`` defaults to the tokenizer's EOS id and its ``<|eot_id|>`` id, when it has one.
    """
    stops = set(_stop_ids(tokenizer) if stop_ids is None else stop_ids)
    rows = tokens.tolist() if isinstance(tokens, Tensor) else [list(row) for row in tokens]
    texts = []
    for row in rows:
        answer = row[prompt_length:]
        cut = next((i for i, token in enumerate(answer) if token in stops), len(answer))
        texts.append(tokenizer.decode(answer[:cut], skip_special_tokens=True))
    return texts
