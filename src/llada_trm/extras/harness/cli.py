"""`llada-trm-lm-eval`: lm-eval's CLI with the `llada_trm` model registered and `gsm8k_local` findable.

Arguments are lm-eval's own, passed through unchanged; only `--include_path` is added (the packaged task
directory) when the command line has none. A missing lm-eval is a one-line error naming the extra, and so is
every failure the user can act on (a bad model arg, a checkpoint that does not load, a full disk, ...: the
boundary of `llada-trm`, `llada_trm.boundary`); `LLADA_TRM_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llada_trm.boundary import report

from .tasks import tasks_dir

PROG = "llada-trm-lm-eval"


def _output_path_problem(args: Sequence[str]) -> str | None:
    """Why `--output_path` cannot be written (a parent that is a file, a folder not writable), or None."""
    value = next((a.split("=", 1)[1] for a in args if a.startswith("--output_path=")), None)
    if value is None and "--output_path" in args[:-1]:
        value = args[args.index("--output_path") + 1]
    if not value:
        return None
    path = Path(value).expanduser()
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                return f"--output_path {value}: {ancestor} is a file, not a folder; choose another path"
            if not os.access(ancestor, os.W_OK | os.X_OK):
                return f"--output_path {value}: {ancestor} is not writable; choose a writable folder"
            return None
    return None


def _model_args_error(exc: Exception) -> Exception:
    """lm-eval calls the backend with --model_args and its own --batch_size / --device as keywords: one given
    twice is a TypeError naming the class; here it becomes the user error it is."""
    text = " ".join(str(exc).split())
    if isinstance(exc, TypeError) and "LLaDATRMLM" in text:
        from llada_trm.errors import ConfigError

        return ConfigError(
            f"llada_trm: model args: {text.split('() ', 1)[-1]}; give batch_size and device with lm-eval's "
            "--batch_size and --device, and only the backend's own args in --model_args"
        )
    return exc


def main(argv: Sequence[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        from . import model  # noqa: F401  (registers `llada_trm`)
    except ImportError as exc:
        raise SystemExit(f"llada-trm-lm-eval needs lm-eval: pip install 'llada-trm[eval]' ({exc})") from None
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(tasks_dir())]
    sys.argv = [sys.argv[0], *args]
    debug = os.environ.get("LLADA_TRM_DEBUG", "") not in ("", "0")
    problem = _output_path_problem(args)
    if problem is not None:  # lm-eval would only log that it could not save, then exit 0
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        cli_evaluate()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        exc = _model_args_error(exc)
        status = None if debug else report(PROG, exc, lambda line: print(line, file=sys.stderr))
        if status is None:
            raise
        raise SystemExit(status) from None


if __name__ == "__main__":
    main()
