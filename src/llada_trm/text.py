"""Reading the project's text inputs (config YAML, GSM8K JSONL, tokenizer JSON) as UTF-8, or failing clearly.

Python's own decode error names neither the file nor the line ("'utf-8' codec can't decode byte 0xff in
position 21"); these helpers turn it into `path:line: ...` so a user can open the file at the bad byte.
"""

from __future__ import annotations

from pathlib import Path


def decode_utf8(data: bytes, where: str | Path, error: type[ValueError], *, first_line: int = 1) -> str:
    """`data` as text; a non-UTF-8 byte raises `error` naming `where`, the line (counted from `first_line`)
    and the column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = data[exc.start : exc.start + 1].hex()
        raise error(
            f"{where}:{line}: not UTF-8 text (byte 0x{byte} at column {column}); save the file as UTF-8"
        ) from None


def read_utf8(path: str | Path, error: type[ValueError]) -> str:
    """The whole file as UTF-8 text; see `decode_utf8`."""
    return decode_utf8(Path(path).read_bytes(), path, error)
