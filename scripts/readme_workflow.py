"""Run the README's workflow block top to bottom, as a new user would from a fresh clone.

    python scripts/readme_workflow.py                           # every command as written (an hour or more)
    LLADA_TRM_README_QUICK=1 python scripts/readme_workflow.py  # each command shortened to seconds

Run it in the root of a fresh clone (it writes runs/ and exports/ there). The GSM8K line reads
data/gsm8k/test.jsonl: make it first (docs/llada8b.md, step 2). With LLADA_TRM_README_QUICK=1 (or --quick)
each command gets the overrides in `QUICK` (2 training steps, 2 problems, one seed), so that the whole block
runs in about a minute; the commands themselves are exactly the README's. `tests/test_readme_workflow.py`
runs the quick version. Exit status: 0 when every line succeeded, else 1 (the failing lines are listed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

QUICK_ENV = "LLADA_TRM_README_QUICK"
SECTION = "## The workflow"

# Per command: what shortens it (appended to the README's own arguments).
_SHORT_TRAIN = [
    "--set", "training.max_steps=2", "--set", "data.n_train=64", "--set", "data.n_eval=4",
    "--set", "training.batch_size=4",
]
QUICK: dict[str, list[str]] = {
    "pretrain": [
        "--set", "training.steps=2", "--set", "training.eval_every=2", "--set", "training.save_every=2",
        "--set", "data.n_train=64", "--set", "data.n_eval=4", "--set", "evaluation.n_problems=2",
        "--set", "evaluation.n_test=2", "--set", "training.batch_size=4",
    ],
    "train": _SHORT_TRAIN,
    "eval": ["--limit", "2"],
    "compare": [
        "--seeds", "0", "--set", "run.training.max_steps=2", "--set", "run.data.n_train=64",
        "--set", "run.data.n_eval=4",
        "--set", "run.training.val_sampled_problems=0", "--set", "evaluation.n_problems=2",
        "--set", "run.training.batch_size=4",
    ],
}
def workflow_commands(readme: str) -> list[str]:
    """The command lines of the first ```bash block under the workflow heading, comments dropped."""
    start = readme.index(SECTION)
    block = re.search(r"```bash\n(.*?)```", readme[start:], re.S)
    if block is None:
        raise ValueError(f"README.md: no ```bash block under {SECTION!r}")
    lines = []
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


def quick_arguments(words: Sequence[str], root: Path) -> list[str]:
    """The overrides that shorten one command (`QUICK`). A compare config with `arms` trains its reference and
    one other arm (every arm's settings are still validated when the config loads)."""
    extra = list(QUICK.get(words[1], [])) if len(words) > 1 else []
    if len(words) > 1 and words[1] == "compare" and "--config" in words:
        config = yaml.safe_load((root / words[words.index("--config") + 1]).read_text(encoding="utf-8"))
        arms = config.get("arms") or {}
        reference = config.get("reference")
        if reference and arms:
            other = next(name for name in arms if name != reference)
            extra += ["--set", f"refiners=[{reference},{other}]"]
    return extra


def run_workflow(
    root: Path, *, quick: bool, echo: Callable[[str], None] = print
) -> list[tuple[str, int]]:
    """Run every workflow line in `root` (in this process, through `llada_trm.cli.main`); returns each line
    with its exit status."""
    from llada_trm.cli import main

    results = []
    for line in workflow_commands((root / "README.md").read_text(encoding="utf-8")):
        words = shlex.split(line)
        if words[0] != "llada-trm":
            raise ValueError(f"README workflow line does not run llada-trm: {line}")
        argv = words[1:] + (quick_arguments(words, root) if quick else [])
        echo(f"\n$ {line}" + (" [quick]" if quick else ""))
        cwd, started, cpu = Path.cwd(), time.perf_counter(), time.process_time()
        os.chdir(root)
        try:
            code = main([*argv[:1], *(["--no-progress"] if _has_progress(argv[0]) else []), *argv[1:]])
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
        finally:
            os.chdir(cwd)
        wall, used = time.perf_counter() - started, time.process_time() - cpu
        echo(f"-> exit {code} ({wall:.1f} s, {used:.1f} s of CPU)")
        results.append((line, code))
    return results


def _has_progress(command: str) -> bool:
    return command in ("pretrain", "train", "eval", "compare", "cache")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"shorten every command (also {QUICK_ENV}=1)")
    parser.add_argument("--root", default=".", help="the clone's root (default: here)")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get(QUICK_ENV, "") not in ("", "0")
    results = run_workflow(Path(args.root).resolve(), quick=quick)
    failed = [line for line, code in results if code != 0]
    print(f"\n{len(results) - len(failed)} of {len(results)} README workflow lines succeeded")
    for line in failed:
        print(f"FAILED: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
