"""Health checks (each provoked), slot statistics, and the metrics CSV writer."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from llada_trm.training.health import CHECKS, HealthMonitor, HealthThresholds
from llada_trm.training.metrics import MetricsWriter, forward_statistics, parameter_statistics

HEALTHY = {
    "loss": 2.0,
    "skipped_fraction": 0.4,
    "confidence": 0.7,
    "delta_norm": 0.5,
    "slot_norm_ctx": 4.0,
    "slot_norm_reason": 3.0,
    "slot_norm_refine": 2.0,
    "slot_norm_conf": 1.5,
    "gate_ctx": 0.6,
    "gate_reason": 0.45,
    "gate_refine": 0.4,
    "gate_conf": 0.7,
}


def run(monitor: HealthMonitor, rows) -> list[str]:
    issued = []
    for step, row in enumerate(rows, start=1):
        issued += monitor.observe(step, row)
    return issued


def monitor(**thresholds) -> HealthMonitor:
    return HealthMonitor(HealthThresholds(window=5, **thresholds), confidence_threshold=0.5)


def kinds(issued: list[str]) -> set[str]:
    return {kind for kind in CHECKS if any(f"'{kind}'" in text for text in issued)}


def test_healthy_run_is_quiet(caplog):
    rows = [dict(HEALTHY, loss=2.0 - 0.01 * i) for i in range(30)]
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        assert run(monitor(), rows) == []
    assert not caplog.records


def test_slot_collapse():
    row = dict(HEALTHY, slot_norm_ctx=2.0, slot_norm_reason=2.01, slot_norm_refine=2.02, slot_norm_conf=2.0)
    row.update(gate_ctx=0.5, gate_reason=0.51, gate_refine=0.49, gate_conf=0.5)
    m = monitor()
    assert run(m, [row] * 4) == []  # must persist for a whole window
    issued = run(m, [row] * 10)
    assert kinds(issued) == {"slot_collapse"} and len(issued) == 1  # once per run
    assert "training_params.orthogonality_weight" in issued[0] and "norms differ" in issued[0]
    # Unequal slot widths give unequal norms; overlapping projections still reveal the collapse.
    overlapping = dict(row, slot_norm_ctx=4.0, slot_norm_conf=1.0, orthogonality=0.8)
    issued = run(monitor(), [overlapping] * 5)
    assert kinds(issued) == {"slot_collapse"} and "overlap by 0.80" in issued[0]
    assert run(monitor(), [dict(overlapping, gate_ctx=0.8)] * 10) == []  # the gates have differentiated


def test_dead_gate():
    issued = run(monitor(), [dict(HEALTHY, gate_reason=0.01)] * 6)
    assert kinds(issued) == {"dead_gate"}
    assert "'reason'" in issued[0] and "training.lr" in issued[0]


def test_delta_explosion_absolute_and_across_steps():
    issued = run(monitor(delta_norm_max=10.0), [HEALTHY, dict(HEALTHY, delta_norm=50.0)])
    assert kinds(issued) == {"delta_explosion"} and "model.delta_scale" in issued[0]
    assert kinds(run(monitor(), [dict(HEALTHY, delta_norm=float("nan"))])) == {"delta_explosion"}
    diverging = dict(HEALTHY, delta_norm_first=0.01, delta_norm_last=0.5)  # each step overshoots more
    assert run(monitor(), [diverging] * 4) == []  # not yet persistent
    issued = run(monitor(), [diverging] * 5)
    assert kinds(issued) == {"delta_explosion"} and "50.0x" in issued[0]
    # Growth over training time is learning, not instability: the refiner starts near the identity.
    steps = {"delta_norm_first": 0.1, "delta_norm_last": 0.05}
    learning = [dict(HEALTHY, delta_norm=0.001 * 2**i, **steps) for i in range(12)]
    assert run(monitor(), learning) == []


def test_loss_oscillation_but_not_a_steady_decline():
    zigzag = [dict(HEALTHY, loss=4.0 if i % 2 else 0.5) for i in range(6)]
    issued = run(monitor(), zigzag)
    assert kinds(issued) == {"loss_oscillation"} and "training.lr" in issued[0]
    decline = [dict(HEALTHY, loss=10.0 - 1.5 * i) for i in range(6)]  # large std, but it is a trend
    assert run(monitor(), decline) == []


def test_low_confidence_everywhere():
    issued = run(monitor(), [dict(HEALTHY, skipped_fraction=0.0, confidence=0.2)] * 5)
    assert kinds(issued) == {"low_confidence"}
    assert "model.confidence_threshold" in issued[0] and "0.20" in issued[0]
    everything = HealthMonitor(HealthThresholds(window=5), confidence_threshold=1.0)
    assert run(everything, [dict(HEALTHY, skipped_fraction=0.0)] * 10) == []  # refining all was asked for
    interrupted = [dict(HEALTHY, skipped_fraction=0.0 if i % 4 else 0.1) for i in range(12)]
    assert run(monitor(), interrupted) == []


def test_refiner_idle_when_nearly_every_chunk_is_skipped():
    issued = run(monitor(), [dict(HEALTHY, skipped_fraction=0.98)] * 5)
    assert kinds(issued) == {"refiner_idle"}
    assert "model.confidence_threshold" in issued[0] and "98%" in issued[0]
    assert run(monitor(), [dict(HEALTHY, skipped_fraction=0.9)] * 10) == []  # enough chunks are refined
    interrupted = [dict(HEALTHY, skipped_fraction=0.98 if i % 4 else 0.5) for i in range(12)]
    assert run(monitor(), interrupted) == []


def test_a_run_without_a_refiner_checks_only_its_loss():
    """A pretraining (no refiner) skips every chunk: the refiner checks must not warn about it."""
    no_refiner = HealthMonitor(HealthThresholds(window=5), refiner=False, confidence_threshold=0.5)
    assert run(no_refiner, [dict(HEALTHY, skipped_fraction=1.0, gate_reason=0.0)] * 10) == []
    oscillating = [dict(HEALTHY, loss=10.0 if i % 2 else 0.1) for i in range(40)]
    assert kinds(run(HealthMonitor(HealthThresholds(window=5), refiner=False), oscillating)) == {
        "loss_oscillation"
    }


def test_unused_context_slot():
    issued = run(monitor(), [dict(HEALTHY, slot_norm_ctx=0.01)] * 5)
    assert kinds(issued) == {"unused_context"} and "model.context_layers" in issued[0]
    gate_row = dict(HEALTHY, gate_ctx=0.06)  # above the dead-gate threshold, but ~0 next to the others
    assert kinds(run(monitor(context_ratio=0.2), [gate_row] * 5)) == {"unused_context"}


def test_warnings_go_to_the_package_logger_once(caplog):
    m = monitor()
    with caplog.at_level(logging.WARNING, logger="llada_trm"):
        run(m, [dict(HEALTHY, gate_reason=0.01)] * 20)
    assert len(caplog.records) == 1 and caplog.records[0].name == "llada_trm"
    assert "dead_gate" in m.state_dict()["warned"]
    disabled = HealthMonitor(HealthThresholds(window=1), enabled=False)
    assert run(disabled, [dict(HEALTHY, gate_reason=0.0)] * 3) == []


# ----------------------------------------------------------------------------------------------- stats


def test_parameter_statistics_of_a_refiner_without_its_own_stats():
    class Head(nn.Module):
        def gate_values(self):
            return {"ctx": 0.5}

        def orthogonality_loss(self):
            return torch.tensor(0.25)

    class Model(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.refinement_head = nn.ModuleDict({k: Head() for k in ["slot", "mlp"][:n]})

    assert parameter_statistics(Model(1)) == {"gate_ctx": pytest.approx(0.5), "orthogonality": 0.25}
    two = parameter_statistics(Model(2))
    assert set(two) == {"gate_slot_ctx", "gate_mlp_ctx", "orthogonality_slot", "orthogonality_mlp"}


def test_forward_statistics_flatten():
    stats = {
        "refine_steps": 1.5,
        "skipped_fraction": torch.tensor(0.25),
        "confidence": 0.8,
        "delta_norms": [0.2, 0.4],
        "slot_norms": {"ctx": 3.0, "reason": torch.tensor([1.0, 2.0])},
        "gates": {"ctx": 0.5},
        "final_confidence": torch.rand(2, 3),
    }
    row = forward_statistics(stats)
    assert row == {
        "refine_steps": 1.5,
        "skipped_fraction": 0.25,
        "confidence": 0.8,
        "delta_norm": pytest.approx(0.3),
        "delta_norm_first": pytest.approx(0.2),
        "delta_norm_last": pytest.approx(0.4),
        "slot_norm_ctx": 3.0,
        "slot_norm_reason": 1.5,
        "gate_ctx": 0.5,
    }


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_writer_known_columns_new_keys_and_resume(tmp_path):
    path = tmp_path / "training_metrics.csv"
    writer = MetricsWriter(path, ["step", "loss", "lr"])
    writer.log({"step": 1, "loss": 2.5})
    writer.log({"step": 2, "loss": 2.25, "lr": 1e-4, "gate_ctx": 0.5})  # a new key widens the file
    assert path.read_text().splitlines()[0] == "step,loss,lr,gate_ctx"
    rows = writer.read()
    assert rows[0] == {"step": "1", "loss": "2.5", "lr": "", "gate_ctx": ""}
    assert rows[1]["gate_ctx"] == "0.5" and float(rows[1]["lr"]) == pytest.approx(1e-4)

    writer.log({"step": 3, "loss": float("nan")})
    again = MetricsWriter(path, ["step", "loss", "lr", "grad_norm"], keep_until=2)  # reopened on resume
    assert again.columns == ["step", "loss", "lr", "gate_ctx", "grad_norm"]
    assert [r["step"] for r in again.read()] == ["1", "2"]
