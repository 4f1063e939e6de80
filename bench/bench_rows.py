"""Dense vs packed refiner steps at LLaDA-8B width: what running a step over every row of the window costs
against computing only the refined rows (which needs their count on the host: a sync per step).

The slot refiner (configs/tiny_refiner.yaml's settings at d_model 4096, d_inner 512) and the MLP baseline run
K = 4 steps on one sequence of `--length` rows of which `--active` (one sampler block) are refined, dense
(eval mode: `Refiner.pack` returns None) and packed (the training path, timed under no_grad), interleaved,
medians of `--repeats`. Each is set beside one backbone call at the same length: a random 2-layer
LLaDA-8B-width backbone, timed and EXTRAPOLATED to 32 layers (per-layer and fixed parts split by FLOPs).

    .venv/bin/python bench/bench_rows.py [--length 160 --active 32 --repeats 5 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import floors
import torch
from wide import llada_8b_width, random_backbone

from llada_trm.model.refiners import build_refiner


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--active", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    config = llada_8b_width(2)
    backbone = random_backbone(config, dtype=dtype)
    d = config.d_model
    refiners = {
        "slot": build_refiner("slot", d, num_steps=4, n_heads=4, n_blocks=1, delta_scale=0.5,
                              context_dim=config.n_heads * config.head_dim),
        "mlp": build_refiner("mlp", d, num_steps=4, hidden_mult=2.0, delta_scale=0.5),
    }
    torch.manual_seed(0)
    h = torch.randn(1, args.length, d).to(dtype)
    context = torch.randn(1, args.length, d).to(dtype)
    active = torch.zeros(1, args.length, dtype=torch.bool)
    active[:, -args.active :] = True
    ids = torch.randint(0, 126000, (1, args.length))

    def run(refiner: torch.nn.Module, packed: bool) -> None:
        refiner.train(packed)  # dropout is 0: train mode only switches the packing on
        x, state = h.to(refiner.work_dtype(h)), refiner.init_state(h)
        for _ in range(4):
            x, state, _ = refiner.step(x, state, context=context if refiner is refiners["slot"] else None,
                                       active=active)

    times: dict[str, list[float]] = {"backbone": []}
    with torch.no_grad():
        backbone(ids)
        for _ in range(args.repeats):
            times["backbone"].append(timed(lambda: backbone(ids)))
            for kind, refiner in refiners.items():
                for packed in (False, True):
                    name = f"{kind} {'packed' if packed else 'dense'}"
                    times.setdefault(name, []).append(timed(lambda r=refiner, p=packed: run(r, p)))
    med = {name: statistics.median(values) for name, values in times.items()}
    head, total = floors.lm_head_row_flops(config), floors.backbone_token_flops(config, args.length)
    t_call = med["backbone"]
    call_32 = floors.extrapolate_layers(t_call * head / total, t_call * (1 - head / total), 2)
    print(f"LLaDA-8B width, {args.dtype}, 1 thread, L = {args.length}, {args.active} refined rows, K = 4, "
          f"medians of {args.repeats}")
    print(f"  backbone call: {med['backbone']:.3f} s at 2 layers, {call_32.value:.3f} s {call_32.label}")
    for kind in refiners:
        dense, packed = med[f"{kind} dense"], med[f"{kind} packed"]
        share = 100 / call_32.value
        print(f"  {kind:4s} K=4: dense {dense * 1e3:8.1f} ms ({share * dense:5.2f}% of a 32-layer call), "
              f"packed {packed * 1e3:8.1f} ms ({share * packed:5.2f}%); dense - packed = "
              f"{share * (dense - packed):+.2f}% of a call")


if __name__ == "__main__":
    main()
