"""Rank helpers: one process by default, `torchrun` later; logging, metrics and checkpoints on rank 0 only."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "is_main_process", "rank", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process writes logs, metrics and checkpoints."""
    return rank() == 0
