"""The logging window: what one row of `training_metrics.csv` averages, and that row's assembly.

The window sums every micro-batch's terms since the last row (`metrics.Averager`; checkpointed, so a resumed
run's next row still covers the steps before the interruption). A row holds the means over all ranks'
micro-batches, the learning rates, and the throughput of all ranks together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from llada_trm.training.distributed import reduce_sums
from llada_trm.training.metrics import Averager

__all__ = ["LogWindow", "learning_rates"]


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
    """`lr` (the first group's) and `lr_backbone` (None when no backbone group trains)."""
    backbone = [g["lr"] for g in optimizer.param_groups if g["name"].startswith("backbone")]
    return {"lr": optimizer.param_groups[0]["lr"], "lr_backbone": backbone[0] if backbone else None}


class LogWindow:
    """Terms, token count and wall time since the last logged row."""

    def __init__(self) -> None:
        self.terms = Averager()
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, values: Mapping[str, float], tokens: int = 0) -> None:
        self.terms.add(values)
        self.tokens += tokens

    def restart(self) -> None:
        """Start the window's clock (the terms stay: a resumed window goes on)."""
        self.started = time.perf_counter()

    def reset(self) -> None:
        self.terms = Averager()
        self.tokens = 0
        self.started = time.perf_counter()

    def row(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The mean terms, the learning rates and `tokens_per_s` (collective: every rank calls it)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        sums, counts = reduce_sums({**self.terms.sums, "__tokens": self.tokens}, self.terms.counts)
        tokens = sums.pop("__tokens")
        row: dict[str, Any] = {key: sums[key] / counts[key] for key in sums}
        row.update(learning_rates(optimizer))
        row["tokens_per_s"] = tokens / elapsed
        return row
