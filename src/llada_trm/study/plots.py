"""PNG plots of a run (`llada-trm plot RUN_DIR`) and of a comparison. What a run's figures hold is decided
apart from the drawing (`run_figures`, `pretrain_figures`: tests check decisions, not pixels); `draw` renders
them with matplotlib's object API on the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_trm.io import atomic_path

TRAIN_FILE = "training_metrics.csv"
VALIDATION_FILE = "validation_metrics.csv"
PRETRAIN_FILE = "pretrain_metrics.csv"
_COLUMNS = 3  # panels per row


Series = dict[str, tuple[list[float], list[float]]]
_STEP_COLUMNS = ("refine_steps",)
_FRACTION_COLUMNS = ("skipped_fraction", "skipped_fraction_masked", "chunk_confidence")
_PRETRAIN_TRAINING = (
    ("loss", "loss", True),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm", True),
)


@dataclass
class Panel:
    """One axis: `series` over optimizer steps, or (`categories`) one labelled value per name."""

    title: str
    ylabel: str
    series: Series = field(default_factory=dict)
    categories: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # a category's problems: drawn as n and an interval
    log: bool = False  # a log axis when the values span more than a factor of 20
    fractions: bool = False  # y pinned to [0, 1]
    zero_line: bool = False  # differences: a line at 0


@dataclass
class FigureSpec:
    title: str
    panels: list[Panel]


def _settle(panel: Panel) -> Panel:
    """A panel whose every series is one point (a short run, an evaluation at the end) becomes labelled
    values: no lone dots on an empty step axis."""
    if not panel.series or any(len(steps) != 1 for steps, _ in panel.series.values()):
        return panel
    steps = {steps[0] for steps, _ in panel.series.values()}
    where = f" at step {int(next(iter(steps)))}" if len(steps) == 1 else ""
    categories = {label: values[0] for label, (_, values) in panel.series.items()}
    return Panel(panel.title + where, panel.ylabel, categories=categories, fractions=panel.fractions,
                 zero_line=panel.zero_line)  # fmt: skip


def series(
    rows: Sequence[Mapping[str, float]], select: Callable[[str], bool], skip_zero: bool = False
) -> Series:
    """{column: (steps, values)} for every column accepted by `select` that has at least one value
    (`skip_zero`: and is not zero throughout, e.g. a loss term whose weight is off)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key != "step" and key not in columns and select(key))
    out: Series = {}
    for column in columns:
        points = [(row["step"], row[column]) for row in rows if column in row]
        if points and not (skip_zero and all(value == 0 for _, value in points)):
            steps, values = zip(*points, strict=True)
            out[column] = (list(steps), list(values))
    return out


def _differences(rows: Sequence[Mapping[str, float]], prefix: str) -> Series:
    """`prefix` and `prefix_step_k` minus `prefix_base`, in points, at the steps that have both."""
    base = f"{prefix}_base"
    out: Series = {}
    per_step = {k for row in rows for k in row if k.startswith(f"{prefix}_step_")}
    names = [prefix, *sorted(per_step, key=lambda k: int(k.rsplit("_", 1)[1]))]
    for name in names:
        points = [(row["step"], 100 * (row[name] - row[base])) for row in rows if name in row and base in row]
        if points:
            label = "refined" if name == prefix else name[len(prefix) + 1 :].replace("_", " ")
            steps, values = zip(*points, strict=True)
            out[label] = (list(steps), list(values))
    return out


def _accuracy_panels(
    val: Sequence[Mapping[str, float]], sampled: Mapping[str, float], sizes: Mapping[str, int]
) -> list[Panel]:
    panels = []
    for prefix, what in (("accuracy", "masked-token accuracy"), ("chunk_accuracy", "chunk accuracy")):
        if any(f"{prefix}_base" in row for row in val):
            panels.append(
                Panel(f"validation {what} − backbone", "points", _differences(val, prefix), zero_line=True)
            )
        else:
            own = series(val, lambda k, p=prefix: k == p or k.startswith(f"{p}_step_"))
            panels.append(Panel(f"validation {what}", "accuracy", own, fractions=True))
    counts = {name: n for name, n in sizes.items() if name in sampled}
    title = "sampled accuracy (strict), 95% Wilson intervals"
    panels.append(Panel(title, "accuracy", categories=dict(sampled), counts=counts, fractions=True))
    return [panel for panel in panels if panel.series or panel.categories]


