"""LLaDA's reverse process: start from an all-mask answer and un-mask it block by block.

With the defaults this is token-identical to ``generate`` in ML-GSAI/LLaDA, random draws included;
``threshold`` and ``cache`` switch to Fast-dLLM's decoding. :func:`sample` is the one entry point; in order
below: the per-step hook (`StepEvent`), the model call (`Denoiser`), one step's choice of tokens
(`commit_step`), one block decoder per mode (LLaDA's, Fast-dLLM's threshold and cached ones), the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor

from llada_trm.diffusion.options import LLADA_EOS_ID, LLADA_EOT_ID, LLADA_MASK_ID, SamplingOptions

# The per-step hook: ``sample(..., on_step=callback)`` calls ``callback(StepEvent)`` once per denoising step
# (one model call and one commit), in every variant; without a callback none of it runs. Chunks are the
# hybrid's, anchored at absolute positions of prompt + answer.


@dataclass(frozen=True)
class StepEvent:
    """One denoising step of a batch [B] with answers of G = gen_length tokens.

    ``committed`` [B, G] bool: the positions un-masked by this step; ``tokens`` [B, G]: the answers after it
    (``mask_id`` where still masked); ``confidence`` [B, G]: the score each committed token won its place with
    (its probability; a random number under ``remasking="random"``), NaN elsewhere. ``chunks_refined`` /
    ``chunks_halted`` [B, C] bool over every chunk of the sequence: the chunks the step's model call refined,
    and those of them that stopped before the last recursive step; None for a model without a refiner.
    ``base_tokens`` [B, G]: the backbone's own choice at each position of the block being denoised, the
    argmax of the ``base_logits`` a refining model returns beside its refined logits (under classifier-free
    guidance the guided backbone logits; with ``logits_eos_inf`` EOS excluded, as the sampler excludes it),
    -1 elsewhere; None for a model that reports no ``base_logits``. Where a chunk was not refined it equals
    the greedy commit; where one was, a differing commit is the refiner's doing.
    """

    block: int
    step: int
    committed: Tensor
    tokens: Tensor
    confidence: Tensor
    mask_id: int
    prompt_length: int
    chunk_size: int | None = None
    chunks_refined: Tensor | None = None
    chunks_halted: Tensor | None = None
    base_tokens: Tensor | None = None

    def commits(self, row: int = 0) -> list[tuple[int, int, float]]:
        """(answer position, token id, confidence) of each token row ``row`` committed at this step."""
        positions = self.committed[row].nonzero().flatten().tolist()
        tokens, confidence = self.tokens[row].tolist(), self.confidence[row].tolist()
        return [(p, tokens[p], confidence[p]) for p in positions]

    def chunk_spans(self, which: str = "refined", row: int = 0) -> list[tuple[int, int]]:
        """The answer positions [start, end) of each chunk of row ``row`` that was ``refined`` or ``halted``
        (a chunk straddling the prompt is clipped to the answer)."""
        chunks = self.chunks_refined if which == "refined" else self.chunks_halted
        if chunks is None or self.chunk_size is None:
            return []
        length = self.tokens.shape[1]
        spans = []
        for chunk in chunks[row].nonzero().flatten().tolist():
            start = max(chunk * self.chunk_size - self.prompt_length, 0)
            end = min((chunk + 1) * self.chunk_size - self.prompt_length, length)
            if start < end:
                spans.append((start, end))
        return spans


StepCallback = Callable[[StepEvent], None]


def model_chunk_size(model: Any) -> int | None:
    """The hybrid's ``config.chunk_size`` (through a DDP-style ``.module``), or a wrapper's own
    ``chunk_size`` (the evaluator's counting model); None for any other model."""
    model = getattr(model, "module", model)
    size = getattr(model, "chunk_size", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "chunk_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


class StepObserver:
    """Turns the sampler's commits into :class:`StepEvent` calls: ``model_output`` keeps the chunk statistics
    and the backbone's argmax of the latest model call, ``committed`` reports the commit that follows."""

    def __init__(
        self, callback: StepCallback, prompt_length: int, mask_id: int, chunk_size: int | None
    ) -> None:
        self.callback = callback
        self.prompt_length = prompt_length
        self.mask_id = mask_id
        self.chunk_size = chunk_size
        self.block = 0
        self.step = 0
        self._chunks: tuple[Tensor, Tensor] | None = None
        self._base: tuple[int, Tensor] | None = None

    def start_block(self, block: int) -> None:
        self.block, self.step = block, 0

    def model_output(
        self,
        stats: Mapping[str, Any] | None,
        start: int,
        batch: int,
        length: int,
        base_tokens: Tensor | None = None,
    ) -> None:
        """Record which chunks a call on the window at ``start`` refined and halted, for the conditional
        rows (the first ``batch``: under CFG the unconditional copies follow), and the backbone's argmax
        ``base_tokens`` [batch, W] of the window (None: the model reported no base logits)."""
        self._base = None if base_tokens is None else (start, base_tokens)
        steps = (stats or {}).get("steps_per_chunk")
        halted = (stats or {}).get("halted_per_chunk")
        if self.chunk_size is None or not isinstance(steps, Tensor):
            self._chunks = None
            return
        total = -(-length // self.chunk_size)
        first = start // self.chunk_size
        refined_all = torch.zeros(batch, total, dtype=torch.bool)
        halted_all = torch.zeros(batch, total, dtype=torch.bool)
        columns = slice(first, first + steps.shape[1])
        refined_all[:, columns] = steps[:batch].cpu() > 0
        if isinstance(halted, Tensor):
            halted_all[:, columns] = halted[:batch].cpu().bool()
        self._chunks = (refined_all, halted_all)

    def committed(self, x: Tensor, start: int, transfer: Tensor, confidence: Tensor) -> None:
        """Report that ``transfer`` [B, W] (scores ``confidence``) of the window ``x[:, start:start+W]``
        were just un-masked."""
        batch, length = x.shape
        width = transfer.shape[1]
        full = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        full[:, start : start + width] = transfer
        scores = torch.full((batch, length), float("nan"), device=x.device)
        scores[:, start : start + width] = torch.where(transfer, confidence.float(), float("nan"))
        chunks = self._chunks
        base = None
        if self._base is not None:
            base_start, window = self._base
            base = torch.full((batch, length), -1, dtype=torch.long, device=window.device)
            base[:, base_start : base_start + window.shape[1]] = window
            base = base[:, self.prompt_length :].cpu()
        self.callback(
            StepEvent(
                block=self.block,
                step=self.step,
                committed=full[:, self.prompt_length :].cpu(),
                tokens=x[:, self.prompt_length :].detach().cpu().clone(),
                confidence=scores[:, self.prompt_length :].cpu(),
                mask_id=self.mask_id,
                prompt_length=self.prompt_length,
                chunk_size=self.chunk_size if chunks is not None else None,
                chunks_refined=None if chunks is None else chunks[0],
                chunks_halted=None if chunks is None else chunks[1],
                base_tokens=base,
            )
        )
        self.step += 1
        self._chunks = None
        self._base = None


def report_commit(
    observer: StepObserver | None, x: Tensor, start: int, committed: tuple[Tensor, Tensor]
) -> None:
    """The block decoders' one line after each commit: nothing at all when the sampler is not observed."""
    if observer is not None:
        observer.committed(x, start, *committed)


# The model call: classifier-free guidance, KV-cache windows, NFE count and the model's statistics.


class MaskedRefiner(Protocol):
    """A model told which positions to refine: ``model(x, attention_mask=..., masked=[B, L] bool)``; declared
    explicitly (a forward that merely has a ``masked`` parameter is called like any other model)."""

    refines_masked_positions: bool

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any: ...


def refines_masked_positions(model: Any) -> TypeGuard[MaskedRefiner]:
    """Whether ``model`` (or the module inside a DDP-style ``.module`` wrapper) declares the protocol."""
    return getattr(getattr(model, "module", model), "refines_masked_positions", False) is True


def scalar_stats(stats: Mapping[str, Any] | None, on_device: bool = False) -> dict[str, Any]:
    """One call's statistics that are single numbers, as floats; per-chunk tensors and text cannot be summed
    over calls and are left out. `on_device`: one-element tensors stay (float32, 0-d) tensors, so that
    recording them makes no host sync; `floats` converts the sums once, at the end."""
    numbers: dict[str, Any] = {}
    for key, value in (stats or {}).items():
        if isinstance(value, bool | int | float):
            numbers[key] = float(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            number = value.detach().reshape(())
            if not on_device:
                numbers[key] = float(number.item())
            else:  # summed over many calls: in double precision, as Python floats would be (MPS has none)
                numbers[key] = number.to(torch.float32 if number.device.type == "mps" else torch.float64)
    return numbers


def floats(numbers: Mapping[str, Any]) -> dict[str, float]:
    """`scalar_stats(..., on_device=True)` values (or their sums over calls) as floats, read at the end."""
    return {key: v.item() if isinstance(v, Tensor) else float(v) for key, v in numbers.items()}


def add_stats(totals: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Add ``more`` into ``totals`` key by key (a key new to ``totals`` starts at 0)."""
    for key, value in more.items():
        totals[key] = totals.get(key, 0.0) + value


class Denoiser:
    """One model evaluation per denoising step. LLaDA's unsupervised CFG runs the conditional and the
    unconditional (prompt masked) copies as one batch of 2B: one NFE per step, as in the reference. ``block``
    (absolute start, end) is the block being denoised, whose masked positions a refining model refines;
    ``observer`` (the per-step hook, or None) sees each call's chunk statistics and backbone argmax."""

    def __init__(
        self,
        model: Any,
        attention_mask: Tensor | None,
        prompt_index: Tensor,
        options: SamplingOptions,
        observer: StepObserver | None = None,
    ) -> None:
        self.model = model
        self.attention_mask = attention_mask
        self.prompt_index = prompt_index
        self.cfg_scale = options.cfg_scale
        self.mask_id = options.mask_id
        self.forbidden = options.eos_id if options.logits_eos_inf else None  # the column the sampler drops
        self.refines = refines_masked_positions(model)
        self.block: tuple[int, int] | None = None
        self.nfe = 0
        self._totals: dict[str, Any] = {}  # floats, or 0-d tensors summed on the device (no sync per call)
        self.stats_calls: dict[str, int] = {}
        self.observer = observer
        self.last_stats: Mapping[str, Any] | None = None
        self.last_base: Tensor | None = None  # the latest call's base_logits (kept only when observed)

    @property
    def stats_total(self) -> dict[str, float]:
        """Sum over the calls of each statistic (read at the end: it waits for the device once)."""
        return floats(self._totals)

    @property
    def stats_mean(self) -> dict[str, float]:
        """Per-call mean of each statistic, over the calls that reported it."""
        return {key: total / self.stats_calls[key] for key, total in self.stats_total.items()}

    def _record(self, stats: Mapping[str, Any] | None) -> None:
        self.last_stats = stats
        numbers = scalar_stats(stats, on_device=True)
        add_stats(self._totals, numbers)
        for key in numbers:
            self.stats_calls[key] = self.stats_calls.get(key, 0) + 1

    def _refine_mask(self, window: Tensor, start: int) -> dict[str, Tensor]:
        if not self.refines or self.block is None:
            return {}
        positions = torch.arange(start, start + window.shape[1], device=window.device)
        in_block = (positions >= self.block[0]) & (positions < self.block[1])
        return {"masked": (window == self.mask_id) & in_block}

    def _call(self, x: Tensor, attention_mask: Tensor | None, kwargs: dict[str, Any]) -> tuple[Tensor, Any]:
        output = self.model(x, attention_mask=attention_mask, **kwargs)
        self.nfe += 1
        self.last_base = None
        if isinstance(output, Tensor):
            self._record(None)
            return output, None
        if isinstance(output, Mapping):
            self._record(output.get("stats"))
            if self.observer is not None:
                self.last_base = output.get("base_logits")
            return output["logits"], output.get("past_key_values")
        self._record(getattr(output, "stats", None))
        if self.observer is not None:
            self.last_base = getattr(output, "base_logits", None)
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
            logits, new_cache = self._call(window, attention_mask, cache_kwargs)
            self._observe(x, start)
            return logits, new_cache
        unconditional = x.clone()
        unconditional[self.prompt_index] = self.mask_id
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask], dim=0)
        if "masked" in cache_kwargs:  # the prompt is outside the block: both copies refine the same positions
            cache_kwargs["masked"] = torch.cat([cache_kwargs["masked"]] * 2, dim=0)
        both = torch.cat([window, unconditional[:, start:end]], dim=0)
        logits, new_cache = self._call(both, attention_mask, cache_kwargs)
        self._observe(x, start)
        return self._guided(logits), new_cache

    def _guided(self, logits: Tensor) -> Tensor:
        """LLaDA's unsupervised CFG of a [2B, ...] conditional + unconditional batch."""
        cond_logits, uncond_logits = torch.chunk(logits, 2, dim=0)
        return uncond_logits + (self.cfg_scale + 1) * (cond_logits - uncond_logits)

    def _observe(self, x: Tensor, start: int) -> None:
        """Hand the latest call's chunk statistics, and the backbone's own argmax when the model returned
        ``base_logits`` (guided like the logits, EOS dropped as the sampler drops it), to the per-step
        observer, when there is one."""
        if self.observer is None:
            return
        base_tokens = None
        if isinstance(self.last_base, Tensor):
            base_tokens = self._base_tokens(self.last_base, start)
        self.last_base = None
        self.observer.model_output(
            self.last_stats, start, self.prompt_index.shape[0], x.shape[1], base_tokens=base_tokens
        )

    def _base_tokens(self, base: Tensor, start: int) -> Tensor:
        """The backbone's argmax [B, W] of a window at ``start``, over the block being denoised only (the
        only positions a step commits; -1 elsewhere), so the hook reads V logits per block position."""
        width = base.shape[1]
        lo, hi = 0, width
        if self.block is not None:
            lo, hi = max(self.block[0] - start, 0), max(min(self.block[1] - start, width), 0)
        tokens = torch.full((self.prompt_index.shape[0], width), -1, dtype=torch.long, device=base.device)
        if hi > lo:
            part = base[:, lo:hi]
            part = self._guided(part) if self.cfg_scale > 0 else part
            if self.forbidden is not None:
                part = part.index_fill(-1, torch.tensor([self.forbidden], device=part.device), -torch.inf)
            tokens[:, lo:hi] = part.argmax(dim=-1)
        return tokens


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


# One denoising step's choice of tokens: predict every masked token, keep the confident ones. Random draws
# happen in LLaDA's order, so seeded runs reproduce the reference bit for bit.


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


def _set_logit(logits: Tensor, token_id: int, value: float) -> Tensor:
    """Copy of ``logits`` with one vocabulary column overwritten (the model's own output stays intact)."""
    logits = logits.clone()
    logits[..., token_id] = value
    return logits


def _predict(
    logits: Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """x0 [B, L] (argmax of the Gumbel-perturbed logits) and each prediction's confidence [B, L].

    The Gumbel uniforms [B, L, V] are drawn first, then (``random`` remasking) the [B, L] confidences.
    """
    if options.logits_eos_inf:
        logits = _set_logit(logits, options.eos_id, -torch.inf)
    x0 = torch.argmax(add_gumbel_noise(logits, options.temperature, generator), dim=-1)
    if options.confidence_eos_eot_inf:
        # LLaDA writes -inf into the EOS column of the noisy logits and the EoT column of the clean ones; at
        # temperature 0 those are one tensor, so both columns reach the softmax, otherwise only EoT does.
        logits = _set_logit(logits, options.eot_id, -torch.inf)
        if options.temperature == 0:
            logits[..., options.eos_id] = -torch.inf
    if options.remasking == "random":
        return x0, torch.rand(x0.shape, device=x0.device, generator=generator)
    probs = F.softmax(logits.to(torch.float64) if options.float64_confidence else logits, dim=-1)
    return x0, torch.gather(probs, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)


def _chosen(
    confidence: Tensor,
    mask_index: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    threshold: float | None,
) -> Tensor:
    """[B, L] positions to un-mask: the ``num_transfer`` most confident ones per row, or (``threshold``) every
    masked one of the block at least that confident, and at least the most confident one."""
    transfer = torch.zeros_like(mask_index)
    for row in range(confidence.shape[0]):
        if threshold is None:
            k = int(num_transfer[row])
            if k > 0:
                transfer[row, torch.topk(confidence[row], k=k).indices] = True
            continue
        candidates = mask_index[row].clone()
        candidates[block_end:] = False
        if candidates.any():
            transfer[row] = candidates & (confidence[row] >= threshold)
            transfer[row, torch.topk(confidence[row], k=1).indices] = True
    return transfer


def _waiting_digits(x0: Tensor, mask_index: Tensor, block_end: int, digit_ids: tuple[int, ...]) -> Tensor:
    """[B, L] masked positions that `lsd_first` holds back: predicted a digit, with the right neighbour
    (inside the block) masked and predicted a digit too, i.e. a less significant digit of the same number."""
    if not digit_ids:
        raise ValueError(
            "digit_order 'lsd_first' needs digit_ids, the tokenizer's digit token ids "
            "(evaluate_model fills them in; pass SamplingOptions(digit_ids=...) when calling sample directly)"
        )
    pending = mask_index & torch.isin(x0, torch.tensor(digit_ids, device=x0.device))
    pending[:, block_end:] = False  # a number running past the block is ordered within the block
    waiting = torch.zeros_like(pending)
    waiting[:, :-1] = pending[:, :-1] & pending[:, 1:]
    return waiting


def _chosen_lsd_first(
    confidence: Tensor,
    mask_index: Tensor,
    waiting: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    threshold: float | None,
) -> Tensor:
    """`_chosen` with the digit order: a waiting position is committed only with (or after) its right
    neighbour. Fixed schedule: the ``num_transfer`` picks go one at a time to the most confident position
    not waiting, and a pick frees its left neighbour. Threshold: the positions at least ``threshold``
    confident whose waiting chain to the right is committed in the same step; if none, the most confident
    position not waiting."""
    transfer = torch.zeros_like(mask_index)
    for row in range(confidence.shape[0]):
        held = waiting[row].clone()
        if threshold is None:
            scores = confidence[row].clone()
            for _ in range(int(num_transfer[row])):
                pick = int(torch.argmax(scores.masked_fill(held, -torch.inf)))
                transfer[row, pick] = True
                scores[pick] = -torch.inf
                if pick > 0:
                    held[pick - 1] = False
            continue
        candidates = mask_index[row].clone()
        candidates[block_end:] = False
        if not candidates.any():
            continue
        passing = (candidates & (confidence[row] >= threshold)).tolist()
        held_list = held.tolist()
        allowed = [False] * len(passing)
        for position in range(min(block_end, len(passing)) - 1, -1, -1):
            allowed[position] = passing[position] and (not held_list[position] or allowed[position + 1])
        if any(allowed):
            transfer[row] = torch.tensor(allowed, device=transfer.device)
        else:
            transfer[row, int(torch.argmax(confidence[row].masked_fill(held, -torch.inf)))] = True
    return transfer


def commit_step(
    x: Tensor,
    logits: Tensor,
    block_end: int,
    num_transfer: Tensor | None,
    options: SamplingOptions,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Predict every masked token, then un-mask (in place in ``x``) the ones chosen by the schedule/threshold.

    ``x`` [B, L] may be a window (a view) of the sequence with ``logits`` [B, L, V] of the same positions and
    ``block_end`` relative to it; nothing past ``block_end`` is un-masked yet. ``num_transfer`` [B] is the
    schedule's count for this step, None under ``options.threshold``. Returns the [B, L] positions un-masked
    and every position's confidence (-inf where nothing was predicted): tensors computed anyway, for the
    sampler's per-step hook.

    ``options.digit_order == "lsd_first"`` changes which positions a step commits, never what nor how many:
    a masked position predicted a digit waits while its right neighbour inside the block is masked and
    predicted a digit (`_waiting_digits`), so each number (a run of digit tokens, committed or predicted) is
    committed from its least significant digit up, exactly so while the predictions stay the same from step
    to step. A number running past the block's end is ordered within the block.
    """
    mask_index = x == options.mask_id
    x0, x0_p = _predict(logits, options, generator)
    x0_p[:, block_end:] = -torch.inf
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    if options.digit_order == "lsd_first":
        waiting = _waiting_digits(x0, mask_index, block_end, options.digit_ids)
        threshold = options.threshold
        transfer = _chosen_lsd_first(confidence, mask_index, waiting, block_end, num_transfer, threshold)
    else:
        transfer = _chosen(confidence, mask_index, block_end, num_transfer, options.threshold)
    x[transfer] = x0[transfer]
    return transfer, confidence


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


# Fast-dLLM's block decoders, token-identical to `generate` (threshold), `generate_with_prefix_cache` and
# `generate_with_dual_cache` of NVlabs/Fast-dLLM's `llada/generate.py` (each says where accounting differs).


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
    every denoising step with a :class:`StepEvent`; it does not change the samples.
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
    docs/architecture.md (`llada_trm.diffusion`) describes the model protocol and each argument. Beyond it:
    ``mask_id`` None takes the model's own (its backbone's ``config.mask_token_id``), else LLaDA's 126336;
    the two EOS options are LLaDA's appendix B.4; with ``threshold`` the ``steps`` schedule is ignored; the
    KV ``cache`` is approximate (cached keys are not refreshed within a block, ``denoise_block_cached``);
    ``generator`` (default: torch's global one) draws the Gumbel noise and the random remasking.
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
