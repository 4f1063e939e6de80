"""Running in parallel: rank queries, joining torchrun's group, collectives, and DDP / FSDP2 for training.

Neutral ground: training and evaluation (which splits its problems over ranks) both use it, and neither
imports the other. Without torch.distributed every helper is the one-process identity. How DDP and FSDP2
wrap the objective (`training.objective.TrainStep`), and why (ignored frozen parameters,
`find_unused_parameters`, replicated 0-dim gates, full-tensor checkpoints): docs/distributed.md.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from llada_trm.errors import ConfigError

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
    total_sums: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    for part_sums, part_counts in gather_objects((dict(sums), dict(counts))):
        total_sums.update(part_sums)
        total_counts.update(part_counts)
    return dict(total_sums), dict(total_counts)


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


# ------------------------------------------------------------------------------ training in parallel


def resolve_strategy(setting: str, *, phase: int, world: int | None = None) -> str:
    """'none' (one process), 'ddp' or 'fsdp' from `advanced.distributed` and the training phase."""
    if (world_size() if world is None else world) == 1:
        return "none"
    if setting == "auto":
        return "fsdp" if phase == 3 else "ddp"
    return setting


# ------------------------------------------------------------------------------------------- wrapping


def wrap_run(
    step: nn.Module, plan: Any, strategy: str, *, device: torch.device, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """The module the trainer calls: `step` itself, DDP around it, or `step` sharded in place by FSDP2
    (the backbone's blocks, then the root), whose shards the freezing plan's groups (a `FreezePlan`) are
    re-read from. `param_dtype` is FSDP's compute dtype on GPUs (None: fp32)."""
    if strategy == "none":
        return step
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [name for name, p in step.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(step, frozen)
        return DDP(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))  # the training device, not torch's default
    if device.type == "cuda" and param_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    # FSDP2 warns about every module output that is a view (an in-place op on one would skip its
    # all-gather); the blocks' K/V and the objective's detached terms are views that nothing modifies.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(LLaDABlock|TrainStep)\)")
    for block in step.model.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    scalars = {p for p in step.parameters() if p.dim() == 0}
    fully_shard(step, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    step.touch_all = True
    params = dict(step.model.named_parameters())
    for group in plan.groups:
        group.params = {name: params[name] for name in group.params}
    return step


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP has sharded any parameter of `module` (then its state needs the collective helpers)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def gradient_sync(engine: nn.Module, enabled: bool) -> Iterator[None]:
    """Around forward + backward: DDP skips its all-reduce on micro-batches that do not step (`no_sync`).

    FSDP still reduce-scatters every micro-batch: accumulating unsharded gradients instead would hold a full
    fp32 gradient of the backbone on every GPU, which is what sharding is there to avoid.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not enabled and isinstance(engine, DDP):
        with engine.no_sync():
            yield
    else:
        yield


@contextlib.contextmanager
def unsharded(engine: nn.Module) -> Iterator[None]:
    """Gather the FSDP root's parameters (embeddings, LM head, refiners) for work outside `forward`.

    Validation and parameter statistics call the hybrid's `features` / `refine` / `lm_head` directly; the
    blocks gather themselves when called, the root's tensors need this. A no-op without FSDP.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(engine, FSDPModule):
        yield
        return
    engine.unshard()
    try:
        yield
    finally:
        engine.reshard()


def sync_ignored_gradients(engine: nn.Module) -> None:
    """Average the gradients of the parameters FSDP leaves replicated (0-dim gates) over the ranks.

    A rank without a gradient contributes zeros; the others' gradients still count.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(engine, FSDPModule):
        return
    params = [p for p in engine.parameters() if p.requires_grad and p.dim() == 0]
    if not params:
        return
    flat = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).float()
    dist.all_reduce(flat)
    flat /= world_size()
    for p, value in zip(params, flat, strict=True):
        p.grad = value.to(p.dtype).clone()


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> float:
    """The global gradient norm (clipped to `max_norm` when > 0), for plain, DDP and FSDP parameters.

    FSDP's sharded gradients are DTensors whose norm is a collective; the replicated gates are plain tensors;
    `torch.nn.utils` handles each kind, and the two partial norms combine as a root of summed squares.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.get_total_norm(grads))
    plain = [g for g in grads if not isinstance(g, DTensor)]
    squares = float(torch.nn.utils.get_total_norm(sharded).full_tensor()) ** 2
    if plain:
        squares += float(torch.nn.utils.get_total_norm(plain)) ** 2
    total = math.sqrt(squares)
    if max_norm > 0 and math.isfinite(total):
        coef = min(1.0, max_norm / (total + 1e-6))
        for grad in grads:
            grad.mul_(coef)
    return total


# ---------------------------------------------------------------------------------------- checkpoints


def full_state_dict(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """The named parameters as full tensors, for a checkpoint in the single-process layout.

    Collective under FSDP (every rank must call it): the shards are gathered to rank 0's CPU, the other
    ranks get an empty dict. Otherwise the parameters themselves (every rank holds them).
    """
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        return {name: state[name] for name in names if name in state}
    params = dict(model.named_parameters())
    return {name: params[name] for name in names}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name: the same for 1 process, DDP and FSDP (full tensors).

    Keyed by name rather than by index, it loads into a run with another world size or strategy. Collective
    under FSDP (rank 0 receives the gathered state, the others an empty dict).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Inverse of `optimizer_state` (every run since the first DDP/FSDP commit, dc73e82, saved this form)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, dict(state), options=StateDictOptions(full_state_dict=True))


def load_sharded_weights(
    model: nn.Module, directory: str | Path, *, require: Sequence[str] = ()
) -> list[str]:
    """`checkpoint.load_weights` for a model whose parameters are FSDP shards (each rank reads the file).

    The file holds full tensors (the single-process layout); `set_model_state_dict` shards them.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from llada_trm.run_checkpoint import WEIGHTS_FILE, check_weights, read_weights_file

    path = Path(directory) / WEIGHTS_FILE
    tensors = read_weights_file(path)
    own = get_model_state_dict(model)
    check_weights(path, tensors, own, require)
    tensors = {name: t.to(own[name].dtype) for name, t in tensors.items()}
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    return sorted(tensors)