def _refinement_panels(
    train: Sequence[Mapping[str, float]], val: Sequence[Mapping[str, float]]
) -> list[Panel]:
    steps: Series = {}
    fractions: Series = {}
    for source, rows in (("training", train), ("validation", val)):
        for name, points in series(rows, lambda k: k in _STEP_COLUMNS).items():
            steps[f"{name} ({source})"] = points
        for name, points in series(rows, lambda k: k in _FRACTION_COLUMNS).items():
            fractions[f"{name} ({source})"] = points
    panels = [
        Panel("steps per refined chunk", "recursive steps", steps),
        Panel("fractions of chunks / confidence", "fraction", fractions, fractions=True),
    ]
    return [panel for panel in panels if panel.series]


def run_figures(
    train: Sequence[Mapping[str, float]],
    val: Sequence[Mapping[str, float]],
    sampled: Mapping[str, float],
    refiner: str | None,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, FigureSpec]:
    """The figures of a training run, by file name; a figure with no data is left out. `sampled`: each
    evaluation's strict accuracy by name, `sizes` its number of problems; `refiner`: the run's (`mlp` has no
    orthogonality penalty)."""

    def prefixed(prefix: str) -> Callable[[str], bool]:
        return lambda key: key.startswith(prefix)

    loss = [
        Panel("training", "loss", series(train, prefixed("loss"), True), log=True),
        Panel("validation", "loss", series(val, prefixed("loss"), True), log=True),
    ]
    figures = {
        "loss.png": loss,
        "slot_norms.png": [Panel("slot norms", "norm", series(train, prefixed("slot_norm")))],
        "gates.png": [Panel("gate openings", "sigmoid(gate)", series(train, prefixed("gate")))],
        "refinement.png": _refinement_panels(train, val),
        "accuracy.png": _accuracy_panels(val, sampled, sizes or {}),
    }
    if refiner != "mlp":
        orthogonality = series(train, prefixed("orthogonality"), skip_zero=True)
        figures["orthogonality.png"] = [Panel("slot orthogonality", "penalty", orthogonality)]
    out = {}
    for filename, panels in figures.items():
        kept = [_settle(panel) for panel in panels if panel.series or panel.categories]
        if kept:
            out[filename] = FigureSpec(filename[:-4].replace("_", " "), kept)
    return out


def pretrain_figures(rows: Sequence[Mapping[str, float]]) -> dict[str, FigureSpec]:
    """A pretraining run's figures: the training columns, and every numeric eval column on its own axis."""
    training = [
        Panel(title, title, series(rows, lambda k, c=column: k == c), log=log)
        for column, title, log in _PRETRAIN_TRAINING
    ]
    evals = sorted({key for row in rows for key in row if key.startswith("eval_")})
    evaluation = [
        Panel(column[len("eval_") :].replace("_", " "), "value", series(rows, lambda k, c=column: k == c))
        for column in evals
    ]
    out = {}
    for filename, title, panels in (
        ("pretrain.png", "pretraining", training),
        ("pretrain_eval.png", "pretraining evaluations", evaluation),
    ):
        kept = [_settle(panel) for panel in panels if panel.series]
        if kept:
            out[filename] = FigureSpec(title, kept)
    return out



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


