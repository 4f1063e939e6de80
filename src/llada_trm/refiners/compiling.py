"""`torch.compile` around a refiner's step (`advanced.compile_refiner`), the step's code left as it is.

The refiner's step is many small kernels (projections, LayerNorms, gates, clamps) on a few rows, where eager
PyTorch pays a dispatch per op; inductor fuses the elementwise ones. The step is compiled, not `slot_step`
alone, so the row packing, the blocks and the scatter back are in the graph too; `dynamic=True` because the
number of refined rows changes from call to call (a recompile per count would cost more than it saves).
The data-dependent parts (`ActiveRows.pack`'s `.all()` and counts) are graph breaks: they run eagerly.

Compiling is a speed switch, never a change of result: where torch.compile cannot run (no C++ compiler for
the CPU backend, no Triton for CUDA, an unsupported Python), `compile_refiner_steps` warns once and leaves
the refiners eager. bench/bench_compile.py measures what it buys and what the first call costs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from llada_trm.refiners.base import Refiner

__all__ = ["compile_refiner_steps", "compiled_step", "torch_compile_problem"]

ATTRIBUTE = "_eager_step"  # where a compiled refiner keeps its eager step (also: "is it compiled?")


def torch_compile_problem(device: torch.device, backend: str = "inductor") -> str | None:
    """Why torch.compile cannot run on `device` here (one line), or None when a tiny function compiles.

    A probe rather than a guess at the toolchain: inductor's requirements move between releases.
    """
    try:
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False, backend=backend)
        probe(torch.ones(2, device=device))
    except Exception as exc:  # noqa: BLE001 (any failure means: no compile here, say why)
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]
    return None


def compiled_step(refiner: Refiner) -> bool:
    """Whether `refiner.step` is the compiled one."""
    return ATTRIBUTE in refiner.__dict__


def compile_refiner_steps(
    refiners: Iterable[Refiner], device: torch.device | str | None = None, backend: str = "inductor"
) -> bool:
    """Replace each refiner's `step` by `torch.compile(step, dynamic=True, backend=backend)` (an instance
    attribute; `backend` other than inductor is for tests: "aot_eager" traces the same graphs in seconds).

    Returns True when compiled; False, with one warning, when torch.compile cannot run on `device` (default:
    the first refiner's parameters'), the refiners then staying eager. Compiling twice is a no-op.
    """
    refiners = list(refiners)
    if not refiners:
        return False
    if device is None:
        param = next(refiners[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    problem = torch_compile_problem(torch.device(device), backend)
    if problem is not None:
        warnings.warn(
            f"advanced.compile_refiner: torch.compile cannot run on {device} ({problem}); the refiner runs "
            "eagerly (same results, eager speed); set advanced.compile_refiner=false to silence this",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    for refiner in refiners:
        if compiled_step(refiner):
            continue
        eager = refiner.step
        refiner.__dict__[ATTRIBUTE] = eager
        refiner.__dict__["step"] = torch.compile(eager, dynamic=True, backend=backend)
    return True
