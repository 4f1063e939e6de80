"""The sampler's model call: classifier-free guidance, KV-cache windows, NFE count and the model's statistics
(what a model may be: `sampler.generate_with_stats`'s ``model`` argument)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeGuard

import torch
from torch import Tensor

from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.steps import StepObserver


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
