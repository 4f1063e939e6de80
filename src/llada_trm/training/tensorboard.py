"""TensorBoard event files beside the metrics CSVs (`output.tensorboard: true`; the CSVs stay the record).

Every numeric value of a row the trainer logs goes in as a scalar tagged `<series>/<column>`: `train/loss`,
`train/slot_norm_ctx`, `train/gate_ctx` (the slot refiner's statistics are columns of the training rows),
`validation/accuracy`, ... at the row's optimizer step, so the tags are the CSV columns and the curves are
the CSVs' (`llada-trm plot`'s series). Only rank 0 writes, into `<output.dir>/tensorboard/`. A resumed run
opens its writer with `purge_step` = the resumed step + 1: TensorBoard then drops the events the interrupted
run wrote after its checkpoint, as `MetricsWriter.truncate_after` drops those CSV rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llada_trm.errors import ConfigError

__all__ = ["TENSORBOARD_DIR", "TENSORBOARD_INSTALL", "TensorBoardLog", "require_tensorboard"]

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_INSTALL = "pip install 'llada-trm[tensorboard]'"


def require_tensorboard() -> Any:
    """torch's `SummaryWriter`, or a one-line ConfigError naming the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"output.tensorboard: the tensorboard package is not installed; {TENSORBOARD_INSTALL}"
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
            self.writer = writer(log_dir=str(Path(output_dir) / TENSORBOARD_DIR), purge_step=purge)

    @classmethod
    def for_run(cls, enabled: bool, output_dir: Path, resumed_step: int) -> TensorBoardLog:
        """On when `output.tensorboard` (call it on rank 0 only)."""
        return cls(output_dir if enabled else None, resumed_step=resumed_step)

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
