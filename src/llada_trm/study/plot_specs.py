"""What `llada-trm plot` draws, decided apart from the drawing (so tests check decisions, not pixels).

A figure is a list of panels, a panel the series of one quantity on one axis. Accuracy is shown as the
difference from the backbone wherever the backbone's column exists; steps and fractions never share an axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["FigureSpec", "Panel", "Series", "pretrain_figures", "run_figures", "series"]

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
