"""`llada-trm-lm-eval`: lm-eval's CLI with the `llada_trm` model registered and `gsm8k_local` findable.

Arguments are lm-eval's own, passed through unchanged; only `--include_path` is added (the packaged task
directory) when the command line has none. A missing lm-eval is a one-line error naming the extra.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .tasks import tasks_dir


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
    cli_evaluate()


if __name__ == "__main__":
    main()
