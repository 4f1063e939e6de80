"""A run directory belongs to one run: a new run never writes over an old one (`--force` archives it as
`DIR.old-<timestamp>`, never deletes), and `DIR/.lock` (O_EXCL, with pid, host and start time) keeps a second
run out while one writes; a stale lock on this host is taken over. Repairs of what a kill left happen only
under that lock (`repair_run_dir`). docs/training.md ("What a run writes") tells the user's side.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import fsync_dir, recover_directory, sweep_temporaries

LOCK_FILE = ".lock"
RUN_OUTPUTS = ("config.yaml", "training_metrics.csv", "validation_metrics.csv", "checkpoints")

logger = logging.getLogger("llada_trm")


class RunDirError(ConfigError):
    """The run directory holds another run, or another process is writing there."""


def has_run(directory: Path) -> bool:
    """Whether `directory` holds a run's outputs."""
    return any((directory / name).exists() for name in RUN_OUTPUTS)


def has_checkpoint(directory: Path) -> bool:
    """Whether a run directory holds a checkpoint (`last`, `best`, a snapshot, or one set aside mid-save)."""
    folder = directory / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and not p.name.endswith(".tmp") for p in folder.iterdir())


def restarts_from_scratch(path: str | Path, output_dir: Path) -> bool:
    """Whether `--resume path` names this run's directory holding a run killed before its first checkpoint.

    Such a run has nothing to continue: resuming it starts it again from step 0 (what the uninterrupted run
    did too). Any other path is left to the checkpoint reader, whose errors name what is missing.
    """
    from llada_trm.run_checkpoint import resolve_checkpoint_dir

    path = Path(path)
    try:
        resolve_checkpoint_dir(path)
        return False
    except CheckpointError:
        if not (path.is_dir() and has_run(path)) or has_checkpoint(path):
            return False
    if path.resolve() != Path(output_dir).resolve():
        raise CheckpointError(
            f"{path}: that run stopped before its first checkpoint, so there is nothing to resume from; "
            f"resume it with output.dir={path} (it starts again from step 0) or start a new run"
        )
    return True


def repair_run_dir(directory: Path) -> None:
    """Under the run's lock only: put back a checkpoint a killed save left aside (`.last.old`), and sweep
    the temporary files and directories killed writers left in the run and its checkpoints."""
    checkpoints = directory / "checkpoints"
    if checkpoints.is_dir():
        for aside in sorted(checkpoints.glob(".*.old")):
            recover_directory(checkpoints / aside.name[1:-4])
        sweep_temporaries(checkpoints)
    sweep_temporaries(directory)


