"""Plots a reader takes in at a glance, at 3 arms and at 12: one row per arm, n and intervals written at each
row, no two labels overlapping, equal series still told apart."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
from tiny_assets import REPO

from llada_trm.study.plots import FigureSpec, Panel, draw, paired_comparison_figure, plot_paired_comparison


def _report(arms: int, seeds: int, problems: int = 384) -> dict:
    kinds = ["none", "slot", *[f"slot_variant_{i}_long_name" for i in range(arms - 2)]]
    pairs = [f"{kind}_vs_none" for kind in kinds[1:]] + [f"{kind}_vs_slot" for kind in kinds[2:]]
    rate = {"p": 0.57, "low": 0.52, "high": 0.62, "n": problems}  # every arm equal: all would overlap
    diff = {"diff": 0.0, "ci_low": -0.013, "ci_high": 0.013, "n": problems}
    per_seed = {str(s): {"accuracy": {k: {"strict": dict(rate)} for k in kinds},
                         "paired": {p: dict(diff) for p in pairs}} for s in range(seeds)}  # fmt: skip
    return {"problems": problems, "per_seed": per_seed}


def _texts(figure):
    """Every visible, non-empty text of the figure with its extent on the canvas."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    from matplotlib.text import Text

    found = figure.findobj(Text)
    texts = [t for t in dict.fromkeys(found) if t.get_visible() and t.get_text().strip()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts]


def _overlaps(figure) -> list[tuple[str, str]]:
    boxes = _texts(figure)
    clashes = []
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        if box_a.overlaps(box_b) and box_a.intersection(box_a, box_b).width > 1:
            clashes.append((a, b))
    return clashes


@pytest.mark.parametrize(("arms", "seeds"), [(3, 1), (3, 3), (12, 3)])
def test_comparison_rows_read_at_3_and_12_arms(arms, seeds):
    figure = paired_comparison_figure(_report(arms, seeds))
    accuracy, differences = figure.axes
    assert len(accuracy.get_yticklabels()) == arms  # one row per arm
    assert len(differences.get_yticklabels()) == 2 * arms - 3
    assert not _overlaps(figure), _overlaps(figure)
    width, height = figure.bbox.width, figure.bbox.height
    for text, box in _texts(figure):  # nothing cut off at the edges
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text
    notes = [t.get_text() for t in accuracy.texts if "n=" in t.get_text()]
    assert len(notes) == arms and all("n=384" in note for note in notes)  # n beside every row
    if seeds > 1:  # equal values from different seeds: each seed its own marker, at its own height
        markers = [line for line in accuracy.lines if line.get_marker() not in ("D", "None", "|")]
        ys = {tuple(line.get_ydata()) for line in markers}
        assert len(ys) >= seeds


def test_a_comparison_png_is_written(tmp_path):
    path = plot_paired_comparison(_report(5, 2), tmp_path / "sub" / "comparison.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_sampled_points_show_their_n_and_interval():
    """A 4-problem evaluation and a 64-problem one: each row says n, and the intervals differ in width."""
    values, counts = {"test_0-4-slot": 0.5, "test-slot": 0.5}, {"test_0-4-slot": 4, "test-slot": 64}
    panel = Panel("sampled accuracy (strict)", "accuracy", categories=values, counts=counts, fractions=True)
    figure = draw(FigureSpec("accuracy", [panel]))
    (ax,) = figure.axes
    notes = [t.get_text() for t in ax.texts]
    assert any(note.endswith("n=4") for note in notes) and any(note.endswith("n=64") for note in notes)
    widths = sorted(abs(seg[1][0] - seg[0][0]) for c in ax.collections for seg in c.get_segments())
    assert widths[0] < widths[-1] / 2  # the 64-problem interval is far narrower
    assert [label.get_text() for label in ax.get_yticklabels()] == ["test_0-4-slot", "test-slot"]
    assert not _overlaps(figure)


def test_equal_series_are_told_apart():
    same = ([1.0, 2.0, 3.0], [0.5, 0.4, 0.3])
    figure = draw(FigureSpec("loss", [Panel("loss", "loss", {"a": same, "b": same})]))
    first, second = figure.axes[0].lines[:2]
    assert first.get_linestyle() != second.get_linestyle() and first.get_linewidth() > second.get_linewidth()


def test_replot_reads_the_shipped_lever_report():
    spec = importlib.util.spec_from_file_location("replot", REPO / "scripts" / "replot_comparison.py")
    replot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replot)
    report = replot.report_from_markdown((REPO / "docs/results/levers_tiny.md").read_text(encoding="utf-8"))
    assert report["problems"] == 384 and sorted(report["per_seed"]) == ["0", "1", "2"]
    seed0 = report["per_seed"]["0"]
    assert len(seed0["accuracy"]) == 9 and len(seed0["paired"]) == 15
    assert seed0["accuracy"]["phase2_top"]["strict"] == {"p": 0.594, "low": 0.544, "high": 0.642, "n": 384}
    assert seed0["paired"]["phase2_top_vs_none"]["diff"] == pytest.approx(0.018)
    assert report["per_seed"]["2"]["accuracy"]["none"] == seed0["accuracy"]["none"]  # sampled once