# Series on one axis differ in colour, line style and marker, and each is drawn thinner than the one before:
# two identical series show as a thick line with a thinner dashed one on it, never as one line.
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _draw_series(ax: Any, panel: Panel) -> None:
    for index, (label, (steps, values)) in enumerate(panel.series.items()):
        marker = _MARKERS[index % len(_MARKERS)]
        if len(steps) == 1:  # one point: a labelled marker, not a lone dot on an empty axis
            (line,) = ax.plot(steps, values, marker, label=label, markersize=7 - min(index, 3))
            ax.annotate(f"{values[0]:.3g}", (steps[0], values[0]), textcoords="offset points", xytext=(6, 4),
                        fontsize=8, color=line.get_color())  # fmt: skip
        else:
            ax.plot(steps, values, label=label, linestyle=_STYLES[index % len(_STYLES)],
                    linewidth=max(0.9, 2.6 - 0.5 * index), marker=marker if len(steps) <= 20 else None,
                    markersize=max(2.5, 5 - index),
                    markerfacecolor="none" if index % 2 else None)  # fmt: skip
    ax.set_xlabel("optimizer step")


def _interval(value: float, n: int | None) -> tuple[float, float] | None:
    """The 95% Wilson interval of an accuracy measured on n problems (None without n)."""
    if not n:
        return None
    from llada_trm.evaluate.statistics import wilson_interval

    return wilson_interval(round(value * n), n)


def _draw_categories(ax: Any, panel: Panel) -> None:
    """One row per name (labels never overlap, however many): its value, and for an accuracy measured on n
    problems its 95% interval and n, so a 4-problem point is not read like a 64-problem one."""
    names = list(panel.categories)
    for row, name in enumerate(names):
        value = panel.categories[name]
        n = panel.counts.get(name)
        interval = _interval(value, n) if panel.fractions else None
        if interval is not None:
            ax.errorbar([value], [row], xerr=[[value - interval[0]], [interval[1] - value]], fmt="o",
                        color="tab:blue", capsize=3, markersize=6)  # fmt: skip
            text = f"{value:.3g} [{interval[0]:.2f}, {interval[1]:.2f}]  n={n}"
        else:
            ax.plot([value], [row], "o", color="tab:blue", markersize=6)
            text = f"{value:.3g}" + (f"  n={n}" if n else "")
        ax.annotate(text, (1.01, row), xycoords=("axes fraction", "data"), va="center", fontsize=8,
                    annotation_clip=False)  # fmt: skip
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first name on top
    ax.grid(axis="x", alpha=0.3)


def _draw_panel(ax: Any, panel: Panel) -> None:
    """Series over steps (values on y), or labelled rows (values on x, one row per name)."""
    if panel.categories:
        _draw_categories(ax, panel)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        if panel.fractions:
            ax.set_xlim(-0.02, 1.02)
        if panel.zero_line:
            ax.axvline(0.0, color="tab:gray", linewidth=1)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.ylabel)
        return
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


def draw(spec: FigureSpec, run_name: str = "") -> Any:
    """The matplotlib Figure of `spec` (panels in rows of three), not yet saved."""
    n = len(spec.panels)
    ncols, nrows = min(n, _COLUMNS), -(-n // _COLUMNS)
    rows = any(panel.categories for panel in spec.panels)  # labelled rows: room for names and annotations
    width = (8.4 if rows else 6.4) * ncols
    figure = _figure(width, 4.2 * nrows)
    axes = figure.subplots(nrows, ncols, squeeze=False).flatten()
    # fixed margins: a layout engine doubles the drawing time, which adds up over a run's plots
    left, right = (1.9 / width, 1 - 1.8 / width) if rows else (0.13 / ncols, 1 - 0.03 / ncols)
    figure.subplots_adjust(left=left, right=right, top=1 - 0.14 / nrows, bottom=0.12 / nrows,
                           wspace=1.0 if rows else 0.25, hspace=0.45)  # fmt: skip
    for ax, panel in zip(axes, spec.panels, strict=False):
        _draw_panel(ax, panel)
    for ax in axes[n:]:
        ax.set_axis_off()
    figure.suptitle(f"{run_name}: {spec.title}" if run_name else spec.title)
    return figure


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | Path) -> Path:
    """PNG via a temporary sibling and a rename: a killed run never leaves a truncated image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return path


def _eval_points(run_dir: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Sampled strict accuracy of each evaluation under `run_dir/eval/`, and its number of problems, by the
    evaluation's name."""
    points: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for summary in sorted(run_dir.glob("eval/*/summary.json")):
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        value, n = data.get("accuracy_strict"), data.get("n")
        if isinstance(value, int | float) and math.isfinite(value):
            points[summary.parent.name] = float(value)
            if isinstance(n, int) and n > 0:
                sizes[summary.parent.name] = n
    return points, sizes


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
        points, sizes = _eval_points(run)
        specs.update(run_figures(train, val, points, _run_refiner(run), sizes))
    return specs


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs into `out_dir` (default `RUN_DIR/plots`); returns their paths."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    return [save_figure(draw(spec, run.name), out / name) for name, spec in run_specs(run).items()]


