"""`pretrain_metrics.csv`: one header row, one row per logged step, numeric cells; a cell is empty where the
step was not evaluated (or nothing was counted, e.g. no division line was reached)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llada_trm.io import write_text_atomic

from .targets import TARGET_COLUMNS

__all__ = ["COLUMNS", "METRICS_FILE", "write_metrics"]

METRICS_FILE = "pretrain_metrics.csv"
COLUMNS = ("step", "loss", "lr", "grad_norm", "eval_masked_accuracy",
           *(f"eval_{name}" for name in TARGET_COLUMNS), "elapsed_s")  # fmt: skip
_FORMATS = {"step": "{:d}", "loss": "{:.5f}", "lr": "{:.3e}", "grad_norm": "{:.4f}", "elapsed_s": "{:.1f}"}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    return _FORMATS.get(column, "{:.4f}").format(value)


def write_metrics(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write every row so far (atomically: a plot reading the file mid-run sees a complete one)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(column, row.get(column)) for column in COLUMNS])
    return write_text_atomic(path, buffer.getvalue())
