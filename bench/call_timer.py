"""Where a sampling run's time goes, per model call: the backbone, the hybrid's wrapper around it (feature
plumbing, chunk selection, the refiner, its stats) and the sampler's own bookkeeping (commits, masks, stats).

`CallTimer` wraps (as instance attributes, like `RefineTimer` and `FlopMeter`) the backbone's `forward`, each
hybrid's `forward` and `refine`, and times the whole `sample` call with the same clock; the sampler's time is
what the run's time has left once the model calls are taken out. So a regression shows where it is: a slower
backbone, a heavier wrapper, or sampler bookkeeping.

Clocks: `wall` (perf_counter; what a user waits, the only one that sees a GPU) or `cpu` (the calling
thread's CPU time: with one torch thread on a CPU all the work runs on it, and time the scheduler gives to
other processes on a shared machine is not counted, so splits and ratios hold under load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llada_trm.diffusion.sampler import sample

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass
class CallSplit:
    """Seconds of one sampling run: inside the backbone, inside the top-level model call, in all."""

    backbone_s: float = 0.0
    model_s: float = 0.0  # the hybrid's forward (backbone included); 0 when the backbone was called directly
    refine_s: float = 0.0  # inside `LLaDATRMHybrid.refine`, inside model_s
    elapsed_s: float = 0.0

    def add(self, other: CallSplit) -> None:
        for name in ("backbone_s", "model_s", "refine_s", "elapsed_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def per_call_ms(self, calls: int) -> dict[str, float]:
        """ms per model call: `backbone`, `refiner` (refine()), `wrapper` (the rest of the hybrid's forward:
        0 for the backbone alone), `sampler` (the rest of the wall time) and `total`."""
        calls = max(1, calls)
        model = self.model_s or self.backbone_s
        parts = {
            "backbone": self.backbone_s,
            "refiner": self.refine_s,
            "wrapper": max(0.0, model - self.backbone_s - self.refine_s),
            "sampler": max(0.0, self.elapsed_s - model),
            "total": self.elapsed_s,
        }
        return {name: 1e3 * seconds / calls for name, seconds in parts.items()}


class CallTimer:
    """Accumulates the wall time inside `backbone.forward` and inside each wrapper's `forward`."""

    def __init__(self, backbone: nn.Module, wrappers: list[nn.Module], clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
        self.clock = CLOCKS[clock]
        self.split = CallSplit()
        self.device = next(backbone.parameters()).device
        self._wrap(backbone, "forward", "backbone_s")
        for model in wrappers:
            self._wrap(model, "forward", "model_s")
            self._wrap(model, "refine", "refine_s")

    def sample(self, *args: Any, **kwargs: Any) -> tuple[Any, CallSplit]:
        """`diffusion.sample(*args, **kwargs)` and its split (the times since the last reset are dropped)."""
        self.reset()
        start = self.clock()
        result = sample(*args, **kwargs)
        split = self.reset()
        split.elapsed_s = self.clock() - start
        return result, split

    def reset(self) -> CallSplit:
        """The times so far, and zero from here on."""
        split, self.split = self.split, CallSplit()
        return split

    def _wrap(self, module: nn.Module, method: str, field: str) -> None:
        original = getattr(module, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock()
            out = original(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            setattr(self.split, field, getattr(self.split, field) + self.clock() - start)
            return out

        setattr(module, method, timed)  # instance attribute: Module.__call__ calls self.forward