def _seed_rows(
    ax: Any, names: Sequence[str], seeds: Sequence[Any], point: Any, scale: float = 1.0,
    labels: Sequence[str] | None = None,
) -> list[list[tuple[float, float, float, int]]]:
    """One row per name, one marker per seed inside it (each seed its own marker, colour and small vertical
    offset, so equal values stay visible side by side), with its interval as a horizontal bar. `point(seed,
    name)` gives (value, low, high, n) or None. Returns the points drawn, by row."""
    spread = min(0.6 / max(len(seeds), 1), 0.2)
    drawn: list[list[tuple[float, float, float, int]]] = [[] for _ in names]
    for i, seed in enumerate(seeds):
        offset = (i - (len(seeds) - 1) / 2) * spread
        xs, ys, lows, highs = [], [], [], []
        for row, name in enumerate(names):
            found = point(seed, name)
            if found is None:
                continue
            value, low, high, n = (scale * found[0], scale * found[1], scale * found[2], found[3])
            drawn[row].append((value, low, high, n))
            xs.append(value)
            ys.append(row + offset)
            lows.append(value - low)
            highs.append(high - value)
        if xs:
            label = f"seed {seed}" if len(seeds) > 1 else "result"
            ax.errorbar(xs, ys, xerr=[lows, highs], fmt=_MARKERS[i % len(_MARKERS)], capsize=2.5,
                        markersize=5, elinewidth=1.2, label=label)  # fmt: skip
    ax.set_yticks(range(len(names)), labels or names, fontsize=9)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the first name on top
    ax.grid(axis="x", alpha=0.3)
    return drawn


# the mean over seeds: an open diamond, so the seed marker under it stays visible
_MEAN_STYLE = {"markersize": 9, "markerfacecolor": "none", "markeredgecolor": "black", "markeredgewidth": 1.6}


def _row_notes(ax: Any, drawn: list[list[tuple[float, float, float, int]]], fmt: str, mean: bool) -> None:
    """At the right of each row: its value and interval (one seed), or the mean over seeds and their range;
    and n, the problems behind each point; the column's header says which."""
    several = any(len(points) > 1 for points in drawn)
    header = "mean (seed range), n x seeds" if several else "value [95% interval], n"
    ax.annotate(header, (1.01, -0.5), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                style="italic", color="dimgray", annotation_clip=False)  # fmt: skip
    for row, points in enumerate(drawn):
        if not points:
            continue
        values = [p[0] for p in points]
        sizes = sorted({p[3] for p in points})
        n = "/".join(map(str, sizes))
        if len(points) == 1:
            value, low, high, _ = points[0]
            text = f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]  n={n}"
        else:
            low, high = fmt.format(min(values)), fmt.format(max(values))
            text = f"{fmt.format(sum(values) / len(values))} ({low} to {high})  n={n} x{len(points)}"
        if mean and len(points) > 1:
            ax.plot([sum(values) / len(values)], [row], "D", zorder=5, **_MEAN_STYLE)
        ax.annotate(text, (1.01, row), xycoords=("axes fraction", "data"), va="center", fontsize=8,
                    annotation_clip=False)  # fmt: skip


