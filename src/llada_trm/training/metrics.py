"""What a run logs: the refiner's statistics, the metrics CSVs and TensorBoard (docs/training.md).

Nothing here runs during a training step (`loop.LogWindow` reduces the statistics at the logging step); the
column names are the ones the health checks read. A CSV row is appended in one fsynced `write` (a kill leaves
the whole row or none); every rewrite is atomic.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llada_trm.errors import ConfigError
from llada_trm.io import write_bytes_atomic
from llada_trm.model.hybrid import chunk_sum

TRAIN_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "loss",
    "loss_final",
    "loss_deep_supervision",
    "loss_orthogonality",
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
    """One CSV file of rows keyed by column name; rows are appended and flushed as they come.

    An existing file is continued: a torn last line (a power cut's) and the rows after `keep_until` (a
    resumed run logs them again) are dropped, and the header gains the `columns` it lacks.
    """

    def __init__(self, path: str | Path, columns: Sequence[str] = (), *, keep_until: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.is_file() else b""
        complete = data[: data.rfind(b"\n") + 1]
        text = complete.decode("utf-8", errors="replace")
        existing = next(csv.reader(io.StringIO(text, newline="")), [])
        self.columns = existing + [c for c in columns if c not in existing]
        rows = [dict(row) for row in csv.DictReader(io.StringIO(text, newline=""))]
        last = float("inf") if keep_until is None else keep_until
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) <= last]
        if not data or complete != data or kept != rows or self.columns != existing:
            self._rewrite(kept)

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
        """All rows as strings (empty cells as '')."""
        return [dict(row) for row in csv.DictReader(io.StringIO(self.path.read_text("utf-8"), newline=""))]

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in self.columns})
        write_bytes_atomic(self.path, buffer.getvalue().encode("utf-8"))


# ------------------------------------------------------------------------- refiner statistics

def mean_of(value: Any) -> float | None:
    """A float summary of a stat: scalars as they are, tensors and lists by their (finite) mean."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.detach().float().mean().item())
    if isinstance(value, list | tuple):
        numbers = [v for v in (mean_of(x) for x in value) if v is not None and math.isfinite(v)]
        return sum(numbers) / len(numbers) if numbers else None
    return None


def forward_statistics(
    stats: Mapping[str, Any], masked: torch.Tensor | None = None, chunk_size: int | None = None
) -> dict[str, float]:
    """Flatten `HybridOutput.stats` into loggable floats.

    Per-step lists (`delta_norms`) become their mean plus the first and last steps' values; dicts of slot
    norms and gates become one column per entry. Given the batch's `masked` positions and the chunk size,
    two columns look only at chunks that hold a masked position (prompt chunks never do, so they would
    dilute the picture): `skipped_fraction_masked` (such chunks left unrefined) and `chunk_confidence` (the
    backbone's mean confidence on them).
    """
    row: dict[str, float] = {}
    for key in ("refine_steps", "skipped_fraction", "chunks_total", "chunks_refined", "confidence"):
        value = mean_of(stats.get(key))
        if value is not None:
            row[key] = value
    if masked is not None and chunk_size is not None:
        candidates = chunk_sum(masked.float(), chunk_size) > 0
        n = int(candidates.sum())
        refined = mean_of(stats.get("chunks_refined"))
        if n and refined is not None:
            row["skipped_fraction_masked"] = 1.0 - refined / n
        confidence = stats.get("chunk_confidence")
        if n and isinstance(confidence, torch.Tensor) and confidence.shape == candidates.shape:
            row["chunk_confidence"] = float(confidence[candidates].float().mean())
    deltas = stats.get("delta_norms")
    if isinstance(deltas, list | tuple) and deltas:
        row["delta_norm"] = mean_of(deltas)
        row["delta_norm_first"] = mean_of(deltas[0])
        row["delta_norm_last"] = mean_of(deltas[-1])
    for prefix, key in (("slot_norm", "slot_norms"), ("gate", "gates")):
        for name, value in (stats.get(key) or {}).items():
            row[f"{prefix}_{name}"] = mean_of(value)
    return {k: v for k, v in row.items() if v is not None}


@torch.no_grad()
def parameter_statistics(model: nn.Module) -> dict[str, float]:
    """Gates, projection norms and orthogonality of each refiner under `model.refinement_head`.

    With one refiner the columns are plain (`gate_ctx`); with two (hybrid / cascade) the refiner's key goes
    after the column's kind (`gate_slot_ctx`, `orthogonality_slot`) so the two never overwrite each other
    and the health checks still find every gate.
    """
    heads = getattr(model, "refinement_head", None)
    if heads is None:
        return {}
    refiners = dict(heads.items()) if isinstance(heads, nn.ModuleDict) else {"": heads}
    row: dict[str, float] = {}
    for key, refiner in refiners.items():
        own = getattr(refiner, "slot_statistics", None)  # the slot refiner's; any refiner's gates otherwise
        stats = dict(own()) if callable(own) else {f"gate_{k}": v for k, v in refiner.gate_values().items()}
        if "orthogonality" not in stats:
            stats["orthogonality"] = float(refiner.orthogonality_loss().detach().float().item())
        for name, value in stats.items():
            number = mean_of(value)
            if number is not None:
                row[_qualify(name, key) if len(refiners) > 1 else name] = number
    return row


def _qualify(column: str, refiner: str) -> str:
    kind, sep, rest = column.partition("_")
    return f"{kind}_{refiner}_{rest}" if sep else f"{column}_{refiner}"


# ------------------------------------------------------------------------------- TensorBoard

def require_tensorboard() -> Any:
    """torch's `SummaryWriter`, or a one-line ConfigError naming the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard: the tensorboard package is not installed; pip install 'llada-trm[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """The run's event-file writer; `log(series, row)` after each CSV row. Without a directory it is off
    (every call does nothing), so the trainer calls it unconditionally."""

    def __init__(self, output_dir: str | Path | None = None, *, resumed_step: int = 0) -> None:
        self.writer: Any = None
        if output_dir is not None:
            writer = require_tensorboard()
            purge = resumed_step + 1 if resumed_step > 0 else None
            self.writer = writer(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=purge)

    def log(self, series: str, row: Mapping[str, Any]) -> None:
        """Each finite number of `row` (but its `step`) as `series/column` at `row["step"]`."""
        if self.writer is None:
            return
        step = int(row["step"])
        for column, value in row.items():
            if column == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{series}/{column}", float(value), global_step=step)
        self.writer.flush()  # as durable as the CSV row: a crash loses no logged point

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
