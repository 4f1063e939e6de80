"""Progress that reads well in a terminal and in a log file: a tqdm bar on a terminal; elsewhere, where a
bar is a stream of carriage-return redraws (a `make run` log held 1,855 of them), one plain line every
`every` units (`train: step 20/1855 (1%), loss 1.2345, lr 3.00e-04, 0.52 s/step, ETA 15m53s`), as on a
terminal under `--no-progress`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO, Union

if TYPE_CHECKING:
    from tqdm.std import tqdm

# Weight files at least this large report their loading / writing (an 8B backbone: ~16 GB in 4-6 shards).
LARGE_WEIGHTS_BYTES = 256 * 2**20

_force_plain = False


@contextmanager
def plain_progress(plain: bool = True) -> Iterator[None]:
    """Within the block, progress prints plain lines even on a terminal (the CLI's `--no-progress`)."""
    global _force_plain
    before, _force_plain = _force_plain, plain
    try:
        yield
    finally:
        _force_plain = before


def use_bars() -> bool:
    """True where a redrawn bar is readable: stderr is a terminal and `--no-progress` was not given."""
    return not _force_plain and sys.stderr is not None and sys.stderr.isatty()


def format_duration(seconds: float) -> str:
    """`42s`, `15m53s`, `2h05m`: an ETA a reader takes in at once."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _emit(line: str, stream: TextIO) -> None:
    """One line on `stream`, after whatever stdout holds: in a log of both (`> log 2>&1`) the command's own
    messages (block-buffered in a pipe) stay in order with the progress lines."""
    if stream is not sys.stdout:
        sys.stdout.flush()
    print(line, file=stream, flush=True)


class Progress:
    """A tqdm-like counter (`update`, `set_postfix`, `close`) that prints plain lines.

    A line is printed when the count crosses a multiple of `every`, and once at `close` for a count not yet
    reported; s/unit is measured since the previous line, the ETA from the rate since this session began.
    """

    def __init__(
        self, total: int | None, *, desc: str, unit: str = "it", initial: int = 0, every: int = 1,
        enabled: bool = True, stream: TextIO | None = None
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every, self.enabled = max(1, int(every)), enabled
        self.stream = stream
        self._postfix: dict[str, Any] = {}
        self._start = self._last_time = time.perf_counter()
        self._start_n = self._last_n = initial

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (loss, lr, acc), as the next line prints them."""
        self._postfix = values

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.enabled and (self.n // self.every > before // self.every or self.n == self.total):
            self._line()

    def close(self) -> None:
        if self.enabled and self.n != self._last_n:  # a count not yet reported (a second close: none)
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        parts = [f"{self.unit} {self.n}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        parts += [f"{key} {value}" for key, value in self._postfix.items()]
        done = self.n - self._last_n
        if done > 0:
            per = (now - self._last_time) / done
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 0.01 else f"{1 / per:.0f} {self.unit}/s")
        session = self.n - self._start_n
        if self.total and session > 0 and self.n < self.total:
            eta = (now - self._start) / session * (self.total - self.n)
            parts.append(f"ETA {format_duration(eta)}")
        elif self.total and self.n >= self.total:
            parts.append(f"done in {format_duration(now - self._start)}")
        _emit(f"{self.desc}: " + ", ".join(parts), self.stream or sys.stderr)
        self._last_time, self._last_n = now, self.n


Bar = Union[Progress, "tqdm"]  # what `progress_bar` returns (the same calls)


def progress_bar(
    total: int | None, *, desc: str, unit: str = "it", initial: int = 0, every: int = 1, enabled: bool = True
) -> Bar:
    """A tqdm bar on a terminal, plain lines every `every` units elsewhere (and under `--no-progress`),
    nothing when not `enabled`."""
    if enabled and use_bars():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return Progress(total, desc=desc, unit=unit, initial=initial, every=every, enabled=enabled)


def note(text: str) -> None:
    """A line among the progress output (stderr): above a live bar on a terminal, plain elsewhere."""
    if use_bars():
        from tqdm.auto import tqdm

        tqdm.write(text, file=sys.stderr)
    else:
        _emit(text, sys.stderr)


_SHOWN = (("loss", "val loss", "{:.4f}"), ("loss_base", "backbone", "{:.4f}"),
          ("accuracy", "masked accuracy", "{:.3f}"), ("accuracy_base", "backbone", "{:.3f}"),
          ("sampled_accuracy", "sampled accuracy", "{:.3f}"))  # fmt: skip


def validation_line(
    row: dict[str, Any], total: int | None = None, *, refiner: bool = True, extra: tuple[str, ...] = ()
) -> str:
    """One line of a validation row: `validation at step 100/1855: val loss 1.2345 (backbone 1.3000), ...`.

    Without a refiner (`refiner=False`, a pretraining) the model is the backbone, so no backbone figure is
    shown beside its own; `extra` names more columns to show (a pretraining's sampled targets)."""
    step = f"{row.get('step')}" + (f"/{total}" if total else "")
    parts = []
    shown = [*_SHOWN, *((key, key.replace("_", " "), "{:.3f}") for key in extra)]
    for key, label, fmt in shown:
        value = row.get(key)
        if label == "backbone" and not refiner:
            continue
        if isinstance(value, int | float):
            text = f"{label} {fmt.format(value)}"
            if label == "backbone" and parts:
                parts[-1] += f" ({text})"
            else:
                parts.append(text)
    return f"validation at step {step}: " + (", ".join(parts) or "no metrics")


def weights_progress(shards: int, nbytes: int, desc: str) -> Bar:
    """Progress over the shards of a weight checkpoint being read or written, shown for large ones only
    (an 8B backbone takes minutes; a tiny one would add a line to every command)."""
    shown = nbytes >= LARGE_WEIGHTS_BYTES
    if shown and not use_bars():
        note(f"{desc}: {nbytes / 2**30:.1f} GiB in {shards} file(s)")
    return progress_bar(shards, desc=desc, unit="shard", enabled=shown)
