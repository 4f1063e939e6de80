"""`llada-trm plot`: PNGs from a run's metrics, absent columns skipped, clear errors without metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_assets import REPO

from llada_trm.study.plots import PlotError, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


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


# ------------------------------------------------------------------------------- what is drawn (decisions)

VAL = [
    {"step": 10.0, "accuracy": 0.50, "accuracy_base": 0.40, "accuracy_step_1": 0.45, "accuracy_step_2": 0.50,
     "chunk_accuracy": 0.2, "chunk_accuracy_base": 0.1, "refine_steps": 2.0, "skipped_fraction": 0.3},
    {"step": 20.0, "accuracy": 0.60, "accuracy_base": 0.40, "accuracy_step_1": 0.55, "accuracy_step_2": 0.60,
     "chunk_accuracy": 0.3, "chunk_accuracy_base": 0.1, "refine_steps": 1.5, "skipped_fraction": 0.4},
]  # fmt: skip
TRAIN = [
    {"step": 5.0, "loss": 2.0, "orthogonality": 0.1, "refine_steps": 2.0, "chunk_confidence": 0.7},
    {"step": 15.0, "loss": 1.0, "orthogonality": 0.2, "refine_steps": 1.0, "chunk_confidence": 0.8},
]


def test_accuracy_is_drawn_as_differences_from_the_backbone():
    from llada_trm.study.plots import run_figures

    panels = run_figures([], VAL, {}, "slot")["accuracy.png"].panels
    masked, chunk = panels
    assert masked.title == "validation masked-token accuracy − backbone" and masked.zero_line
    assert list(masked.series) == ["refined", "step 1", "step 2"]
    steps, values = masked.series["refined"]
    assert steps == [10.0, 20.0] and values == pytest.approx([10.0, 20.0])  # points above the backbone
    assert masked.series["step 1"][1] == pytest.approx([5.0, 15.0])
    assert chunk.series["refined"][1] == pytest.approx([10.0, 20.0]) and not chunk.fractions


def test_accuracy_without_a_backbone_column_is_the_level():
    from llada_trm.study.plots import run_figures

    rows = [{"step": 1.0, "accuracy": 0.3}, {"step": 2.0, "accuracy": 0.4}]
    (panel,) = run_figures([], rows, {}, "slot")["accuracy.png"].panels
    assert panel.fractions and not panel.zero_line and list(panel.series) == ["accuracy"]


def test_steps_and_fractions_never_share_an_axis():
    from llada_trm.study.plots import run_figures

    steps, fractions = run_figures(TRAIN, VAL, {}, "slot")["refinement.png"].panels
    assert sorted(steps.series) == ["refine_steps (training)", "refine_steps (validation)"]
    assert sorted(fractions.series) == ["chunk_confidence (training)", "skipped_fraction (validation)"]
    assert fractions.fractions and not steps.fractions


def test_no_orthogonality_plot_for_the_mlp_refiner():
    from llada_trm.study.plots import run_figures

    assert "orthogonality.png" in run_figures(TRAIN, [], {}, "slot")
    assert "orthogonality.png" not in run_figures(TRAIN, [], {}, "mlp")
    zero = [{**row, "orthogonality": 0.0} for row in TRAIN]
    assert "orthogonality.png" not in run_figures(zero, [], {}, None)  # no penalty measured: no plot


def test_single_points_become_labelled_values():
    from llada_trm.study.plots import run_figures

    figures = run_figures([], VAL[:1], {"synthetic-test-slot": 0.25}, "slot")
    masked = figures["accuracy.png"].panels[0]
    assert not masked.series and masked.title.endswith("at step 10")
    assert masked.categories == pytest.approx({"refined": 10.0, "step 1": 5.0, "step 2": 10.0})
    sampled = figures["accuracy.png"].panels[-1]
    assert sampled.categories == {"synthetic-test-slot": 0.25}


def test_short_runs_get_no_offset_on_the_y_axis():
    from llada_trm.study.plots import FigureSpec, Panel, draw

    panel = Panel("loss", "loss", {"loss": ([1.0, 2.0, 3.0], [1000.001, 1000.002, 1000.003])})
    (ax, *_) = draw(FigureSpec("loss", [panel])).axes
    ax.figure.canvas.draw()
    assert ax.yaxis.get_major_formatter().get_useOffset() is False
    assert ax.yaxis.get_offset_text().get_text() == ""


PRETRAIN_CSV = """step,loss,lr,grad_norm,eval_masked_accuracy,eval_strict_accuracy,eval_entity_copy,elapsed_s
25,4.2,5e-4,3.7,,,,58.4
50,2.5,1e-3,2.1,0.61,0.10,0.30,76.2
75,2.1,1e-3,1.9,,,,90.0
100,1.9,9e-4,1.5,0.72,0.20,,110.0
"""


def test_a_pretrain_run_plots_every_eval_column_on_its_own_axis(tmp_path):
    from llada_trm.study.plots import run_specs

    (tmp_path / "pretrain_metrics.csv").write_text(PRETRAIN_CSV)
    specs = run_specs(tmp_path)
    assert sorted(specs) == ["pretrain.png", "pretrain_eval.png"]
    assert [p.title for p in specs["pretrain.png"].panels] == ["loss", "learning rate", "gradient norm"]
    evals = specs["pretrain_eval.png"].panels
    assert [p.title for p in evals] == ["entity copy at step 50", "masked accuracy", "strict accuracy"]
    assert evals[1].series == {"eval_masked_accuracy": ([50.0, 100.0], [0.61, 0.72])}  # empty cells skipped
    assert evals[0].categories == {"eval_entity_copy": 0.30}
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["pretrain.png", "pretrain_eval.png"]
    assert all(is_png(p) for p in written)


def test_the_embedded_backbone_is_a_pretrain_dir():
    from llada_trm.study.plots import run_specs

    backbone = REPO / "src" / "llada_trm" / "assets" / "tiny_backbone"
    assert sorted(run_specs(backbone)) == ["pretrain.png", "pretrain_eval.png"]
