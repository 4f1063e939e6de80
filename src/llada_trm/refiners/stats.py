"""The statistics of a refiner's steps: per-step device-side reductions, one host sync at the end (none at
all with `summary(..., on_device=True)`: the hybrid's forward leaves the conversion to whoever logs them)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class HasGates(Protocol):
    """What `summary` reads of a refiner: its gate values (the refiner itself imports this module)."""

    def gate_values(self, tensors: bool = False) -> dict[str, Any]: ...


def masked_mean(values: Tensor, active: Tensor | None) -> Tensor:
    """Mean of `values` [B, L] over the active positions; over all positions when none (or no mask) is given.

    Falling back to all positions (instead of a 0/0 NaN) keeps logged metrics finite when a batch has no chunk
    to refine. Computed without a host sync so that it is cheap inside a step loop.
    """
    values = values.float()
    if active is None:
        return values.mean()
    weights = active.to(values.dtype)
    count = weights.sum()
    return torch.where(count > 0, (values * weights).sum() / count.clamp_min(1.0), values.mean())


class StatsAccumulator:
    """Collects `step` statistics and reduces them to the stats dict that `Refiner.forward` returns.

    Public so that a caller driving `step` itself (per-chunk halting) reports the same keys: call
    `add(step_stats, active)` after every step and `summary(refiner)` at the end. All per-step reductions
    stay on the device; `summary` does the one host sync.
    """

    def __init__(self) -> None:
        self.steps = 0
        self._confidence: list[Tensor] = []
        self._delta_norms: list[Tensor] = []
        self._slot_norms: dict[str, list[Tensor]] = {}
        self.final_confidence: Tensor | None = None

    @torch.no_grad()
    def add(self, step_stats: dict[str, Any], active: Tensor | None = None) -> None:
        self.steps += 1
        confidence = step_stats["confidence"].detach()
        self.final_confidence = confidence
        self._confidence.append(masked_mean(confidence, active))
        # The applied update is exactly zero off the active set, so its mean is taken over active positions.
        norms = step_stats["update_norm"].float()
        if active is None:
            self._delta_norms.append(norms.mean())
        else:
            self._delta_norms.append(norms.sum() / active.sum().clamp_min(1))
        for name, values in step_stats.get("slot_norms", {}).items():
            self._slot_norms.setdefault(name, []).append(masked_mean(values.detach(), active))

    def summary(self, refiner: HasGates, like: Tensor, on_device: bool = False) -> dict[str, Any]:
        """The stats dict; `like` (the input states) gives the shape/device of `final_confidence` at K=0.

        `on_device`: the numbers stay 0-d tensors (`confidence`, each entry of `confidence_per_step`,
        `delta_norms`, `slot_norms`, `gates`), so that building the dict makes no host sync; `float()` them
        where they are logged."""
        k = self.steps
        if on_device:
            confidence_per_step, delta_norms = list(self._confidence), list(self._delta_norms)
            slot_norms = {name: torch.stack(values).mean() for name, values in self._slot_norms.items()}
            confidence: Any = torch.stack(confidence_per_step).mean() if k else float("nan")
        else:
            scalars = torch.stack(self._confidence + self._delta_norms).tolist() if k else []
            confidence_per_step, delta_norms = scalars[:k], scalars[k:]
            slot_norms = {name: torch.stack(v).mean().item() for name, v in self._slot_norms.items()}
            confidence = sum(confidence_per_step) / k if k else float("nan")
        final = self.final_confidence
        if final is None:  # no step ran: nothing was estimated
            final = torch.full(like.shape[:2], float("nan"), device=like.device)
        return {
            "steps": k,
            "confidence": confidence,
            "confidence_per_step": confidence_per_step,
            "delta_norms": delta_norms,
            "final_confidence": final.float(),
            "slot_norms": slot_norms,
            "gates": refiner.gate_values(tensors=on_device),
        }
