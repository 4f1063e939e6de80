"""PNG plots of a run: `llada-trm plot RUN_DIR`.

A training run: the trainer's `training_metrics.csv` and `validation_metrics.csv` (and, when present, the
evaluation summaries under `RUN_DIR/eval/*/summary.json`), one figure per topic: loss terms, slot norms, gate
openings, orthogonality, accuracy and refinement efficiency. A pretraining run (`llada-trm pretrain`'s output,
e.g. the embedded backbone): its `pretrain_metrics.csv`. Which figures, panels and series are drawn is decided
in `plot_specs` (absent topics skipped, accuracy as differences from the backbone, ...); this module draws
them with matplotlib's object API on the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llada_trm.io import atomic_path
from llada_trm.plot_specs import FigureSpec, Panel, pretrain_figures, run_figures

__all__ = [
    "PlotError",
    "draw",
    "plot_comparison",
    "plot_paired_comparison",
    "plot_reliability",
    "plot_run",
    "read_metrics",
]

TRAIN_FILE = "training_metrics.csv"
VALIDATION_FILE = "validation_metrics.csv"
PRETRAIN_FILE = "pretrain_metrics.csv"
_COLUMNS = 3  # panels per row


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


def _draw_series(ax: Any, panel: Panel) -> None:
    for label, (steps, values) in panel.series.items():
        if len(steps) == 1:  # one point: a labelled marker, not a lone dot on an empty axis
            (line,) = ax.plot(steps, values, "o", label=label, markersize=6)
            ax.annotate(f"{values[0]:.3g}", (steps[0], values[0]), textcoords="offset points", xytext=(6, 4),
                        fontsize=8, color=line.get_color())  # fmt: skip
        else:
            ax.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=3)
    ax.set_xlabel("optimizer step")


def _draw_categories(ax: Any, panel: Panel) -> None:
    names = list(panel.categories)
    values = [panel.categories[name] for name in names]
    ax.plot(range(len(names)), values, "o", markersize=7)
    for x, value in enumerate(values):
        ax.annotate(f"{value:.3g}", (x, value), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=15)
    ax.set_xlim(-0.6, len(names) - 0.4)


def draw(spec: FigureSpec, run_name: str = "") -> Any:
    """The matplotlib Figure of `spec` (panels in rows of three), not yet saved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(spec.panels)
    ncols, nrows = min(n, _COLUMNS), -(-n // _COLUMNS)
    figure = Figure(figsize=(6.4 * ncols, 4.2 * nrows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).flatten()
    # fixed margins: a layout engine doubles the drawing time, which adds up over a run's plots
    figure.subplots_adjust(left=0.13 / ncols, right=1 - 0.03 / ncols, top=1 - 0.14 / nrows,
                           bottom=0.12 / nrows, wspace=0.25, hspace=0.45)  # fmt: skip
    for ax, panel in zip(axes, spec.panels, strict=False):
        if panel.categories:
            _draw_categories(ax, panel)
        else:
            _draw_series(ax, panel)
        values = [v for _, vs in panel.series.values() for v in vs]
        if panel.log and values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        else:  # plain tick labels: no "+1.234e3" offset above a short run's axis
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if panel.fractions:
            ax.set_ylim(-0.02, 1.08)
        if panel.zero_line:
            ax.axhline(0.0, color="tab:gray", linewidth=1)
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[n:]:
        ax.set_axis_off()
    figure.suptitle(f"{run_name}: {spec.title}" if run_name else spec.title)
    return figure


def save_figure(figure: Any, path: Path) -> None:
    """PNG via a temporary sibling and a rename: a killed run never leaves a truncated image."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


def _eval_points(run_dir: Path) -> dict[str, float]:
    """Sampled strict accuracy of each evaluation under `run_dir/eval/`, by the evaluation's name."""
    points: dict[str, float] = {}
    for summary in sorted(run_dir.glob("eval/*/summary.json")):
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        value = data.get("accuracy_strict")
        if isinstance(value, int | float) and math.isfinite(value):
            points[summary.parent.name] = float(value)
    return points


def _run_refiner(run_dir: Path) -> str | None:
    """`model.refiner` of the run's config.yaml (None when unreadable)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    refiner = (config or {}).get("model", {}).get("refiner") if isinstance(config, dict) else None
    return refiner if isinstance(refiner, str) else None


def run_specs(run: Path) -> dict[str, FigureSpec]:
    """The figures of the run (or pretraining run) in `run`, by file name; PlotError without metrics."""
    if not run.is_dir():
        raise PlotError(f"{run}: no such run directory")
    train_path, val_path, pretrain_path = run / TRAIN_FILE, run / VALIDATION_FILE, run / PRETRAIN_FILE
    if not any(path.is_file() for path in (train_path, val_path, pretrain_path)):
        raise PlotError(
            f"{run}: no {TRAIN_FILE} or {VALIDATION_FILE} (nor {PRETRAIN_FILE}); give the output.dir of a "
            "`llada-trm train` run or the output directory of `llada-trm pretrain`"
        )
    train = read_metrics(train_path) if train_path.is_file() else []
    val = read_metrics(val_path) if val_path.is_file() else []
    pretrain = read_metrics(pretrain_path) if pretrain_path.is_file() else []
    if not train and not val and not pretrain:
        raise PlotError(f"{run}: the metrics files have no rows yet; plot again once the run has logged")
    specs = pretrain_figures(pretrain)
    if train or val:
        specs.update(run_figures(train, val, _eval_points(run), _run_refiner(run)))
    return specs


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs into `out_dir` (default `RUN_DIR/plots`); returns their paths."""
    run = Path(run_dir)
    specs = run_specs(run)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, spec in specs.items():
        save_figure(draw(spec, run.name), out / filename)
        written.append(out / filename)
    return written


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


def plot_reliability(reports: Mapping[str, Mapping[str, Any] | None], path: str | Path) -> Path | None:
    """reliability.png of the confident-error diagnostics (`evaluate.diagnostics`): per confidence bin, the
    share of commits equal to the reference token against the bin's mean confidence (one line per model,
    each point labelled with its count; the diagonal is perfect calibration), and the commits per bin.
    None (nothing written) when no model recorded confidences."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {name: r["reliability"] for name, r in reports.items() if r and r.get("reliability")}
    if not curves:
        return None
    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.18, wspace=0.25)
    left.plot([0, 1], [0, 1], color="tab:gray", linewidth=1, linestyle="--", label="calibrated")
    labels = [f"{b['low']:g}-{b['high']:g}" for b in next(iter(curves.values()))["bins"]]
    width = 0.8 / len(curves)
    for m, (name, curve) in enumerate(curves.items()):
        bins = [b for b in curve["bins"] if b["n"]]
        x, y = [b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins]
        (line,) = left.plot(x, y, marker="o", markersize=4, label=f"{name} (ECE {curve['ece']:.3f})")
        for b in bins:
            left.annotate(str(b["n"]), (b["mean_confidence"], b["accuracy"]), textcoords="offset points",
                          xytext=(3, -10), fontsize=6, color=line.get_color())  # fmt: skip
        offset = (m - (len(curves) - 1) / 2) * width
        right.bar([i + offset for i in range(len(labels))], [b["n"] for b in curve["bins"]], width,
                  label=name, color=line.get_color())  # fmt: skip
    left.set_xlim(0, 1.01)
    left.set_ylim(0, 1.01)
    left.set_xlabel("commit confidence (bin mean)")
    left.set_ylabel("share equal to the reference token")
    left.set_title("reliability of the commit confidence")
    left.legend(fontsize="small", loc="upper left")
    right.set_yscale("log")
    right.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45)
    right.set_xlabel("confidence bin")
    right.set_ylabel("commits (answer span)")
    right.set_title("commits per bin")
    right.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return path