def archive_run_dir(directory: Path) -> Path:
    """Rename `directory` to `DIR.old-<timestamp>` (a free name) and return where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = directory.with_name(f"{directory.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.old-{stamp}-{n}")
    os.rename(directory, target)
    fsync_dir(directory.parent)
    return target


def claim_run_dir(directory: str | Path, *, force: bool = False) -> Path | None:
    """Make `directory` ready for a NEW run: refuse one holding a run, or with `force` archive it.

    Returns where the old run was archived (None when there was none). A directory another live process is
    writing into is refused even with `force`: archiving would move its files away mid-run.
    """
    directory = Path(directory)
    if not has_run(directory):
        return None
    holder = RunLock(directory).holder()
    if holder is not None:
        raise RunDirError(f"{directory}: {holder}; wait for it to finish or choose another output.dir")
    if not force:
        raise taken_error(directory)
    archived = archive_run_dir(directory)
    logger.warning("%s held a previous run: archived it as %s (--force)", directory, archived)
    return archived


def taken_error(directory: Path, *, resumed: Path | None = None) -> RunDirError:
    """The one-line refusal of a new run (or a resume from elsewhere) into a directory holding a run."""
    if resumed is not None:
        return RunDirError(
            f"{directory} holds another run than {resumed}; resume into that checkpoint's own run directory, "
            "an empty output.dir, or archive this one first (a new run with --force)"
        )
    if not has_checkpoint(directory):
        return RunDirError(
            f"{directory} holds a run that stopped before its first checkpoint; start it again from step 0 "
            f"with `llada-trm train ... --resume {directory}`, archive it with --force (renamed to "
            f"{directory.name}.old-<timestamp>), or choose another output.dir"
        )
    return RunDirError(
        f"{directory} already holds a run; continue it with `llada-trm train ... --resume {directory}`, "
        f"archive it with --force (renamed to {directory.name}.old-<timestamp>), or choose another output.dir"
    )


_COMPARE_OUTPUTS = ("comparison.", "errors.json", "diagnostics.json", "reliability.png")


def _made_by_compare(path: Path) -> bool:
    """Whether a top-level entry of a comparison directory is one a comparison writes."""
    if path.is_dir():
        return path.name == "none" or (path.name.startswith("seed") and path.name[4:].isdigit())
    return path.name.startswith(_COMPARE_OUTPUTS)


def claim_compare_dir(directory: Path, run_dirs: list[Path], *, force: bool = False) -> Path | None:
    """`claim_run_dir` for a comparison: `directory` is taken when one of its refiner `run_dirs` holds a
    run or a report is there; `force` archives the whole comparison directory."""
    taken = [d for d in run_dirs if has_run(d)] + [p for p in directory.glob("comparison.*") if p.is_file()]
    if not taken:
        entries = directory.iterdir() if directory.is_dir() else []
        runs = {d.relative_to(directory).parts[0] for d in run_dirs if d.is_relative_to(directory)}
        foreign = sorted(p.name for p in entries if p.name not in runs and not _made_by_compare(p))
        if foreign:  # someone's folder: never written into, never archived
            raise RunDirError(
                f"{directory}: holds files a comparison did not make ({', '.join(foreign[:3])}); choose an "
                "empty or new output.dir"
            )
        return None
    for run_dir in run_dirs:
        holder = RunLock(run_dir).holder()
        if holder is not None:
            raise RunDirError(f"{run_dir}: {holder}; wait for it to finish or choose another output.dir")
    if not force:
        raise RunDirError(
            f"{directory} already holds a comparison ({taken[0]}); archive it with --force (renamed to "
            f"{directory.name}.old-<timestamp>) or choose another output.dir"
        )
    archived = archive_run_dir(directory)
    logger.warning("%s held a previous comparison: archived it as %s (--force)", directory, archived)
    return archived


def lock_for_run(directory: Path, *, resumed: Path | None, own: bool = False) -> RunLock | None:
    """Rank 0 locks `directory` for a run and checks that it holds no other run; every rank raises alike.

    `resumed`: the checkpoint directory the run continues (its own run directory may hold that run);
    `own`: the caller already trained into `directory` (a second `Trainer.train()` continues its run).
    """
    from llada_trm.dist_utils import broadcast_object, is_main_process

    lock, problem = None, None
    if is_main_process():
        try:
            lock = RunLock(directory).acquire()
            # a checkpoint sits in RUN/checkpoints/<name>: resuming into RUN continues that run
            home = resumed.resolve().parent.parent if resumed is not None else None
            continues = own or home == directory.resolve()
            if has_run(directory) and not continues:
                raise taken_error(directory, resumed=resumed)
        except RunDirError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)
    if problem is not None:
        if lock is not None:
            lock.release()
        raise RunDirError(problem)
    return lock


class RunLock:
    """`DIR/.lock` for a run's lifetime (`with RunLock(dir): ...`, or `acquire()` / `release()`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._held = False

    def acquire(self) -> RunLock:
        """Take the lock, or raise `RunDirError` naming the live process that holds it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._held = True
                return self
            info = self._read()
            holder = self._describe_live(info)
            if holder is not None:
                raise RunDirError(
                    f"{self.directory}: {holder}; wait for it to finish, or choose another output.dir"
                )
            self._take_over(info)
        raise RunDirError(f"{self.path}: could not take the lock (other processes keep taking it over)")

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._read().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def holder(self) -> str | None:
        """A description of the live process holding the lock, or None when nobody (alive) holds it."""
        return self._describe_live(self._read()) if self.path.exists() else None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # ----------------------------------------------------------------------------------------- helpers

    def _create(self) -> bool:
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read(self) -> dict[str, Any]:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # gone, or torn by a crash while being written: nobody can hold it
        return info if isinstance(info, dict) else {}

    def _describe_live(self, info: dict[str, Any]) -> str | None:
        pid, host = info.get("pid"), info.get("host")
        if not isinstance(pid, int):
            return None
        here = host == socket.gethostname()
        if here and not _alive(pid):
            return None
        where = "this host" if here else f"host {host}"
        extra = "" if here else f" (if it is gone, delete {self.path})"
        started = info.get("started", "?")
        return f"another run (pid {pid} on {where}, started {started}) holds {self.path}{extra}"

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a stale lock, unless another process replaced it meanwhile (then the next try sees it)."""
        if self._read() != stale:
            return
        self.path.unlink(missing_ok=True)
        what = f"pid {stale['pid']} on {stale.get('host')}" if stale.get("pid") else "an unreadable lock"
        logger.warning("%s: taking over the stale lock of %s (that process is gone)", self.path, what)


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies included: not yet reaped)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
