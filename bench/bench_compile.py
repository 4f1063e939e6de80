"""`advanced.compile_refiner` measured: eager vs `torch.compile`d refiner steps, side by side in one process.

    PYTHONPATH=src .venv/bin/python bench/bench_compile.py                    # both shapes, both measures
    PYTHONPATH=src .venv/bin/python bench/bench_compile.py --shapes embedded --measures refine
    PYTHONPATH=src .venv/bin/python bench/bench_compile.py --device cuda      # a GPU (untested here)

Two shapes: the embedded default (the packaged 1.4M backbone, d 128, with configs/tiny_refiner.yaml's slot
refiner) and LLaDA-8B's width (a random 1-layer backbone of d 4096 with the embedded vocabulary, the same
refiner settings: d_inner 512, context 4096). Two measures, each on the same features and noise:
`refine`, the hybrid's K-step selective refinement under no_grad (what sampling runs every model call), and
`phase-1 step`, the cached phase-1 training step: `diffusion_objective` on stored features plus backward
(the trainer's step on the feature cache, less AdamW). Eager and compiled take turns call by call (the
compiled refiner is the same module with its `step` swapped, `refiners.base.compile_refiner_steps`), the
median is reported; the compiled path's first call (tracing and code generation) is reported separately, with
the calls it takes to earn it back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from wide import llada_8b_width, random_backbone

from llada_trm.assets import embedded_backbone_dir
from llada_trm.backbone.config import LLaDAConfig
from llada_trm.backbone.modeling import LLaDAModel
from llada_trm.build import hybrid_config
from llada_trm.config import load_config
from llada_trm.hybrid.model import LLaDATRMHybrid
from llada_trm.refiners.base import ATTRIBUTE, compile_refiner_steps
from llada_trm.training.objective import LossWeights, diffusion_objective

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_refiner.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="embedded,wide", help="embedded and/or wide")
    parser.add_argument("--measures", default="refine,phase1", help="refine and/or phase1")
    parser.add_argument("--k", type=int, default=4, help="refiner steps K")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="positions per row")
    parser.add_argument("--masked", type=float, default=0.3, help="fraction of masked positions")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per path (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.measures = [m for m in args.measures.split(",") if m]
    if set(args.shapes) - {"embedded", "wide"} or set(args.measures) - {"refine", "phase1"}:
        parser.error("--shapes: embedded, wide; --measures: refine, phase1")
    return args


def build(shape: str, args: argparse.Namespace) -> LLaDATRMHybrid:
    config = hybrid_config(load_config(CONFIG)).model_copy(
        update={"max_recursive_steps": args.k, "confidence_threshold": 2.0}  # every chunk with a mask
    )
    directory = embedded_backbone_dir()
    if shape == "embedded":
        backbone = LLaDAModel.from_pretrained(directory, dtype=torch.float32)
    else:
        backbone = random_backbone(llada_8b_width(1, LLaDAConfig.from_json_file(directory / "config.json")))
    torch.manual_seed(0)
    return LLaDATRMHybrid(backbone.to(args.device), config)


def inputs(model: LLaDATRMHybrid, args: argparse.Namespace) -> tuple[dict, tuple, object]:
    """A batch, its noise and the frozen backbone's features of the noised batch (what the cache stores)."""
    g = torch.Generator().manual_seed(1)
    vocab, device = model.backbone.config.vocab_size, model.backbone.device
    ids = torch.randint(3, vocab, (args.batch_size, args.length), generator=g)
    masked = torch.rand(args.batch_size, args.length, generator=g) < args.masked
    masked[:, : args.length // 4] = False  # a prompt
    noisy = torch.where(masked, model.mask_token_id, ids)
    p_mask = torch.full(ids.shape, args.masked)
    batch = {
        "input_ids": ids.to(device),
        "prompt_lengths": torch.full((args.batch_size,), args.length // 4, device=device),
        "answer_lengths": torch.full((args.batch_size,), args.length - args.length // 4, device=device),
    }
    noise = (noisy.to(device), masked.to(device), p_mask.to(device))
    with torch.no_grad():
        features = model.features(noise[0])
    return batch, noise, features


def timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(model: LLaDATRMHybrid, name: str, args: argparse.Namespace) -> dict:
    batch, noise, features = inputs(model, args)
    weights = LossWeights()

    def refine() -> None:
        model.eval()
        with torch.no_grad():
            model.refine(features, noise[1])

    def phase1() -> None:
        model.train()
        model.backbone.eval()
        result = diffusion_objective(model, batch, mask_id=model.mask_token_id, weights=weights,
                                     backbone_frozen=True, chunk_size=model.config.chunk_size,
                                     noise=noise, features=features)
        result.loss.backward()
        model.refinement_head.zero_grad(set_to_none=True)

    fn = refine if name == "refine" else phase1
    device = model.backbone.device
    refiners = list(model.refinement_head.values())
    eager_steps = [r.__dict__.get(ATTRIBUTE, r.step) for r in refiners]
    compiled_steps = [r.__dict__["step"] for r in refiners]

    def use(steps) -> None:
        for refiner, step in zip(refiners, steps, strict=True):
            refiner.__dict__["step"] = step

    use(eager_steps)
    fn()  # warm-up, eager
    use(compiled_steps)
    first = timed(fn, device)  # tracing + code generation + one call
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for path, steps in (("eager", eager_steps), ("compiled", compiled_steps)):
            use(steps)
            times[path].append(timed(fn, device))
    use(compiled_steps)
    eager, compiled = (statistics.median(times[p]) for p in ("eager", "compiled"))
    saved = eager - compiled
    return {
        "measure": name, "eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled,
        "first_compiled_call_s": first, "break_even_calls": first / saved if saved > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads; K={args.k}, batch "
          f"{args.batch_size} x {args.length}, {args.masked:.0%} masked, every chunk with a mask refined; "
          f"median of {args.repeats} interleaved calls")
    results = []
    for shape in args.shapes:
        model = build(shape, args)
        if not compile_refiner_steps(model.refinement_head.values(), model.backbone.device):
            print("torch.compile cannot run here: nothing to compare")
            return 1
        bb, slot = model.backbone.config, model.refinement_head["slot"].config
        label = f"{shape} (backbone d {bb.d_model}, refiner d_inner {slot.d_inner}, K {args.k})"
        for name in args.measures:
            row = {"shape": label, **measure(model, name, args)}
            results.append(row)
            print(f"  {label} {name}: eager {1e3 * row['eager_s']:.1f} ms, compiled "
                  f"{1e3 * row['compiled_s']:.1f} ms ({row['speedup']:.2f}x); first compiled call "
                  f"{row['first_compiled_call_s']:.0f} s", flush=True)
        del model
    print(f"\n{'shape':58s} {'measure':8s} {'eager ms':>9s} {'compiled ms':>11s} {'speed-up':>8s} "
          f"{'1st call s':>10s} {'break-even calls':>16s}")
    for r in results:
        even = f"{r['break_even_calls']:.0f}" if r["break_even_calls"] else "never"
        print(f"{r['shape']:58s} {r['measure']:8s} {1e3 * r['eager_s']:9.1f} {1e3 * r['compiled_s']:11.1f} "
              f"{r['speedup']:7.2f}x {r['first_compiled_call_s']:10.0f} {even:>16s}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
