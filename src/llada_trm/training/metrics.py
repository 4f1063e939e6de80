"""Append-only CSV metrics: `training_metrics.csv` and `validation_metrics.csv`.

The known columns are written in the header up front, so a row that lacks a value (an MLP run has no slot
norms) leaves the cell empty. A key that is not yet a column widens the file: its rows are rewritten with the
new header, so the CSV stays rectangular and readable by pandas / `llada-trm plot`.

Crash safety: a row is appended with one `write` of the whole line, then fsynced, so a killed process
leaves either the complete row or none (a `write` to a regular file is not torn by SIGKILL); a power cut can
still leave a partial last line, which has no line terminator, and is dropped when the file is next opened.
Every rewrite (a widened header, `truncate_after` on resume) goes through a temporary file and a rename
(`llada_trm.io.write_bytes_atomic`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llada_trm.io import write_bytes_atomic

__all__ = ["TRAIN_COLUMNS", "VALIDATION_COLUMNS", "Averager", "MetricsWriter", "format_value"]

TRAIN_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "loss",
    "loss_final",
    "loss_deep_supervision",
    "loss_orthogonality",
    "loss_calibration",
    "loss_halting",
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
            if self._torn():
                self._rewrite_text(self._text())  # drop the partial last line a power cut left
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
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.columns).writerow(
            {key: format_value(row.get(key)) for key in self.columns}
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, buffer.getvalue().encode("utf-8"))  # the whole line in one write
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, str]]:
        """All complete rows as strings (empty cells as '')."""
        if not self.path.is_file():
            return []
        return [dict(row) for row in csv.DictReader(io.StringIO(self._text(), newline=""))]

    def _text(self) -> str:
        """The file's complete lines (a partial last line, without its terminator, is left out)."""
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        return text[: text.rfind("\n") + 1]

    def _torn(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (a resumed run re-logs them); returns how many were dropped."""
        rows = self.read()
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept)
        return len(rows) - len(kept)

    def _read_header(self) -> list[str]:
        return next(csv.reader(io.StringIO(self._text(), newline="")), [])

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in self.columns})
        self._rewrite_text(buffer.getvalue())

    def _rewrite_text(self, text: str) -> None:
        write_bytes_atomic(self.path, text.encode("utf-8"))