def plot_paired_comparison(report: Mapping[str, Any], path: str | Path) -> Path:
    """comparison.png of a `compare` report (`paired_comparison_figure`)."""
    return save_figure(paired_comparison_figure(report), path)


def paired_comparison_figure(report: Mapping[str, Any]) -> Any:
    """The figure of a `compare` report, one row per arm so it reads the same at 3 arms and at 12: left,
    strict accuracy per model with 95% Wilson intervals; right, each paired difference (refiner vs none, arm
    vs slot) with its 95% bootstrap interval. One marker per seed (shape and colour per seed, offset within
    the row), the mean over seeds as an open black diamond, and at each row's end its figures and n."""
    per_seed = report["per_seed"]
    seeds = list(per_seed)
    kinds = list(dict.fromkeys(kind for seed in seeds for kind in per_seed[seed]["accuracy"]))
    pairs = list(dict.fromkeys(name for seed in seeds for name in per_seed[seed]["paired"]))
    rows = max(len(kinds), len(pairs), 3)
    width, height = 16.5, 1.7 + rows * max(0.4, 0.14 * (len(seeds) + 1))  # room for each seed's marker
    figure = _figure(width, height)
    bottom, top = 0.7 / height, 1 - 0.75 / height

    def accuracy(seed: Any, kind: str) -> tuple[float, float, float, int] | None:
        rate = per_seed[seed]["accuracy"].get(kind, {}).get("strict")
        return None if rate is None else (rate["p"], rate["low"], rate["high"], rate.get("n", 0))

    def difference(seed: Any, name: str) -> tuple[float, float, float, int] | None:
        stats = per_seed[seed]["paired"].get(name)
        if stats is None:
            return None
        return stats["diff"], stats["ci_low"], stats["ci_high"], stats.get("n", 0)

    left = figure.add_axes((2.0 / width, bottom, 4.0 / width, top - bottom))
    drawn = _seed_rows(left, kinds, seeds, accuracy)
    _row_notes(left, drawn, "{:.3f}", mean=True)
    left.set_xlabel("strict accuracy (95% Wilson interval)")
    problems = report.get("problems", "?")
    left.set_title(f"test accuracy, {problems} problems" + (f", {len(seeds)} training seeds" if len(seeds) > 1
                                                             else ""), fontsize=10)  # fmt: skip
    if pairs:
        right = figure.add_axes((10.4 / width, bottom, 3.5 / width, top - bottom))
        labels = [name.replace("_vs_", " vs ").replace("_", " ") for name in pairs]
        drawn = _seed_rows(right, pairs, seeds, difference, scale=100.0, labels=labels)
        _row_notes(right, drawn, "{:+.1f}", mean=True)
        right.axvline(0.0, color="tab:gray", linewidth=1)
        right.set_xlabel("accuracy difference, points (95% paired bootstrap interval)")
        right.set_title("paired differences (> 0: the first is better)", fontsize=10)
    handles, labels = left.get_legend_handles_labels()
    if len(seeds) > 1:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="D", linestyle="none", **_MEAN_STYLE))
        labels.append("mean over seeds")
    if len(handles) > 1:
        figure.legend(handles, labels, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
                      bbox_to_anchor=(0.5, 1 - 0.08 / height))  # fmt: skip
    return figure


def plot_reliability(reports: Mapping[str, Mapping[str, Any] | None], path: str | Path) -> Path | None:
    """reliability.png of the confident-error diagnostics (`evaluate.diagnostics`): per confidence bin, the
    share of commits equal to the reference token against the bin's mean confidence (one line per model,
    each point labelled with its count; the diagonal is perfect calibration), and the commits per bin.
    None (nothing written) when no model recorded confidences."""
    curves = {name: r["reliability"] for name, r in reports.items() if r and r.get("reliability")}
    if not curves:
        return None
    figure = _figure(11, 4.5)
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
    return save_figure(figure, path)
