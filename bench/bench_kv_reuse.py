"""What the slot refiner's key/value reuse (`model.refiners.base.keys_values`) saves at LLaDA-8B width.

A single-block slot refiner (d_model 4096, d_inner 512, context width 4096) runs K = 4 packed steps (train
mode, timed under no_grad) on one sequence of `--length` rows, `--active` of them refined, with the reuse and
with every row's keys and values recomputed at every step; interleaved, medians of `--repeats`.

    .venv/bin/python bench/bench_kv_reuse.py [--length 160 --active 32 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llada_trm.model.refiners import build_refiner, slot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--active", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = 4096
    refiner = build_refiner("slot", d, num_steps=4, n_heads=4, n_blocks=1, delta_scale=0.5, context_dim=d)
    refiner.train()  # packing on (dropout is 0)
    h, context = torch.randn(1, args.length, d).bfloat16(), torch.randn(1, args.length, d).bfloat16()
    active = torch.zeros(1, args.length, dtype=torch.bool)
    active[:, -args.active :] = True
    real = slot.keys_values

    def recompute(block: torch.nn.Module, u: torch.Tensor, h: torch.Tensor, reuse: object) -> object:
        return block.keys_values(u)

    def run() -> None:
        x, state = h.float(), refiner.init_state(h)
        for _ in range(4):
            x, state, _ = refiner.step(x, state, context=context, active=active)

    times: dict[str, list[float]] = {"reuse": [], "recompute": []}
    with torch.no_grad():
        run()
        for _ in range(args.repeats):
            for name in times:
                slot.keys_values = real if name == "reuse" else recompute
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    slot.keys_values = real
    med = {name: statistics.median(values) for name, values in times.items()}
    saved = med["recompute"] - med["reuse"]
    print(f"slot refiner K=4 at d_model {d}, L = {args.length}, {args.active} refined rows, 1 thread: "
          f"reuse {med['reuse'] * 1e3:.1f} ms, recompute {med['recompute'] * 1e3:.1f} ms "
          f"(saves {1e3 * saved:.1f} ms, {100 * saved / med['recompute']:.1f}% of the refine)")


if __name__ == "__main__":
    main()
