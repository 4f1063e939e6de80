"""GSM8K records and their loaders: JSONL, parquet, a directory of splits, or a local Hugging Face dataset.

Every loader returns plain ``GSM8KRecord`` objects so the rest of the package never depends on where the data
came from. Split strings follow the Hugging Face slicing syntax (``train[:1000]``, ``test[-200:]``,
``train[:10%]``) and are resolved here rather than by ``datasets`` so every source slices the same way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llada_trm.text import decode_utf8

HF_GSM8K_NAMES = ("openai/gsm8k", "gsm8k")
_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_FINAL_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
logger = logging.getLogger("llada_trm")


class DataError(ValueError):
    """A data source that cannot be read as GSM8K records; the message names the file (and line) at fault."""


def extract_final_answer(text: str) -> str | None:
    """The number after the last ``####`` with thousands separators removed, or None when there is none."""
    marker = text.rfind("####")
    if marker < 0:
        return None
    match = _FINAL_ANSWER.match(text[marker:])
    if match is None:
        return None
    value = match.group(1).splitlines()[0].strip().replace(",", "")
    return value or None


@dataclass(frozen=True)
class GSM8KRecord:
    """One word problem: the question and the worked answer ending in ``#### n``."""

    question: str
    answer: str
    # Where the record was read (`file:line`, `file: row n`), for messages; not part of its value.
    origin: str | None = field(default=None, compare=False, repr=False)

    @property
    def final_answer(self) -> str | None:
        """The ``#### n`` value, normalised (commas removed); None when the answer has no ``####`` line."""
        return extract_final_answer(self.answer)

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


# ----------------------------------------------------------------------------------------------------
# split specs
# ----------------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[(.*)\])?\s*$")
_BOUND = re.compile(r"^\s*(-?\d+)\s*(%?)\s*$")


def _parse_bound(text: str, spec: str) -> int | float | None:
    if not text.strip():
        return None
    match = _BOUND.match(text)
    if match is None:
        raise DataError(
            f"bad split {spec!r}: bound {text.strip()!r} is not an integer or a percentage "
            "(use e.g. 'train[:1000]', 'test[-200:]' or 'train[:10%]')"
        )
    value = int(match.group(1))
    if match.group(2):
        if not -100 <= value <= 100:
            raise DataError(f"bad split {spec!r}: percentage {value}% is outside -100%..100%")
        return value / 100.0
    return value


def parse_split(spec: str) -> tuple[str, slice]:
    """Parse ``name`` or ``name[start:stop]`` into ``(name, slice)``.

    Integer bounds are record indices (negative counts from the end, as in Python); percentage bounds
    (``10%``) come back as floats in [-1, 1] and are resolved against the split's size by ``apply_split``.
    """
    if not isinstance(spec, str):
        raise DataError(f"bad split {spec!r}: expected a string like 'train' or 'test[:200]'")
    match = _SPLIT.match(spec)
    if match is None:
        raise DataError(f"bad split {spec!r}: expected 'name' or 'name[start:stop]', e.g. 'train[:1000]'")
    name, inner = match.group(1), match.group(2)
    if inner is None:
        return name, slice(None, None)
    parts = inner.split(":")
    if len(parts) != 2:
        raise DataError(
            f"bad split {spec!r}: expected exactly one ':' inside the brackets (steps are not supported), "
            "e.g. 'train[10:20]'"
        )
    return name, slice(_parse_bound(parts[0], spec), _parse_bound(parts[1], spec))


def _resolve_bound(bound: int | float | None, n: int) -> int | None:
    if bound is None or isinstance(bound, int):
        return bound
    # Percentages round to the closest record boundary, as Hugging Face's default ReadInstruction does.
    return int(round(bound * n))


def apply_split(records: Sequence[GSM8KRecord], split: str | slice) -> list[GSM8KRecord]:
    """Select the records named by a split spec (its name is ignored) or a slice from ``parse_split``."""
    selection = parse_split(split)[1] if isinstance(split, str) else split
    n = len(records)
    start, stop = _resolve_bound(selection.start, n), _resolve_bound(selection.stop, n)
    return list(records[start:stop])


# ----------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------


def _record_from_row(row: object, where: str) -> GSM8KRecord:
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise DataError(f"{where}: expected a JSON object with 'question' and 'answer', got {kind}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: key {key!r} must be a string, got {type(row[key]).__name__}")
    return GSM8KRecord(question=row["question"], answer=row["answer"], origin=where)


