"""bench/bench_versions.py: its arguments, its round order and its temporary worktree (made and removed on a
throwaway git repository; no timing)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from tiny_assets import REPO

sys.path.insert(0, str(REPO / "bench"))

import bench_versions  # noqa: E402


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder `tempfile` makes its directories in, so a test sees what the script left behind."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Two commits of one file, `old` then `new`, and a worktree of someone else's that must survive."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    for text in ("old", "new"):
        (repo / "f.txt").write_text(text)
        git(repo, "add", "f.txt")
        git(repo, "commit", "-q", "-m", text)
    git(repo, "worktree", "add", "-q", "--detach", str(tmp_path / "other"), "HEAD")
    return repo


def worktrees(repo: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in git(repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


def test_arguments() -> None:
    args = bench_versions.parse_args([])
    assert (args.ref, args.rounds, args.quick, args.clock) == ("04476e5", 5, False, "cpu")
    assert args.workloads == ["sampling", "train-slot", "train-mlp"]
    args = bench_versions.parse_args(
        ["--quick", "--ref", "abc", "--workloads", "train-mlp", "--clock", "wall"]
    )
    assert (args.ref, args.rounds, args.workloads, args.clock) == ("abc", 2, ["train-mlp"], "wall")
    assert bench_versions.parse_args(["--quick", "--rounds", "3"]).rounds == 3
    for bad in (["--rounds", "0"], ["--workloads", "sampling,nope"], ["--clock", "gpu"]):
        with pytest.raises(SystemExit):
            bench_versions.parse_args(bad)


def test_rounds_alternate_which_tree_goes_first() -> None:
    assert [bench_versions.round_order(i) for i in range(3)] == [
        ("current", "ref"), ("ref", "current"), ("current", "ref"),
    ]


def test_worktree_holds_the_ref_and_is_removed(repo: Path, temp: Path) -> None:
    before = worktrees(repo)
    with bench_versions.ref_worktree(repo, "HEAD~1") as tree:
        assert (tree / "f.txt").read_text() == "old"
        assert str(tree) in worktrees(repo)
        assert tree.parent.parent == temp
    assert list(temp.iterdir()) == []
    assert worktrees(repo) == before  # the other worktree is still there, ours is gone
    assert (repo / "f.txt").read_text() == "new"


def test_worktree_is_removed_when_the_block_fails(repo: Path, temp: Path) -> None:
    before = worktrees(repo)
    with pytest.raises(KeyboardInterrupt), bench_versions.ref_worktree(repo, "HEAD") as tree:
        assert tree.is_dir()
        raise KeyboardInterrupt
    assert list(temp.iterdir()) == []
    assert worktrees(repo) == before


def test_unknown_ref_is_one_line_and_leaves_nothing(repo: Path, temp: Path) -> None:
    before = worktrees(repo)
    with pytest.raises(bench_versions.BenchError, match="--ref 'no-such-ref' is not a commit"):
        with bench_versions.ref_worktree(repo, "no-such-ref"):
            pass
    assert list(temp.iterdir()) == []
    assert worktrees(repo) == before
