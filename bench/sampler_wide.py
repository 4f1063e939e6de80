"""bench_sampler.py --wide: the refiner's sampling overhead at LLaDA-8B's width, against its FLOP floor.

A random backbone of LLaDA-8B's width and vocabulary (d 4096, 32 heads, SwiGLU 12288, V 126464) with
`--wide-layers` layers samples a few random prompts with the exact sampler, alone and with the slot refiner
(configs/tiny_refiner.yaml's settings at d_model 4096) at K = 4, selective (confidence_threshold 0.5; the
random LM head is never confident, so every chunk holding a masked position of the current block is refined
and never halts: the most LM-head probing K = 4 can do). Variants take turns call by call. Measured: the
sampling time each adds over the backbone alone, the part of it spent in the LM head inside refinement
(halting probes + the refined rows' logits), each against its floor (flop_meter's counted rows x floors'
per-row FLOPs, over the backbone alone's FLOPs) and against the weight-read floor (the bytes of weights the
added calls read, over the backbone alone's: what binds at batch 1). Then the same at 32 layers: the
backbone alone's time is EXTRAPOLATED by layer count (its per-layer and fixed parts split by their
FLOPs), the added time carried over unchanged (the refiner and the LM head do not grow with depth); the
32-layer floors are computed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import floors
import torch
from flop_meter import FlopCount, FlopMeter
from refine_timer import RefineTimer
from wide import llada_8b_width, random_backbone

from llada_trm.config import load_config
from llada_trm.diffusion import SamplingOptions, sample
from llada_trm.hybrid import LLaDATRMHybrid
from llada_trm.training import hybrid_config


class LMHeadTimer:
    """Wall time of the hybrid's `lm_head` calls (made only inside refinement: probes and refined logits)."""

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
    dtype = getattr(torch, args.dtype)
    backbone = random_backbone(llada_8b_width(args.wide_layers), dtype=dtype).to(args.device)
    update: dict[str, Any] = {"max_recursive_steps": 4, "confidence_threshold": 0.5}
    if getattr(args, "halting", None):
        update["halting"] = args.halting
    config = hybrid_config(load_config(config_path)).model_copy(update=update)
    torch.manual_seed(0)
    return LLaDATRMHybrid(backbone, config).eval()


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
    variants = {"no refiner": model.backbone, "K=4 selective 0.5": model}
    seconds = {name: [] for name in variants}
    refine_s, head_s, counts = {n: [] for n in variants}, {n: [] for n in variants}, {}
    size = sum(p.numel() for p in model.backbone.parameters()) / 1e9
    print(f"\nLLaDA-8B width, {args.wide_layers} layers, random weights ({size:.2f} B parameters, "
          f"{args.dtype}), "
          f"{args.wide_prompts} prompts of {prompt_len} tokens, exact sampler {gen} steps, batch 1")
    with torch.no_grad():
        sample(model, prompts[0], None, replace(options, steps=gen // 4 or 1, gen_length=gen,
                                                block_length=gen))  # warm-up
        for prompt in prompts:
            for name, m in variants.items():
                meter.reset()
                refine_timer.seconds = head_timer.seconds = 0.0
                result = sample(m, prompt, None, options)
                seconds[name].append(result.elapsed_s)
                refine_s[name].append(refine_timer.seconds)
                head_s[name].append(head_timer.seconds)
                counts.setdefault(name, FlopCount()).add(meter.reset())
    return report(args, bb, seconds, refine_s, head_s, counts, prompt_len + gen)


def report(args: argparse.Namespace, bb: Any, seconds: dict, refine_s: dict, head_s: dict,
           counts: dict[str, FlopCount], length: int) -> dict[str, Any]:
    none, ref = "no refiner", "K=4 selective 0.5"
    t_none, t_ref = sum(seconds[none]), sum(seconds[ref])
    t_head, t_refine = sum(head_s[ref]), sum(refine_s[ref])
    base, c = counts[none], counts[ref]
    added = t_ref / t_none - 1
    floor_all = floors.Floor(c.backbone + c.overhead, base.backbone).fraction - 1
    floor_head = floors.Floor(c.lm_head, base.backbone).fraction
    fixed, per_layer = layer_split(bb, length)
    layers = args.wide_layers
    t_none_32 = floors.extrapolate_layers(t_none * fixed, t_none * per_layer, layers)
    deep = replace(bb, n_layers=floors.LLADA_8B_LAYERS)
    scale = floors.backbone_token_flops(deep, length) / floors.backbone_token_flops(bb, length)
    added_s = t_ref - t_none
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    read_extra = c.lm_head_calls * floors.lm_head_weight_bytes(bb, element) + c.refiner_read_bytes
    read_floors = [read_extra / (base.backbone_calls * floors.backbone_weight_bytes(b, element))
                   for b in (bb, deep)]  # fmt: skip
    rows = [
        ("measured", f"{layers} layers", added, floor_all, t_head / t_none, floor_head, read_floors[0]),
        (t_none_32.label, "32 layers", added_s / t_none_32.value, c.overhead / (base.backbone * scale),
         t_head / t_none_32.value, c.lm_head / (base.backbone * scale), read_floors[1]),
    ]
    print(f"  backbone alone {t_none:.1f} s, with the refiner {t_ref:.1f} s (inside refine {t_refine:.1f} s, "
          f"of which LM head {t_head:.1f} s); refined rows x steps {c.refined_rows}, LM-head rows "
          f"{c.lm_head_rows}; backbone rows {int(base.backbone / floors.backbone_token_flops(bb, length))}")
    print(f"  calls: backbone {base.backbone_calls}, LM head inside refinement {c.lm_head_calls}, refiner "
          f"steps {c.refiner_calls}; the weight-read floor prices each by the bytes it reads")
    print(f"\n{'':44s} {'depth':9s} {'K=4 adds':>9s} {'floor':>8s} {'ratio':>6s} "
          f"{'LM head in refine':>17s} {'floor':>8s} {'ratio':>6s} {'weight-read floor':>17s} {'ratio':>6s}")
    table = []
    for label, depth, meas, floor, head, head_floor, read_floor in rows:
        ratio = floors.measured_over_floor(meas, floor)
        head_ratio = floors.measured_over_floor(head, head_floor)
        read_ratio = floors.measured_over_floor(meas, read_floor)
        print(f"{label:44s} {depth:9s} {100 * meas:+8.2f}% {100 * floor:+7.3f}% {ratio:6.2f} "
              f"{100 * head:16.2f}% {100 * head_floor:7.3f}% {head_ratio:6.2f} {100 * read_floor:+16.2f}% "
              f"{read_ratio:6.2f}")
        table.append({"label": label, "depth": depth, "overhead_measured": meas, "overhead_floor": floor,
                      "measured_over_floor": ratio, "lm_head_share": head, "lm_head_floor": head_floor,
                      "lm_head_over_floor": head_ratio, "overhead_read_floor": read_floor,
                      "measured_over_read_floor": read_ratio})
    return {"seconds": seconds, "refine_s": refine_s, "lm_head_s": head_s, "table": table,
            "refined_rows": c.refined_rows, "lm_head_rows": c.lm_head_rows, "lm_head_calls": c.lm_head_calls,
            "backbone_calls": base.backbone_calls, "refiner_calls": c.refiner_calls}
