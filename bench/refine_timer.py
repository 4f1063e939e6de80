"""The refiner's share of a hybrid's sampling time: the wall time of every `model.refine` call (shared by
bench_sampler and its LLaDA-8B-width mode)."""

from __future__ import annotations

import time
from typing import Any

import torch

from llada_trm.model.hybrid import LLaDATRMHybrid


class RefineTimer:
    """Accumulates the wall time of every `model.refine` call (the refiner's part of a hybrid forward)."""

    def __init__(self, model: LLaDATRMHybrid) -> None:
        self.seconds = 0.0
        self.device = model.backbone.device
        original = model.refine

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return out

        model.refine = timed  # instance attribute: forward() calls self.refine
