"""Automatic health checks: the slot refiner's debugging guide, watched on every logged row.

Each check reads the flat columns the trainer logs (`training.metrics`) and warns once per run, in plain
words naming the config knob to turn; a condition that could be a coincidence of initialisation must
persist for `window` consecutive logged rows. docs/troubleshooting.md describes each check.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llada_trm.errors import NonFiniteLossError


@dataclass(frozen=True)
class HealthThresholds:
    """When the checks speak up: constants since issue 25 (docs/troubleshooting.md gives each one's
    meaning); a test may pass a shorter window."""

    window: int = 20
    slot_collapse_spread: float = 0.05
    slot_collapse_overlap: float = 0.5
    slot_collapse_gate_band: float = 0.05
    dead_gate: float = 0.05
    delta_norm_max: float = 100.0
    delta_growth: float = 10.0
    loss_rel_std: float = 0.5
    context_ratio: float = 0.05
    idle_skipped: float = 0.95


logger = logging.getLogger("llada_trm")

CHECKS = (
    "slot_collapse",
    "dead_gate",
    "delta_explosion",
    "loss_oscillation",
    "low_confidence",
    "refiner_idle",
    "unused_context",
)

_CONTEXT_NAMES = ("ctx", "context")


class HealthMonitor:
    """Feed it every logged metrics row (`observe(step, row)`); it warns once per kind when a check fires."""

    def __init__(
        self,
        thresholds: HealthThresholds | None = None,
        *,
        enabled: bool = True,
        refiner: bool = True,
        confidence_threshold: float | None = None,
    ):
        self.t = thresholds or HealthThresholds()
        self.enabled = enabled
        self.refiner = refiner  # False (a pretraining, a top-block run): only the loss is checked
        self.confidence_threshold = confidence_threshold
        self.warned: dict[str, str] = {}
        window = self.t.window
        self._loss: deque[float] = deque(maxlen=window)
        self._streak: dict[str, int] = {}

    def observe(self, step: int, row: Mapping[str, Any]) -> list[str]:
        """Check one logged row; returns the warnings issued now (each kind at most once per run)."""
        if not self.enabled:
            return []
        slot_norms = _prefixed(row, "slot_norm_")
        gates = _prefixed(row, "gate_")
        issued = []
        for kind, message in zip(CHECKS, (
            self._slot_collapse(row, slot_norms, gates),
            self._dead_gate(gates),
            self._delta_explosion(row),
            self._loss_oscillation(row),
            self._low_confidence(row),
            self._refiner_idle(row),
            self._unused_context(slot_norms, gates),
        ), strict=True):
            if not self.refiner and kind != "loss_oscillation":
                continue
            if message is not None and kind not in self.warned:
                text = f"health check '{kind}' at step {step}: {message}"
                self.warned[kind] = text
                logger.warning(text)
                issued.append(text)
        return issued

    def state_dict(self) -> dict[str, Any]:
        """The warnings given and the rolling windows (the loss window, each check's streak): a resumed run
        then warns at the step an uninterrupted one would."""
        return {"warned": dict(self.warned), "loss": list(self._loss), "streak": dict(self._streak)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.warned = dict(state.get("warned", {}))
        self._loss.clear()
        self._loss.extend(float(v) for v in state.get("loss", ()))  # a smaller window keeps the newest
        self._streak = {str(k): int(v) for k, v in (state.get("streak") or {}).items()}

    # ------------------------------------------------------------------------------------------ checks

    def _persistent(self, kind: str, condition: bool) -> bool:
        """True once `condition` has held for `window` consecutive rows."""
        self._streak[kind] = self._streak.get(kind, 0) + 1 if condition else 0
        return self._streak[kind] >= self.t.window

    def _slot_collapse(
        self, row: Mapping[str, Any], norms: dict[str, float], gates: dict[str, float]
    ) -> str | None:
        """Gates that never left 0.5, with slots that look alike: equal norms or overlapping projections.

        Slot norms only compare when the slots have equal widths (a LayerNormed slot's norm grows with
        sqrt(width)); the projections' overlap (the `orthogonality` column, in [0, 1]) compares always.
        """
        spread = band = 0.0
        alike = ""
        overlap = _number(row.get("orthogonality"))
        if len(norms) >= 2:
            values = list(norms.values())
            mean = sum(values) / len(values)
            spread = (max(values) - min(values)) / mean if mean > 0 else 0.0
            if spread < self.t.slot_collapse_spread:
                alike = f"slot norms differ by only {spread:.1%}"
        if not alike and overlap is not None and overlap >= self.t.slot_collapse_overlap:
            alike = f"the slot projections overlap by {overlap:.2f}"
        if gates:
            band = max(abs(g - 0.5) for g in gates.values())
        condition = bool(gates) and bool(alike) and band < self.t.slot_collapse_gate_band
        if not self._persistent("slot_collapse", condition):
            return None
        return (
            f"the slots look collapsed: {alike} and every gate sits within {band:.3f} of 0.5 for "
            f"{self.t.window} logged rows, so the slots carry the same information. "
            "Raise training_params.orthogonality_weight (e.g. 0.01 -> 0.05)."
        )

    def _dead_gate(self, gates: dict[str, float]) -> str | None:
        dead = {name: g for name, g in gates.items() if g < self.t.dead_gate}
        if not self._persistent("dead_gate", bool(dead)):
            return None
        name, value = min(dead.items(), key=lambda item: item[1])
        return (
            f"gate '{name}' has died ({value:.4f} < {self.t.dead_gate}): its slot no longer contributes to "
            "the update. Lower training.lr (a too-large step drives gates into saturation)."
        )

    def _delta_explosion(self, row: Mapping[str, Any]) -> str | None:
        """An update that is huge (or NaN), or a recursion whose updates grow from step to step.

        Growth is judged across the K steps of one forward pass (last step's update vs the first's): a
        converging recursion takes smaller and smaller steps, a diverging one larger ones. Growth over
        training time is not a symptom: the refiner starts near the identity and its updates grow as it
        learns.
        """
        delta = _number(row.get("delta_norm"))
        if delta is not None and (not math.isfinite(delta) or delta > self.t.delta_norm_max):
            self._persistent("delta_explosion", False)
            return (
                f"refinement deltas exploded (delta norm {delta:.4g} > {self.t.delta_norm_max:g}). "
                "Reduce model.delta_scale (e.g. 0.1 -> 0.05) and keep training.max_grad_norm at 1.0 "
                "or less."
            )
        first, last = _number(row.get("delta_norm_first")), _number(row.get("delta_norm_last"))
        growth = last / first if first and last is not None and first > 0 else 0.0
        if not self._persistent("delta_explosion", growth > self.t.delta_growth):
            return None
        return (
            f"the recursion diverges: the last refinement step's update is {growth:.1f}x the first's "
            f"(> {self.t.delta_growth:g}x) for {self.t.window} logged rows, so each step overshoots more. "
            "Reduce model.delta_scale (e.g. 0.1 -> 0.05) or model.max_recursive_steps, or lower "
            "training.lr."
        )

    def _loss_oscillation(self, row: Mapping[str, Any]) -> str | None:
        loss = _number(row.get("loss"))
        if loss is None or not math.isfinite(loss):
            return None
        self._loss.append(loss)
        if len(self._loss) < self._loss.maxlen:
            return None
        rel = _detrended_rel_std(list(self._loss))
        if rel <= self.t.loss_rel_std:
            return None
        return (
            f"the loss oscillates: around its trend it varies by {rel:.0%} of its mean over the last "
            f"{len(self._loss)} logged rows (> {self.t.loss_rel_std:.0%}). Lower training.lr, reduce "
            "model.delta_scale, or raise training.gradient_accumulation_steps."
        )

    def _low_confidence(self, row: Mapping[str, Any]) -> str | None:
        skipped = _number(row.get("skipped_fraction_masked", row.get("skipped_fraction")))
        if self.confidence_threshold is not None and self.confidence_threshold >= 1.0:
            return None  # refining every chunk was asked for
        if not self._persistent("low_confidence", skipped is not None and skipped == 0.0):
            return None
        confidence = _number(row.get("chunk_confidence", row.get("confidence")))
        seen = f" (mean chunk confidence {confidence:.2f})" if confidence is not None else ""
        return (
            f"confidence stays low everywhere: every chunk was refined for {self.t.window} logged "
            f"rows{seen}, so selective refinement saves nothing. Lower model.confidence_threshold "
            "(e.g. 0.5 -> 0.3) or refine every chunk (model.chunk_selection: all)."
        )

    def _refiner_idle(self, row: Mapping[str, Any]) -> str | None:
        skipped = _number(row.get("skipped_fraction_masked", row.get("skipped_fraction")))
        if not self._persistent("refiner_idle", skipped is not None and skipped >= self.t.idle_skipped):
            return None
        return (
            f"the refiner is almost never trained: {skipped:.0%} of the chunks were skipped (confident) "
            f"for {self.t.window} logged rows. Raise model.confidence_threshold (e.g. 0.5 -> 0.9; above 1 "
            "refines every chunk)."
        )

    def _unused_context(self, norms: dict[str, float], gates: dict[str, float]) -> str | None:
        found = None
        for label, values in (("gate", gates), ("norm", norms)):
            ctx = {n: v for n, v in values.items() if any(c in n for c in _CONTEXT_NAMES)}
            others = [v for n, v in values.items() if n not in ctx]
            if not ctx or not others:
                continue
            reference = sum(others) / len(others)
            name, value = min(ctx.items(), key=lambda item: item[1])
            if reference > 0 and value < self.t.context_ratio * reference:
                found = (label, name, value, reference)
                break
        if not self._persistent("unused_context", found is not None):
            return None
        label, name, value, reference = found
        return (
            f"the context slot is unused: its {label} '{name}' is {value:.4g} against {reference:.4g} for "
            "the other slots. Check that model.context_layers names backbone layers that exist (attention "
            "contexts feed this slot), or raise training.lr for the head."
        )


def _prefixed(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    values = {}
    for key, value in row.items():
        number = _number(value)
        if key.startswith(prefix) and number is not None:
            values[key[len(prefix) :]] = number
    return values


def _number(value: Any) -> float | None:
    """A logged value as a float; None for an empty cell (the loop logs None where it has no value)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _detrended_rel_std(values: list[float]) -> float:
    """Std of the residuals around a least-squares line over the mean: a steady decline is not noise."""
    mean = statistics.fmean(values)
    if mean == 0 or len(values) < 2:
        return 0.0
    xs = range(len(values))
    slope, intercept = statistics.linear_regression(xs, values)
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, values, strict=True)]
    return statistics.pstdev(residuals, 0.0) / abs(mean)


def non_finite_error(step: int, what: str, terms: Mapping[str, float], last: Path) -> NonFiniteLossError:
    """The one-line error of a diverged step: every loss term, the last good checkpoint and what to try."""
    detail = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
    kept = (
        f"the last good checkpoint is {last} (resume with --resume {last})"
        if (last / "trainer_state.pt").is_file()
        else "no checkpoint had been written yet"
    )
    return NonFiniteLossError(
        f"step {step}: {what} ({detail}); the run stopped without applying this update and {kept}. "
        "Try a lower training.lr, a smaller model.delta_scale, or training.mixed_precision: fp32."
    )
