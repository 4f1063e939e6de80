"""Process-group primitives: rank queries, joining torchrun's group, collectives that keep ranks agreeing.

Neutral ground for every command: training (`training.distributed` wraps models in DDP / FSDP on top of
these) and evaluation (which splits its problems over ranks and merges the results back in order) both use
them, and neither has to import the other. Without torch.distributed every helper is the one-process
identity.

`all_finite`, `reduce_sums` and `broadcast_object` make ranks log the same numbers and take the same
decisions; `shard_indices`, `gather_objects` and `merge_shards` split work over ranks and merge it back.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from llada_trm.errors import ConfigError

__all__ = [
    "all_finite",
    "broadcast_object",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "merge_shards",
    "rank",
    "reduce_sums",
    "shard_indices",
    "world_size",
]


# ------------------------------------------------------------------------------------------------- ranks


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The rank within this node (torchrun's LOCAL_RANK): which GPU this process drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes logs, metrics and checkpoints."""
    return rank() == 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun describes in the environment (once); return this rank's device.

    Without torchrun (or with one process) nothing happens and `device` comes back unchanged. On CUDA each
    process takes GPU LOCAL_RANK and NCCL; on CPU the backend is gloo.
    """
    cuda = device.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE is set but {', '.join(missing)} is not; launch several processes with "
                "`torchrun --nproc-per-node N -m llada_trm train --config FILE`"
            )
        if cuda:
            _set_cuda_device()
        dist.init_process_group(
            "nccl" if cuda else "gloo", device_id=torch.device("cuda", local_rank()) if cuda else None
        )
        atexit.register(_destroy_process_group)
    if cuda and is_distributed():
        _set_cuda_device()
        return torch.device("cuda", local_rank())
    return device


def _set_cuda_device() -> None:
    count = torch.cuda.device_count()
    if local_rank() >= count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank()} has no GPU: this node has {count}; start at most {count} processes "
            f"per node (torchrun --nproc-per-node {count})"
        )
    torch.cuda.set_device(local_rank())


def _destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_finite(value: float) -> bool:
    """Whether `value` is finite on every rank: the ranks stop together instead of one waiting forever."""
    finite = math.isfinite(value)
    if not is_distributed():
        return finite
    flag = torch.tensor([0 if finite else 1], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def reduce_sums(
    sums: Mapping[str, float], counts: Mapping[str, int]
) -> tuple[dict[str, float], dict[str, int]]:
    """Add up per-rank metric sums and counts, so that logged means are over every rank's micro-batches.

    Gathered as objects: ranks may hold different keys (a statistic only present when a chunk was refined).
    """
    if not is_distributed():
        return dict(sums), dict(counts)
    total_sums: dict[str, float] = {}
    total_counts: dict[str, int] = {}
    for part_sums, part_counts in gather_objects((dict(sums), dict(counts))):
        for key, value in part_sums.items():
            total_sums[key] = total_sums.get(key, 0.0) + value
        for key, value in part_counts.items():
            total_counts[key] = total_counts.get(key, 0) + value
    return total_sums, total_counts


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable) on every rank; `obj` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """The items of `n` this rank handles: rank, rank + world, ... (strided: shares differ by at most 1)."""
    r = (dist.get_rank() if is_distributed() else 0) if rank is None else rank
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside a world of {w}")
    return list(range(r, n, w))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (anything picklable, e.g. its list of predictions), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def merge_shards(parts: Sequence[Sequence[Any]], n: int | None = None) -> list[Any]:
    """Undo `shard_indices`: `parts[r]` holds rank r's results in order; returns them in item order.

        merge_shards(gather_objects([score(i) for i in shard_indices(n)]), n) == [score(i) for i in range(n)]
    """
    world = len(parts)
    total = sum(len(part) for part in parts) if n is None else n
    for r, part in enumerate(parts):
        expected = len(range(r, total, world))
        if len(part) != expected:
            raise ValueError(f"rank {r} returned {len(part)} results for its {expected} items")
    return [parts[i % world][i // world] for i in range(total)]
