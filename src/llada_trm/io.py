"""What every command writes and resolves alike: atomic files and directories, dtype names, the device.

A file is written to a uniquely named temporary sibling, fsynced, then swapped in with `os.replace`; a
directory (a checkpoint, a pretrained backbone) is filled under a temporary name and swapped in the same
way. An interrupted write (Ctrl-C, out of memory, a crash) leaves the previous file or directory, never a
truncated one that a later load, plot or comparison would misread.

A directory swap takes two renames (the old one aside to `.<name>.old`, the new one in); a crash between them
leaves only the aside copy, which `recover_directory` (called by the next save or load) puts back.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llada_trm.errors import ConfigError

__all__ = [
    "DTYPES",
    "atomic_directory",
    "atomic_path",
    "copy_directory",
    "dtype_named",
    "fsync_dir",
    "fsync_file",
    "recover_directory",
    "remove_directory",
    "replace_directory",
    "resolve_device",
    "named_write_error",
    "write_bytes_atomic",
    "write_json",
    "write_jsonl",
    "write_text_atomic",
]

PathLike = str | os.PathLike[str]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
}
"""Every dtype name the package accepts (configs, the CLI, checkpoints), aliases included."""


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a name ("bfloat16", "bf16", "torch.float16")."""
    dtype = DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return dtype


def resolve_device(name: str = "auto", *, setting: str = "device") -> torch.device:
    """'auto' = CUDA when available, else CPU; asking for CUDA without one names `setting` in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: {name!r} asked for, but torch sees no CUDA device; use auto or cpu")
    return device


# ------------------------------------------------------------------------------------------------ files


def fsync_file(path: PathLike) -> None:
    """Flush a written file to disk (its data must be there before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (the renames in it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a unique temporary sibling of `path` to write; on success it is fsynced and renamed to `path`.

    For writers that want a file name (safetensors' `save_file`); on an exception the temporary file goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        named = named_write_error(exc, path)
        if named is not None:
            raise named from exc
        raise


def named_write_error(exc: BaseException, path: PathLike) -> OSError | None:
    """A write failure that names no file (write(2)'s ENOSPC or EFBIG, safetensors' I/O error, torch's
    stream writer) as an `OSError` naming `path`, so that the one-line error says what could not be written;
    None for anything else."""
    if isinstance(exc, OSError):
        return None if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))
    text = str(exc)
    code = re.search(r"os error (\d+)", text)
    if type(exc).__name__ == "SafetensorError" and code:
        return OSError(int(code[1]), os.strerror(int(code[1])), str(path))
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "file write failed" in text):
        return OSError(errno.EIO, "writing failed (a full disk, or a file-size limit?)", str(path))
    return None


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: PathLike, data: Mapping[str, Any]) -> Path:
    """Pretty JSON (NaN and inf written as null, so that strict JSON readers accept the file)."""
    return write_text_atomic(path, json.dumps(_finite(data), indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line."""
    lines = [json.dumps(_finite(row), ensure_ascii=False) for row in rows]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------ directories


def _aside(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.old"


def recover_directory(directory: PathLike) -> bool:
    """Finish an interrupted swap: the aside copy is the last complete one when `directory` is gone.

    Returns whether the aside copy was put back.
    """
    directory = Path(directory)
    aside = _aside(directory)
    if not aside.exists():
        return False
    if directory.exists():
        shutil.rmtree(aside)
        return False
    os.replace(aside, directory)
    return True


@contextlib.contextmanager
def atomic_directory(directory: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling directory to fill; on success it replaces `directory` whole.

    See `replace_directory`. On an exception the temporary directory goes and `directory` stays as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    for stale in directory.parent.glob(f".{glob.escape(directory.name)}.*.tmp"):  # a killed writer's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        try:
            yield tmp
        except Exception as exc:
            named = named_write_error(exc, directory)
            if named is not None:
                raise named from exc
            raise
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(staged: PathLike, directory: PathLike) -> Path:
    """Swap the filled directory `staged` in as `directory` (a sibling), replacing any old one whole.

    Its files are fsynced, the old directory is renamed aside, the new one renamed in, then the old one
    removed.
    """
    staged, directory = Path(staged), Path(directory)
    recover_directory(directory)
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            fsync_file(path)
    aside = _aside(directory)
    if directory.exists():
        os.replace(directory, aside)
    os.replace(staged, directory)
    if aside.exists():
        shutil.rmtree(aside)
    fsync_dir(directory.parent)
    return directory


def remove_directory(directory: PathLike) -> None:
    """Delete `directory` so that no reader ever sees it half-deleted: it is renamed to a hidden temporary
    sibling (`.<name>.*.tmp`, which the next `atomic_directory` of that name sweeps) and removed there."""
    directory = Path(directory)
    if not directory.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    os.replace(directory, trash)  # rename(2) over an empty directory
    fsync_dir(directory.parent)
    shutil.rmtree(trash, ignore_errors=True)


def copy_directory(source: PathLike, directory: PathLike) -> Path:
    """Copy the files of `source` into `directory` atomically (`atomic_directory`)."""
    with atomic_directory(directory) as tmp:
        for path in sorted(Path(source).iterdir()):
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
    return Path(directory)
