"""The one error boundary of every command (`llada-trm`, `llada-trm-lm-eval`): an exception becomes one line.

What the user can fix (bad input, any `OSError`, a failed write, input nested too deeply, a refused chat
template, memory exhausted) is one line naming the path or setting and the fix, and a non-zero exit; writes
are atomic (`io`), so the previous files stay. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
from typing import Any

USAGE_ERROR = 2
RUN_FAILED = 1

# What to do about each file-system failure; the line names the path and the operating system's words.
_OS_HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full; free some space and run the command again (files already there are "
    "unchanged)",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run the command again",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to, or fix its permissions",
    errno.EPERM: "not permitted (an immutable or protected file?); choose another folder, or fix its "
    "permissions",
    errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
    errno.EISDIR: "this is a folder where a file was expected; give the file's path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.EEXIST: "it already exists (a file where a folder is needed?); choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ELOOP: "too many symbolic links; give the real path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run again",
    errno.EIO: "an input/output error of the disk; check the disk and run again",
    errno.EFBIG: "the file outgrew the disk or the file-size limit (ulimit -f); free space or raise the "
    "limit and run again (files already there are unchanged)",
    errno.EXDEV: "the path crosses file systems; keep the output on one file system",
    errno.ENOTEMPTY: "the folder is not empty; choose a new one",
}
_WRITE_FAILURES = ("PytorchStreamWriter", "file write failed", "No space left", "unexpected pos")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (an `OSError` with its path, when the message lacks it)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    return text or type(exc).__name__


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def _target(path: str) -> str:
    """The file a write-then-rename temporary (`.NAME.xxxx.tmp`, `io.atomic_path`) stands for."""
    head, _, name = path.rpartition("/")
    match = _TEMPORARY.match(name)
    return f"{head}/{match['name']}" if match and head else match["name"] if match else path


def _os_error(exc: OSError) -> str:
    paths = [_target(str(p)) for p in (exc.filename, exc.filename2) if p not in (None, "")]
    words = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno or -1)
    where = " -> ".join(paths)
    head = f"{where}: {words}" if where else words
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError) and (
        not paths and str(exc).strip()
    ):
        head = " ".join(str(exc).split())  # our own messages already name the path and the fix
    return f"{head} ({hint})" if hint and hint not in head else head


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(word in str(exc) for word in _WRITE_FAILURES)


def describe_failure(exc: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for a failure the user can act on; None for a bug (keep the traceback)."""
    from llada_trm.errors import NonFiniteLossError, UserError

    if isinstance(exc, NonFiniteLossError):
        return one_line(exc), RUN_FAILED
    if isinstance(exc, OSError):
        usage = isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError)
        return _os_error(exc), USAGE_ERROR if usage else RUN_FAILED
    if isinstance(exc, UnicodeDecodeError):  # a reader that did not name its file (most do: `text.read_utf8`)
        return f"an input is not UTF-8 text ({one_line(exc)}); save the file as UTF-8", USAGE_ERROR
    if isinstance(exc, UserError | ValueError):
        return one_line(exc), USAGE_ERROR
    if isinstance(exc, RecursionError):
        return (
            "the input is nested too deeply to read (Python's recursion limit); flatten the YAML/JSON file "
            "or value", USAGE_ERROR,
        )
    if isinstance(exc, MemoryError):
        return "out of memory; use smaller sizes (batch size, gen_length, max_length)", RUN_FAILED
    if type(exc).__name__ == "SafetensorError":  # by name: the CLI imports no safetensors to report
        return f"a safetensors file could not be written or read ({one_line(exc)}); check the disk (free "\
            "space, permissions) and run again; files already there are unchanged", RUN_FAILED
    if _is_write_failure(exc):
        return f"writing a file failed ({one_line(exc)}); check the disk (free space, permissions) and run "\
            "again; files already there are unchanged", RUN_FAILED
    if type(exc).__module__.startswith("jinja2"):  # a chat template's TemplateError
        return f"the chat template failed ({type(exc).__name__}: {one_line(exc)}); use a model folder with "\
            "a standard chat template", USAGE_ERROR
    return None


def report(prog: str, exc: BaseException, printer: Any) -> int | None:
    """Print `prog: error: ...` for a failure the user can act on; its exit status, or None for a bug."""
    described = describe_failure(exc)
    if described is None:
        return None
    line, status = described
    # a path or question holding surrogates (undecodable bytes in argv) must not fail the report itself
    printer(f"{prog}: error: {line}".encode("utf-8", "backslashreplace").decode("utf-8"))
    return status
