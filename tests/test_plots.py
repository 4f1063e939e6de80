"""`llada-trm plot`: PNGs from a run's metrics, absent columns skipped, clear errors without metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_assets import tiny_run

from llada_trm.plots import PlotError, plot_comparison, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


def test_slot_run_gets_every_plot(run_dir, tmp_path):
    eval_dir = run_dir / "eval" / "synthetic-test-slot"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "summary.json").write_text(json.dumps({"accuracy_strict": 0.25, "accuracy_flexible": 0.5}))
    written = plot_run(run_dir, tmp_path)
    names = sorted(p.name for p in written)
    assert names == [
        "accuracy.png",
        "gates.png",
        "loss.png",
        "orthogonality.png",
        "refinement.png",
        "slot_norms.png",
    ]
    assert all(is_png(p) for p in written)


def test_absent_columns_are_skipped(tmp_path):
    (tmp_path / "training_metrics.csv").write_text("step,loss,gate_ctx,slot_norm_ctx\n1,2.0,,\n2,1.5,,\n")
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png"]  # gate/slot columns exist but are empty (an MLP run)
    rows = read_metrics(tmp_path / "training_metrics.csv")
    assert rows == [{"step": 1.0, "loss": 2.0}, {"step": 2.0, "loss": 1.5}]


def test_validation_only_run_plots_accuracy(tmp_path):
    (tmp_path / "validation_metrics.csv").write_text("step,loss,accuracy,accuracy_base\n5,1.0,0.4,0.3\n")
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["accuracy.png", "loss.png"]
    assert all(p.parent == tmp_path / "plots" for p in written)  # the default location


def test_errors_without_metrics(tmp_path):
    with pytest.raises(PlotError, match="no such run directory"):
        plot_run(tmp_path / "missing")
    with pytest.raises(PlotError, match="no training_metrics.csv or validation_metrics.csv"):
        plot_run(tmp_path)
    (tmp_path / "training_metrics.csv").write_text("step,loss\n")
    with pytest.raises(PlotError, match="no rows yet"):
        plot_run(tmp_path)


def test_comparison_bars(tmp_path):
    rows = [
        {"refiner": "none", "accuracy_strict": 0.5, "accuracy_flexible": 0.6, "tokens_per_s": 100.0},
        {"refiner": "slot", "accuracy_strict": 0.7, "accuracy_flexible": None, "tokens_per_s": 80.0},
    ]
    assert is_png(plot_comparison(rows, tmp_path / "sub" / "comparison.png"))
