"""Append-only CSV metrics: `training_metrics.csv` and `validation_metrics.csv`.

The known columns are written in the header up front, so a row that lacks a value (an MLP run has no slot
norms) leaves the cell empty. A key that is not yet a column widens the file: its rows are rewritten with the
new header, so the CSV stays rectangular and readable by pandas / `llada-trm plot`.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TRAIN_COLUMNS", "VALIDATION_COLUMNS", "Averager", "MetricsWriter", "format_value"]

TRAIN_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "loss",
    "loss_final",
    "loss_deep_supervision",
    "loss_orthogonality",
    "loss_calibration",
    "lr",
    "lr_backbone",
    "grad_norm",
    "refine_steps",
    "skipped_fraction",
    "skipped_fraction_masked",
    "chunk_confidence",
    "confidence",
    "delta_norm",
    "delta_norm_first",
    "delta_norm_last",
    "orthogonality",
    "tokens_per_s",
)

VALIDATION_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "loss",
    "loss_base",
    "accuracy",
    "accuracy_base",
    "refine_steps",
    "skipped_fraction",
    "skipped_fraction_masked",
)


class Averager:
    """Running means of named floats (NaN-free entries only), for one logging window."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}


def format_value(value: Any) -> str:
    """Floats with enough digits to compare runs; None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


class MetricsWriter:
    """One CSV file of rows keyed by column name; rows are appended and flushed as they come."""

    def __init__(self, path: str | Path, columns: Sequence[str] = ()):
        self.path = Path(path)
        self.columns: list[str] = list(columns)
        if self.path.is_file() and self.path.stat().st_size > 0:
            existing = self._read_header()
            self.columns = existing + [c for c in self.columns if c not in existing]
            if len(self.columns) != len(existing):
                self._rewrite(self.read())
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([])

    def log(self, row: Mapping[str, Any]) -> None:
        new = [key for key in row if key not in self.columns]
        if new:
            rows = self.read()
            self.columns.extend(new)
            self._rewrite(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writerow({key: format_value(row.get(key)) for key in self.columns})

    def read(self) -> list[dict[str, str]]:
        """All rows as strings (empty cells as '')."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as handle:
            return [dict(row) for row in csv.DictReader(handle)]

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (a resumed run re-logs them); returns how many were dropped."""
        rows = self.read()
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept)
        return len(rows) - len(kept)

    def _read_header(self) -> list[str]:
        with open(self.path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), [])

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({key: row.get(key, "") for key in self.columns})
        tmp.replace(self.path)
