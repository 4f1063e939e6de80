"""The README's workflow block runs top to bottom from a fresh clone (issue 27), each command shortened by
LLADA_TRM_README_QUICK's overrides (`scripts/readme_workflow.py`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llada_trm.data.gsm8k import GSM8KRecord, write_jsonl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import readme_workflow  # noqa: E402


def _fresh_clone(root: Path) -> Path:
    """The tracked files the README block reads, as a clone has them (no runs/, exports/ or data/)."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in listed.stdout.splitlines():
        read = ("configs/", "experiments/", "tests/fixtures/run_before_issue25/")  # the convert line's run
        if name.startswith(read) or name == "README.md":
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, target)
    return root


def test_workflow_commands_are_the_readmes_block() -> None:
    lines = readme_workflow.workflow_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(lines) >= 12 and all(line.startswith("llada-trm ") for line in lines)
    assert not any("OTHER_RUN" in line or "../shared" in line for line in lines)  # no placeholders
    quick = readme_workflow.quick_arguments(["llada-trm", "compare", "--config", "configs/levers_tiny.yaml"],
                                            REPO)
    assert "refiners=[slot,mlp_matched]" in quick and "--seeds" in quick  # the first arm past the reference


def test_readme_workflow_runs_top_to_bottom_on_a_fresh_clone(tmp_path: Path) -> None:
    root = _fresh_clone(tmp_path / "clone")
    # docs/llada8b.md step 2 writes GSM8K here; two problems in its format (one longer than the tiny
    # backbone's positions: skipped and counted, not a stop)
    long = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. " * 12
    records = [GSM8KRecord("Tom has 3 apples and buys 4 more. How many apples does he have?", "#### 7"),
               GSM8KRecord(long + "How many clips?", "#### 72")]
    write_jsonl(records, root / "data" / "gsm8k" / "test.jsonl")
    log: list[str] = []
    results = readme_workflow.run_workflow(root, quick=True, echo=log.append)
    failed = [line for line, code in results if code != 0]
    assert not failed, failed
    assert (root / "runs" / "tiny_refiner_mlp" / "checkpoints" / "last").is_dir()
    assert (root / "exports" / "tiny_refiner" / "config.json").is_file()
    assert (root / "runs" / "levers" / "comparison.md").is_file()