def read_jsonl(path: str | os.PathLike[str]) -> list[GSM8KRecord]:
    """Read one record per line; blank lines are skipped, anything else malformed (invalid JSON, non-UTF-8
    bytes, a missing key) names its file:line."""
    path = Path(path)
    records = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = decode_utf8(raw, path, DataError, first_line=lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            records.append(_record_from_row(row, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: no records (the file is empty); expected one JSON object per line")
    return records


def read_parquet(path: str | os.PathLike[str]) -> list[GSM8KRecord]:
    """Read the 'question' and 'answer' columns of a parquet file (needs the optional ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow (pip install 'llada-trm[parquet]'), or pass a JSONL file"
        ) from None
    path = Path(path)
    try:
        schema_names = pq.read_schema(path).names
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    for key in ("question", "answer"):
        if key not in schema_names:
            raise DataError(f"{path}: missing column {key!r} (columns: {', '.join(schema_names)})")
    table = pq.read_table(path, columns=["question", "answer"])
    records = [
        _record_from_row(row, f"{path}: row {index}") for index, row in enumerate(table.to_pylist())
    ]
    if not records:
        raise DataError(f"{path}: no records (the table is empty)")
    return records


def write_jsonl(records: Iterable[GSM8KRecord], path: str | os.PathLike[str]) -> Path:
    """Write records atomically in GSM8K's JSONL layout (one ``{"question", "answer"}`` object per line)."""
    from llada_trm.io import write_jsonl as write_rows  # imports torch, which reading records does not need

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_rows(path, [record.to_dict() for record in records])


def _read_file(path: Path) -> list[GSM8KRecord]:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return read_jsonl(path)
    if suffix in _PARQUET_SUFFIXES:
        return read_parquet(path)
    raise DataError(f"{path}: unknown file type {suffix!r}; expected .jsonl or .parquet")


def _split_files(directory: Path, name: str) -> list[Path]:
    """Files of split ``name`` in a directory: ``name.jsonl``, ``name.parquet`` or HF's parquet shards."""
    for folder in (directory, directory / "main"):
        for suffix in (*_JSONL_SUFFIXES, *_PARQUET_SUFFIXES):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return [candidate]
        shards = sorted(folder.glob(f"{name}-*.parquet"))
        if shards:
            return shards
    return []


@contextmanager
def _offline_datasets() -> Iterator[object]:
    """Import ``datasets`` with every download path switched off, restoring the caller's settings after."""
    flags = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {flag: os.environ.get(flag) for flag in flags}
    os.environ.update({flag: "1" for flag in flags})
    try:
        import datasets

        config = datasets.config
        saved_config = {flag: getattr(config, flag) for flag in flags if hasattr(config, flag)}
        for flag in saved_config:
            setattr(config, flag, True)
        try:
            yield datasets
        finally:
            for flag, value in saved_config.items():
                setattr(config, flag, value)
    finally:
        for flag, value in saved_env.items():
            if value is None:
                os.environ.pop(flag, None)
            else:
                os.environ[flag] = value


def _load_hf_dataset(source: str, name: str, config: str) -> list[GSM8KRecord]:
    """Read a Hugging Face dataset from the local cache only; this package never downloads data."""
    hint = "pass a local JSONL/parquet file or a directory holding train.jsonl/test.jsonl instead"
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{source!r} is not a local path and the 'datasets' library is not installed; {hint}")
    with _offline_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(source, config, split=name)
        except Exception as err:  # offline misses raise ConnectionError, FileNotFoundError, ValueError...
            if source not in HF_GSM8K_NAMES:  # `data/gsm8k` not made yet: a missing folder, not a Hub miss
                raise DataError(
                    f"{source}: no such file or folder (nor a dataset of that name in the local Hugging Face "
                    "cache); write GSM8K there as train.jsonl and test.jsonl (docs/llada8b.md, step 2)"
                ) from None
            raise DataError(
                f"could not load {source!r} ({config}, {name}) offline from the local cache: {err}; {hint}"
            ) from None
    missing = [key for key in ("question", "answer") if key not in dataset.column_names]
    if missing:
        columns = ", ".join(dataset.column_names)
        raise DataError(f"{source!r} has no column {missing[0]!r} (columns: {columns})")
    return [
        _record_from_row({"question": q, "answer": a}, f"{source} {name} row {i}")
        for i, (q, a) in enumerate(zip(dataset["question"], dataset["answer"], strict=True))
    ]


def _looks_like_dataset_name(source: str | os.PathLike[str]) -> bool:
    """``owner/name`` (no file suffix) or the bare ``gsm8k``: a Hugging Face dataset, not a missing path."""
    if not isinstance(source, str):
        return False
    if source in HF_GSM8K_NAMES:
        return True
    known_suffix = Path(source).suffix.lower() in (*_JSONL_SUFFIXES, *_PARQUET_SUFFIXES)
    return _DATASET_NAME.match(source) is not None and not known_suffix


def load_gsm8k(
    source: str | os.PathLike[str], split: str = "train", *, config: str = "main"
) -> list[GSM8KRecord]:
    """Load GSM8K-style records and slice them by ``split`` (e.g. ``"test[:200]"``).

    ``source`` is a ``.jsonl`` / ``.parquet`` file (only the slice part of ``split`` applies), a directory
    holding ``{name}.jsonl`` or ``{name}.parquet``, or a Hugging Face dataset name such as ``openai/gsm8k``
    (config ``config``) that ``datasets`` can load offline from its cache.
    """
    name, selection = parse_split(split)
    path = Path(source)
    if path.is_file():
        records = _read_file(path)
    elif path.is_dir():
        files = _split_files(path, name)
        if not files:
            raise DataError(f"{path}: no {name}.jsonl or {name}.parquet for split {name!r}")
        records = [record for file in files for record in _read_file(file)]
    elif _looks_like_dataset_name(source):
        records = _load_hf_dataset("openai/gsm8k" if source == "gsm8k" else str(source), name, config)
    else:
        raise DataError(f"{source}: no such file or directory (expected a .jsonl/.parquet file or a folder)")
    selected = apply_split(records, selection)
    if not selected:
        raise DataError(f"split {split!r} selects no records from {source} ({len(records)} records)")
    warn_unanswered(selected, f"{source} {split}")
    return selected


def warn_unanswered(records: Sequence[GSM8KRecord], what: str) -> int:
    """Warn (count and first file:line) about answers without a `#### n` line: they cannot be scored, so
    every prediction for them counts as wrong. Returns the count."""
    missing = [record for record in records if record.final_answer is None]
    if missing:
        first = missing[0].origin or f"question {missing[0].question[:40]!r}"
        logger.warning(
            "%s: %d of %d answers have no '#### <number>' line (first at %s); they are scored as wrong, "
            "end each answer with '#### <number>'",
            what,
            len(missing),
            len(records),
            first,
        )
    return len(missing)
