"""PNG plots of a training run: `llada-trm plot RUN_DIR`.

Reads the trainer's `training_metrics.csv` and `validation_metrics.csv` (and, when present, the evaluation
summaries under `RUN_DIR/eval/*/summary.json`) and draws one figure per topic: loss terms, slot norms, gate
openings, orthogonality, accuracy and refinement efficiency. A topic whose columns are absent (an MLP run has
no slot norms) is skipped, so the same command works for every refiner. Figures are drawn with matplotlib's
object API on the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llada_trm.io import atomic_path

__all__ = ["PlotError", "plot_comparison", "plot_paired_comparison", "plot_run", "read_metrics"]

TRAIN_FILE = "training_metrics.csv"
VALIDATION_FILE = "validation_metrics.csv"

Series = dict[str, tuple[list[float], list[float]]]


class PlotError(ValueError):
    """A run directory without metrics to plot."""


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV as floats; empty or non-numeric cells are left out of their row."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, text in raw.items():
                try:
                    value = float(text)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    row[key] = value
            if "step" in row:
                rows.append(row)
    return rows


def _series(
    rows: Sequence[Mapping[str, float]], select: Callable[[str], bool], skip_zero: bool = False
) -> Series:
    """{column: (steps, values)} for every column accepted by `select` that has at least one value.

    `skip_zero` drops columns that are zero throughout (a loss term whose weight is off).
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key != "step" and key not in columns and select(key))
    series: Series = {}
    for column in columns:
        points = [(row["step"], row[column]) for row in rows if column in row]
        if points and not (skip_zero and all(value == 0 for _, value in points)):
            steps, values = zip(*points, strict=True)
            series[column] = (list(steps), list(values))
    return series


def _figure(
    title: str,
    ylabel: str,
    panels: Sequence[tuple[str, Series]],
    path: Path,
    log: bool = False,
    fractions: bool = False,
) -> Path:
    """One row of panels; `log` for loss terms of different magnitudes, `fractions` pins y to [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, series) for name, series in panels if series]
    figure = Figure(figsize=(6.4 * len(panels), 4.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    # fixed margins: a layout engine doubles the drawing time, which adds up over a run's plots
    n = len(panels)
    figure.subplots_adjust(left=0.13 / n, right=1 - 0.03 / n, top=0.86, bottom=0.12, wspace=0.25)
    for ax, (name, series) in zip(axes, panels, strict=True):
        for label, (steps, values) in series.items():
            marker = "o" if len(steps) <= 20 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3)
        values = [v for _, vs in series.values() for v in vs]
        if log and min(values) > 0 and max(values) / min(values) > 20:  # terms of different magnitudes
            ax.set_yscale("log")
        if fractions:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    figure.suptitle(title)
    save_figure(figure, path)
    return path


def save_figure(figure: Any, path: Path) -> None:
    """PNG via a temporary sibling and a rename: a killed run never leaves a truncated image."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


def _eval_points(run_dir: Path, last_step: float) -> Series:
    """Sampled GSM8K-style accuracy of each evaluation under `run_dir/eval/`, placed at the last step."""
    series: Series = {}
    for summary in sorted(run_dir.glob("eval/*/summary.json")):
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for kind in ("strict", "flexible"):
            value = data.get(f"accuracy_{kind}")
            if isinstance(value, int | float):
                series[f"sampled {kind} ({summary.parent.name})"] = ([last_step], [float(value)])
    return series


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs into `out_dir` (default `RUN_DIR/plots`); returns their paths."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: no such run directory")
    train_path, val_path = run / TRAIN_FILE, run / VALIDATION_FILE
    if not train_path.is_file() and not val_path.is_file():
        raise PlotError(
            f"{run}: no {TRAIN_FILE} or {VALIDATION_FILE}; give the output.dir of a `llada-trm train` run"
        )
    train = read_metrics(train_path) if train_path.is_file() else []
    val = read_metrics(val_path) if val_path.is_file() else []
    if not train and not val:
        raise PlotError(f"{run}: the metrics files have no rows yet; plot again once the run has logged")
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    name = run.name

    def is_loss(key: str) -> bool:
        return key.startswith("loss")

    figures = {
        "loss.png": (
            "loss",
            [("training", _series(train, is_loss, True)), ("validation", _series(val, is_loss, True))],
            True,
        ),
        "slot_norms.png": ("norm", [("slot norms", _series(train, _prefixed("slot_norm")))], False),
        "gates.png": ("sigmoid(gate)", [("gate openings", _series(train, _prefixed("gate")))], False),
        "orthogonality.png": (
            "penalty",
            [("slot orthogonality", _series(train, _prefixed("orthogonality")))],
            False,
        ),
        "refinement.png": (
            "value",
            [
                ("refinement (training)", _series(train, _is_refinement)),
                ("refinement (validation)", _series(val, _is_refinement)),
            ],
            False,
        ),
    }
    written = []
    for filename, (ylabel, panels, log) in figures.items():
        if any(series for _, series in panels):
            title = f"{name}: {filename[:-4].replace('_', ' ')}"
            written.append(_figure(title, ylabel, panels, out / filename, log=log))
    accuracy = _series(val, lambda k: k.startswith("accuracy") or k.startswith("chunk_accuracy"))
    last_step = max((row["step"] for row in train + val), default=0.0)
    sampled = _eval_points(run, last_step)
    panels = [("validation masked accuracy", accuracy), ("sampled accuracy", sampled)]
    if accuracy or sampled:
        path = out / "accuracy.png"
        written.append(_figure(f"{name}: accuracy", "accuracy", panels, path, fractions=True))
    return written


