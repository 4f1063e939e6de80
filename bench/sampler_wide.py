"""bench_sampler.py --wide: the recipe's sampling overhead at LLaDA-8B's width, against its floors.

A random backbone of LLaDA-8B's width and vocabulary (d 4096, 32 heads, SwiGLU 12288, V 126464) with
`--wide-layers` layers samples a few random prompts with the exact sampler, alone and with each refiner of
the recipe the study ships (issue 24: every chunk with a masked position refined, `chunk_selection: all`, no
halting, K = 4, delta_scale 0.5; the slot refiner at configs/tiny_refiner.yaml's widths and the MLP at
hidden_mult 2, both at d_model 4096, one hybrid with `integration: hybrid` switching `active_refiner`).
`--halting confidence` / `--wide-selection confidence` run the older selective variants instead. Variants
take turns prompt by prompt; the overhead is the median over prompts of (time with the refiner / time alone)
- 1. Beside it: the FLOP floor (flop_meter's counted rows x floors' per-row FLOPs over the backbone alone's
FLOPs), the part spent in LM-head reads inside refinement (0 for the recipe: its one output pass replaces
the backbone's), and the weight-read floor (the bytes of weights the added calls read over the backbone
alone's: what binds at batch 1). Then the same at 32 layers: the backbone alone's time is EXTRAPOLATED by
layer count (its per-layer and fixed parts split by their FLOPs), the added time carried over unchanged (the
refiner and the LM head do not grow with depth); the 32-layer floors are computed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

import floors
import torch
from flop_meter import FlopCount, FlopMeter
from refine_timer import RefineTimer
from wide import llada_8b_width, random_backbone

from llada_trm.build import hybrid_config
from llada_trm.config import load_config
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import sample
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.refiners.config import mlp_parameter_count

NONE = "no refiner"


class LMHeadTimer:
    """Wall time of the hybrid's `lm_head` calls (extra LM-head reads inside refinement: probes, step or
    refined-row logits; the recipe's one output pass is `output_head`, not timed here)."""

    def __init__(self, model: LLaDATRMHybrid) -> None:
        self.seconds = 0.0
        original = model.lm_head

        def timed(h: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = original(h)
            self.seconds += time.perf_counter() - start
            return out

        model.lm_head = timed


def build(args: argparse.Namespace, config_path: Any) -> LLaDATRMHybrid:
    """One hybrid holding both refiners (`integration: hybrid`); `active_refiner` picks the one that runs."""
    dtype = getattr(torch, args.dtype)
    backbone = random_backbone(llada_8b_width(args.wide_layers), dtype=dtype).to(args.device)
    base = hybrid_config(load_config(config_path))
    d = backbone.config.d_model
    update: dict[str, Any] = {
        "integration": "hybrid", "max_recursive_steps": 4, "chunk_selection": args.wide_selection,
        "halting": getattr(args, "halting", None) or "none", "confidence_threshold": 0.5,
        "delta_scale": 0.5,  # both refiners' (delta_clamp 0.5: the constant)
        # 2 x d_model wide (the run schema's MLP is capped at 1024): sized by its parameter count
        "mlp": base.mlp.model_copy(update={"param_budget": mlp_parameter_count(d, 2 * d)}),
    }  # fmt: skip
    torch.manual_seed(0)
    return LLaDATRMHybrid(backbone, base.model_copy(update=update)).eval()


def layer_split(config: Any, keys: int) -> tuple[float, float]:
    """(fixed, per-layer total) shares of a backbone token's FLOPs at `keys` keys: LM head vs layers."""
    total = floors.backbone_token_flops(config, keys)
    head = floors.lm_head_row_flops(config)
    return head / total, (total - head) / total


def run_wide(args: argparse.Namespace, config_path: Any) -> dict[str, Any]:
    model = build(args, config_path)
    bb = model.backbone.config
    refine_timer, head_timer, meter = RefineTimer(model), LMHeadTimer(model), FlopMeter(model)
    prompt_len, gen = args.wide_prompt, args.wide_gen
    options = SamplingOptions(steps=gen, gen_length=gen, block_length=gen, mask_id=bb.mask_token_id,
                              eos_id=bb.eos_token_id, eot_id=126348, batch_size=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 126000, (1, prompt_len), generator=g).to(args.device)
               for _ in range(args.wide_prompts)]
    kinds = list(model.refinement_head)
    names = [NONE, *(f"{kind} K=4" for kind in kinds)]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    refine_s: dict[str, list[float]] = {n: [] for n in names}
    head_s: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, FlopCount] = {}
    size = sum(p.numel() for p in model.backbone.parameters()) / 1e9
    cfg = model.config
    print(f"\nLLaDA-8B width, {args.wide_layers} layers, random weights ({size:.2f} B parameters, "
          f"{args.dtype}, {torch.get_num_threads()} thread(s)), {args.wide_prompts} prompts of {prompt_len} "
          f"tokens, exact sampler {gen} steps, batch 1; refiners: chunk_selection {cfg.chunk_selection}, "
          f"halting {cfg.halting}, K = 4")
    with torch.no_grad():
        sample(model, prompts[0], None, replace(options, steps=gen // 4 or 1))  # warm-up
        for i, prompt in enumerate(prompts):
            for name in names[i % len(names):] + names[: i % len(names)]:  # each variant first in turn
                kind = name.split()[0]
                if name != NONE:
                    model.active_refiner = kind
                meter.reset()
                refine_timer.seconds = head_timer.seconds = 0.0
                result = sample(model.backbone if name == NONE else model, prompt, None, options)
                seconds[name].append(result.elapsed_s)
                refine_s[name].append(refine_timer.seconds)
                head_s[name].append(head_timer.seconds)
                counts.setdefault(name, FlopCount()).add(meter.reset())
    return report(args, bb, seconds, refine_s, head_s, counts, prompt_len + gen,
                  {f"{k} K=4": model.refinement_head[k] for k in kinds})


def report(args: argparse.Namespace, bb: Any, seconds: dict, refine_s: dict, head_s: dict,
           counts: dict[str, FlopCount], length: int, refiners: dict[str, Any]) -> dict[str, Any]:
    base = counts[NONE]
    t_none = statistics.median(seconds[NONE])
    fixed, per_layer = layer_split(bb, length)
    layers = args.wide_layers
    t_none_32 = floors.extrapolate_layers(t_none * fixed, t_none * per_layer, layers)
    deep = replace(bb, n_layers=floors.LLADA_8B_LAYERS)
    scale = floors.backbone_token_flops(deep, length) / floors.backbone_token_flops(bb, length)
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"  backbone alone: median {t_none:.2f} s per sample at {layers} layers, {t_none_32.value:.2f} s "
          f"{t_none_32.label}; {base.backbone_calls} calls")
    print(f"\n{'':10s} {'depth':40s} {'K=4 adds':>9s} {'FLOP floor':>10s} {'ratio':>6s} "
          f"{'LM head in refine':>17s} {'weight-read floor':>17s} {'ratio':>6s}")
    table = []
    for name, refiner in refiners.items():
        c = counts[name]
        ratios = [t / t0 for t, t0 in zip(seconds[name], seconds[NONE], strict=True)]
        added = statistics.median(ratios) - 1
        added_s = statistics.median([t - t0 for t, t0 in zip(seconds[name], seconds[NONE], strict=True)])
        t_head = statistics.median(head_s[name])
        read_extra = c.lm_head_calls * floors.lm_head_weight_bytes(bb, element) + c.refiner_read_bytes
        read_floors = [read_extra / (base.backbone_calls * floors.backbone_weight_bytes(b, element))
                       for b in (bb, deep)]  # fmt: skip
        rows = [
            (f"measured, {layers} layers", added, (c.backbone + c.overhead) / base.backbone - 1,
             t_head / t_none, read_floors[0]),
            (t_none_32.label, added_s / t_none_32.value, c.overhead / (base.backbone * scale),
             t_head / t_none_32.value, read_floors[1]),
        ]
        mb = floors.weight_bytes(refiner) / 1e6
        print(f"{name}: refiner {mb:.0f} MB of weights read per step; rows x steps {c.refined_rows}, LM-head "
              f"rows inside refinement {c.lm_head_rows} ({c.lm_head_calls} calls), refiner steps "
              f"{c.refiner_calls}; inside refine {statistics.median(refine_s[name]):.2f} s (median)")
        for label, meas, floor, head, read_floor in rows:
            ratio = floors.measured_over_floor(meas, floor)
            read_ratio = floors.measured_over_floor(meas, read_floor)
            print(f"{name:10s} {label:40s} {100 * meas:+8.2f}% {100 * floor:+9.3f}% {ratio:6.2f} "
                  f"{100 * head:16.2f}% {100 * read_floor:+16.2f}% {read_ratio:6.2f}")
            table.append({"variant": name, "label": label, "overhead_measured": meas, "overhead_floor": floor,
                          "measured_over_floor": ratio, "lm_head_share": head,
                          "overhead_read_floor": read_floor, "measured_over_read_floor": read_ratio})
    return {"seconds": seconds, "refine_s": refine_s, "lm_head_s": head_s, "table": table,
            "counts": {name: vars(c) for name, c in counts.items()}}
