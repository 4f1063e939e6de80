"""`llada-trm eval` under torchrun: the process group is joined before the model loads, rank 0 alone prints.

Two real gloo processes run the CLI with torchrun's environment and must write the predictions one process
writes, with the summary printed once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tiny_assets import TINY_SAMPLING

import llada_trm.dist_utils as distributed
import llada_trm.evaluate.loading
from llada_trm.cli import main
from llada_trm.evaluate.evaluator import PREDICTIONS_FILE

SAMPLING = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_SAMPLING.items()]
SUMMARY_LINE = "accuracy strict"


def eval_argv(run_dir: Path, out: Path) -> list[str]:
    argv = ["eval", "--checkpoint", str(run_dir), "--device", "cpu", "--limit", "3", "--batch-size", "1"]
    return argv + ["--out", str(out), "--no-progress", *SAMPLING]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str], rank: int, world: int, port: int) -> subprocess.Popen:
    """One rank of a `torchrun --nproc-per-node world` launch, with torchrun's environment variables."""
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "llada_trm", *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_process_group_is_joined_before_the_model_loads(run_dir, tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    joined = distributed.init_distributed
    real_load = llada_trm.evaluate.loading.load_checkpoint

    def init(device):
        calls.append("init")
        return joined(device)

    def load(*args, **kwargs):
        calls.append("load")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(distributed, "init_distributed", init)
    monkeypatch.setattr(llada_trm.evaluate.loading, "load_checkpoint", load)
    assert main(eval_argv(run_dir, tmp_path / "one")) == 0
    assert calls == ["init", "load"]
    assert SUMMARY_LINE in capsys.readouterr().out

    monkeypatch.setattr(distributed, "rank", lambda: 1)  # what a rank other than 0 sees
    assert main(eval_argv(run_dir, tmp_path / "two")) == 0
    assert capsys.readouterr().out == ""


def test_two_processes_print_once_and_match_one_process(run_dir, tmp_path, capsys):
    assert main(eval_argv(run_dir, tmp_path / "single")) == 0
    capsys.readouterr()
    argv, port = eval_argv(run_dir, tmp_path / "ranks"), free_port()
    procs = [launch(argv, rank, 2, port) for rank in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    printed = [out for out, _ in outputs]
    assert SUMMARY_LINE in printed[0] and "(3 problems" in printed[0]
    assert printed[1] == ""
    single = (tmp_path / "single" / PREDICTIONS_FILE).read_text()
    assert (tmp_path / "ranks" / PREDICTIONS_FILE).read_text() == single