_REFINEMENT_COLUMNS = ("refine_steps", "skipped_fraction", "skipped_fraction_masked", "chunk_confidence")


def _is_refinement(key: str) -> bool:
    return key in _REFINEMENT_COLUMNS


def _prefixed(prefix: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefix)


def plot_comparison(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Bars of strict / flexible accuracy and tokens/s for each compared model (`compare`'s rows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [str(row["refiner"]) for row in results]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.1, wspace=0.25)
    width = 0.38
    positions = list(range(len(labels)))
    for offset, key in ((-width / 2, "accuracy_strict"), (width / 2, "accuracy_flexible")):
        values = [float(row.get(key) or 0.0) for row in results]
        left.bar([p + offset for p in positions], values, width, label=key.replace("accuracy_", ""))
    left.set_xticks(positions, labels)
    left.set_ylim(0, 1)
    left.set_ylabel("accuracy")
    left.set_title("held-out generated problems")
    left.legend()
    speed = [float(row.get("tokens_per_s") or 0.0) for row in results]
    right.bar(positions, speed, 0.6, color="tab:gray")
    right.set_xticks(positions, labels)
    right.set_ylabel("generated tokens / s")
    right.set_title("sampling speed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return path


def plot_paired_comparison(report: Mapping[str, Any], path: str | Path) -> Path:
    """comparison.png of a `compare` report: strict accuracy per model with 95% Wilson intervals, and each
    paired difference (refiner vs none, slot vs mlp) with its 95% bootstrap interval; one marker per seed,
    and the mean across seeds as a black diamond when there are several."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_seed = report["per_seed"]
    seeds = list(per_seed)
    kinds = list(per_seed[seeds[0]]["accuracy"])
    pairs = list(per_seed[seeds[0]]["paired"])
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.12, wspace=0.25)
    spread = 0.5 / max(len(seeds), 1)

    def offset(i: int) -> float:
        return (i - (len(seeds) - 1) / 2) * spread

    for i, seed in enumerate(seeds):
        rates = [per_seed[seed]["accuracy"][kind]["strict"] for kind in kinds]
        values = [rate["p"] for rate in rates]
        errors = [[v - rate["low"] for v, rate in zip(values, rates, strict=True)],
                  [rate["high"] - v for v, rate in zip(values, rates, strict=True)]]  # fmt: skip
        x = [k + offset(i) for k in range(len(kinds))]
        left.errorbar(x, values, yerr=errors, fmt="o", capsize=3, label=f"seed {seed}")
        if pairs:
            stats = [per_seed[seed]["paired"][name] for name in pairs]
            diffs = [100 * s["diff"] for s in stats]
            bars = [[d - 100 * s["ci_low"] for d, s in zip(diffs, stats, strict=True)],
                    [100 * s["ci_high"] - d for d, s in zip(diffs, stats, strict=True)]]  # fmt: skip
            x = [k + offset(i) for k in range(len(pairs))]
            right.errorbar(x, diffs, yerr=bars, fmt="o", capsize=3, label=f"seed {seed}")
    pooled = report.get("pooled") or {}
    if len(seeds) > 1 and pairs:
        means = [100 * pooled["paired"][name]["diff"]["mean"] for name in pairs]
        right.plot(range(len(pairs)), means, "kD", label="mean over seeds")
    left.set_xticks(range(len(kinds)), kinds)
    left.set_ylabel("strict accuracy")
    left.set_title(f"test accuracy, 95% Wilson intervals ({report.get('problems', '?')} problems)")
    left.legend(fontsize="small")
    if pairs:
        right.axhline(0.0, color="tab:gray", linewidth=1)
        right.set_xticks(range(len(pairs)), [name.replace("_vs_", " vs ") for name in pairs])
        right.set_ylabel("accuracy difference (points)")
        right.set_title("paired differences, 95% bootstrap intervals")
        right.legend(fontsize="small")
    else:
        right.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return path
