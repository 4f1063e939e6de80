"""What every command writes and resolves alike: atomic files and directories, dtype names, the device.

A file or directory is written under a temporary sibling name (`.<name>.<host>-<pid>-<random>.tmp`, with the
umask's permissions) and renamed into place, so an interrupted write leaves the previous one. A directory
swap takes two renames (the old one aside to `.<name>.old`); only the directory's writer puts an aside copy
back (`recover_directory`), readers read it where it is (`readable_directory`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llada_trm.errors import ConfigError

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
    with contextlib.suppress(OSError):  # platforms without directory fds
        fsync_file(path)


# -------------------------------------------------------------------------------------- temporary names

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp$")


def _host_tag() -> str:
    """Eight hex digits naming this host in temporary names (a shared filesystem mixes hosts' files)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:8]


def temporary_name(path: PathLike) -> Path:
    """A fresh temporary sibling name of `path`: `.<name>.<host>-<pid>-<random>.tmp`."""
    path = Path(path)
    return path.parent / f".{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _writer_gone(match: re.Match[str]) -> bool:
    """Whether the process that made a temporary name is gone (only this host's processes can be told)."""
    if match["host"] != _host_tag():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def sweep_temporaries(directory: PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files and directories a killed writer left in `directory` (of `name` only, when
    given); returns them. Only this project's temporary names whose writer (pid on this host) is gone go:
    never a user's file, never a live writer's."""
    directory = Path(directory)
    swept: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return swept
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or (name is not None and match["name"] != name) or not _writer_gone(match):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        swept.append(entry)
    return swept


# ------------------------------------------------------------------------------------------------ files


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a unique temporary sibling of `path` to write (for writers that want a file name); on success it
    is fsynced and renamed to `path`, on an exception it goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)  # 32 random bits: a clash is a FileExistsError
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 & ~umask, as open() gives a new file
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors writes 0600) gets it back
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


def readable_directory(directory: PathLike) -> Path:
    """Where a reader finds `directory`'s contents: itself, or during (or after an interrupted) swap the
    aside copy, read where it is. Readers never rename: that is `recover_directory`'s, under the lock."""
    directory = Path(directory)
    aside = _aside(directory)
    if not directory.exists() and aside.is_dir():
        return aside
    return directory


def recover_directory(directory: PathLike) -> bool:
    """Finish an interrupted swap: the aside copy is the last complete one when `directory` is gone; returns
    whether it was put back. Only the directory's writer calls it (a reader's rename would break a live
    writer's second rename)."""
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
    """Yield an empty temporary sibling directory to fill; on success it replaces `directory` whole, on an
    exception it goes and `directory` stays as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    sweep_temporaries(directory.parent, directory.name)  # what a killed writer left
    tmp = temporary_name(directory)
    tmp.mkdir(0o777)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0777 & ~umask, as mkdir gives a new folder
    try:
        try:
            yield tmp
        except Exception as exc:
            named = named_write_error(exc, directory)
            if named is not None:
                raise named from exc
            raise
        _apply_umask(tmp, mode)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(staged: Path, mode: int) -> None:
    """Give what writers put in `staged` the umask's permissions (`mode`: a new directory's), as `open()`
    and `mkdir` would: some writers (safetensors) create 0600 files whatever the umask."""
    for path in staged.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, mode if path.is_dir() else mode & 0o666)


def replace_directory(staged: PathLike, directory: PathLike) -> Path:
    """Swap the filled directory `staged` in as `directory` (a sibling): its files fsynced, the old directory
    renamed aside, the new one in, then the old one removed."""
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
    trash = temporary_name(directory)
    trash.mkdir()
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
