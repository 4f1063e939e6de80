"""Redraw a comparison's plot from its markdown report, when its comparison.json is gone.

`docs/results/` ships each study's `comparison.md` (and its PNG), not the JSON the PNG was drawn from; after
a change to the plot, this redraws the PNG from the markdown's own tables without re-running the study:
per seed, each model's strict accuracy and 95% Wilson interval, and each paired difference with its 95%
bootstrap interval (figures as the markdown rounds them: 3 decimals, 0.1 point).

    python scripts/replot_comparison.py docs/results/levers_tiny.md docs/results/levers_tiny.png
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

_PROBLEMS = re.compile(r"^(\d+) test \w+ problems")
_INTERVAL = re.compile(r"\[([-+]?[\d.]+), ([-+]?[\d.]+)\]")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _tables(text: str) -> list[list[list[str]]]:
    """Every markdown table: its rows of cells, header first, the separator row left out."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = _cells(line)
            if not all(set(cell) <= set("-: ") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _interval(text: str) -> tuple[float, float]:
    found = _INTERVAL.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not an interval: {text!r}")
    return float(found.group(1)), float(found.group(2))


def _find(tables: list[list[list[str]]], *columns: str) -> list[list[str]]:
    for table in tables:
        if all(column in table[0] for column in columns):
            return table
    raise ValueError(f"no table with the columns {', '.join(columns)}; is this a `compare` report?")


def report_from_markdown(text: str) -> dict[str, Any]:
    """The parts of a comparison.json that `plots.plot_paired_comparison` reads, from its comparison.md."""
    problems = next((int(m.group(1)) for line in text.splitlines() if (m := _PROBLEMS.match(line))), None)
    if problems is None:
        raise ValueError("no '<N> test ... problems' line: is this a `compare` report?")
    tables = _tables(text)
    results = _find(tables, "refiner", "seed", "acc strict", "95% CI")
    head = results[0]
    rows = [dict(zip(head, row, strict=True)) for row in results[1:]]
    seeds = sorted({row["seed"] for row in rows if row["seed"] != "-"}, key=int) or ["0"]
    per_seed: dict[str, dict[str, Any]] = {seed: {"accuracy": {}, "paired": {}} for seed in seeds}
    for row in rows:
        low, high = _interval(row["95% CI"])
        rate = {"p": float(row["acc strict"]), "low": low, "high": high, "n": problems}
        for seed in seeds if row["seed"] == "-" else [row["seed"]]:  # the backbone alone: every seed's
            per_seed[seed]["accuracy"][row["refiner"]] = {"strict": rate}
    paired = _find(tables, "seed", "comparison", "diff (points)")
    head = paired[0]
    for cells in paired[1:]:
        row = dict(zip(head, cells, strict=False))
        low, high = _interval(row["95% CI (bootstrap)"])
        name = row["comparison"].replace(" vs ", "_vs_").replace(" ", "_")
        per_seed[row["seed"]]["paired"][name] = {
            "diff": float(row["diff (points)"]) / 100, "ci_low": low / 100, "ci_high": high / 100,
            "n": problems,
        }
    return {"problems": problems, "per_seed": per_seed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("markdown", type=Path, help="a compare report (comparison.md)")
    parser.add_argument("png", type=Path, help="the plot to write")
    args = parser.parse_args(argv)
    from llada_trm.study.plots import plot_paired_comparison

    try:
        report = report_from_markdown(args.markdown.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"replot_comparison: error: {args.markdown}: {exc}", file=sys.stderr)
        return 2
    print(plot_paired_comparison(report, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
