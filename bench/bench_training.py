"""Phase-1 training throughput with the frozen-backbone feature cache vs the backbone run live.

    .venv/bin/python bench/bench_training.py                  # embedded backbone + a LLaDA-8B-wide model
    .venv/bin/python bench/bench_training.py --quick          # about 2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_training.py --backbone DIR   # another checkpoint instead of the embedded one
    .venv/bin/python bench/bench_training.py --device cuda --mixed-precision bf16 --wide-layers 4   # a GPU

Two backbones: the given one (default: the embedded tiny backbone) with the refiner of
configs/tiny_refiner.yaml, and a randomly initialised model of LLaDA-8B's width (d_model 4096, 32 heads, MLP
12288) with only `--wide-layers` layers, to show how the ratio grows with the backbone's share of a step.

Each is trained for the same number of phase-1 steps three ways, in one process, from the same initial
refiner and optimizer state: `cached` (features read from a freshly built cache), `live` (the backbone run on
the very same batches: padded to the cache's length, with the cache's noise draws) and `live, batch padding`
(what the trainer does without a cache: each batch padded to its own longest example). A step is everything
the trainer does per optimizer step: fetch and collate the batch, draw the noise (live), the objective,
backward, clipping and AdamW. The first step of each path is not timed. `cached` and `live` see identical
inputs, so their loss curves must agree up to the cache's bf16 rounding; the benchmark prints the largest gap.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llada_trm.build import build_datasets, hybrid_config, resolve_backbone_dir
from llada_trm.config import RunConfig, load_config
from llada_trm.data.collate import collate_batch
from llada_trm.data.tokenizer import load_tokenizer
from llada_trm.diffusion.forward_process import draw_noise
from llada_trm.model.hybrid import LLaDATRMHybrid, chunk_sum
from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.training.feature_cache import (
    FeatureCache,
    backbone_fingerprint,
    cached_features,
    expected_manifest,
    write_feature_cache,
)
from llada_trm.training.freezing import apply_freezing
from llada_trm.training.loop import EpochSampler, build_optimizer
from llada_trm.training.objective import diffusion_objective

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_refiner.yaml"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="embedded", help="checkpoint directory, or 'embedded'")
    parser.add_argument("--config", default=str(CONFIG), help="run config giving the refiner and the data")
    parser.add_argument("--steps", type=int, default=24, help="phase-1 steps per path (small backbone)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's batch size")
    parser.add_argument("--wide-layers", type=int, default=2, help="layers of the LLaDA-8B-wide model")
    parser.add_argument("--wide-steps", type=int, default=6, help="phase-1 steps per path (wide model)")
    parser.add_argument("--wide-batch-size", type=int, default=4)
    parser.add_argument("--no-wide", action="store_true", help="skip the LLaDA-8B-wide model")
    parser.add_argument("--cache-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: no spin-waiting on a "
                        "shared CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the trainer's bf16 autocast around the cache build and every step")
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run of about 2 minutes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu")
    args.autocast = torch.bfloat16 if args.mixed_precision == "bf16" else None
    if args.quick:
        args.steps, args.wide_steps, args.wide_batch_size = 6, 3, 1
    return args


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One benchmarked model: its name in the report, the model, its run config and backbone directory."""

    name: str
    model: LLaDATRMHybrid
    config: RunConfig
    backbone_dir: Path


def small_case(args: argparse.Namespace) -> Case:
    """The given (default: embedded) backbone with the config's refiner, backbone in fp32 as on a CPU run."""
    directory = resolve_backbone_dir(args.backbone)
    config = load_config(args.config, [f"model.backbone={directory}"])
    model = LLaDATRMHybrid.from_pretrained(directory, hybrid_config(config), dtype=torch.float32)
    return Case(f"{directory.name} ({describe(model)})", model, config, directory)


def wide_case(args: argparse.Namespace, tokenizer_dir: Path) -> Case:
    """LLaDA-8B's width and heads, `--wide-layers` layers, random weights, the small backbone's vocab."""
    config = load_config(args.config, [f"model.backbone={tokenizer_dir}"])
    small = LLaDAConfig.from_json_file(tokenizer_dir / "config.json")
    reference = LLaDAConfig.llada_8b()
    wide = LLaDAConfig.from_dict(
        {
            **small.to_dict(),
            "d_model": reference.d_model,
            "n_heads": reference.n_heads,
            "n_kv_heads": reference.n_kv_heads,
            "mlp_hidden_size": reference.mlp_hidden_size,
            "rope_theta": reference.rope_theta,
            "n_layers": args.wide_layers,
        }
    )
    torch.manual_seed(0)
    backbone = LLaDAModel(wide)
    backbone.reset_parameters()
    model = LLaDATRMHybrid(backbone.eval(), hybrid_config(config))
    name = f"LLaDA-8B width, {args.wide_layers} layers ({describe(model)})"
    return Case(name, model, config, tokenizer_dir)


def describe(model: LLaDATRMHybrid) -> str:
    backbone = sum(p.numel() for p in model.backbone.parameters())
    refiner = sum(p.numel() for p in model.refinement_head.parameters())
    return f"backbone {backbone / 1e6:.1f}M, refiner {refiner / 1e6:.2f}M params"


# ----------------------------------------------------------------------------------------------- timing


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The trainer's mixed precision: autocast to `dtype` on `device` (off when None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def on_device(batch: dict, noise: tuple | None, device: torch.device) -> tuple[dict, tuple | None]:
    """The batch and its noise on `device`, as the trainer moves them before a step."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch, None if noise is None else tuple(x.to(device, non_blocking=True) for x in noise)


def train_path(
    model: LLaDATRMHybrid,
    config: RunConfig,
    batches: Iterator[tuple[dict, tuple | None, object]],
    steps: int,
    mixed: torch.dtype | None = None,
) -> tuple[list[float], list[float]]:
    """Run `steps` phase-1 steps from `batches` (batch, noise, features), under autocast to `mixed` when
    given; returns (losses, step seconds)."""
    t, p = config.training, config.training_params
    plan = apply_freezing(
        model, phase=1, trainable_modules=p.trainable_modules, lr=t.lr, backbone_lr=t.backbone_lr,
    )
    optimizer = build_optimizer(plan.groups, weight_decay=t.weight_decay, betas=t.adam_betas, eps=t.adam_eps)
    params = [q for group in optimizer.param_groups for q in group["params"]]
    model.train()
    model.backbone.eval()
    losses, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast(model.backbone.device, mixed):
            batch, noise, features = next(batches)
            result = diffusion_objective(
                model, batch, mask_id=model.mask_token_id, deep_supervision=p.deep_supervision_weight,
                orthogonality=p.orthogonality_weight, backbone_frozen=True, noise=noise, features=features,
            )
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(float(result.terms["loss"]))
    return losses, seconds


def live_batches(  # noqa: PLR0913 (the trainer's collate and noise knobs, each passed by name)
    dataset, order: list[list[int]], seed: int, mask_id: int, pad_to: int | None, device: torch.device
) -> Iterator:
    for indices in order:
        batch = collate_batch([dataset[i] for i in indices], dataset.pad_id, pad_to=pad_to)
        ids, prompts = batch["input_ids"], batch["prompt_lengths"]
        noise = draw_noise(ids, prompts, mask_id, seed=seed, examples=indices, draws=0)
        yield *on_device(batch, noise, device), None


def cached_batches(cache: FeatureCache, model: LLaDATRMHybrid, order: list[list[int]]) -> Iterator:
    loader = torch.utils.data.DataLoader(
        cache, batch_sampler=[[(i, 0) for i in indices] for indices in order], collate_fn=cache.collate
    )
    for batch in loader:
        batch, _ = on_device(batch, None, model.backbone.device)
        features, noise = cached_features(model, batch)
        yield batch, noise, features


@torch.no_grad()
def selection_changes(model: LLaDATRMHybrid, cache: FeatureCache, dataset, order: list[list[int]]) -> tuple:
    """(chunks whose refine/skip decision differs between cached and live features, chunks with a mask).

    With a bf16 cache the chunk confidence is recomputed from rounded hidden states, so a chunk whose
    confidence sits right at the threshold may flip; this counts how often that happens.
    """
    model.eval()
    changed = total = 0
    seed, device = cache.manifest["noise"]["seed"], model.backbone.device
    live = live_batches(dataset, order, seed, model.mask_token_id, cache.seq_len, device)
    for (_, noise, features), (_, live_noise, _) in zip(
        cached_batches(cache, model, order), live, strict=True
    ):
        cached_refined = model.refine(features, noise[1]).stats["steps_per_chunk"] > 0
        live_refined = model(live_noise[0], masked=live_noise[1]).stats["steps_per_chunk"] > 0
        changed += int((cached_refined != live_refined).sum())
        total += int((chunk_sum(noise[1].float(), model.config.chunk_size) > 0).sum())
    return changed, total


def run_case(  # noqa: PLR0913 (knobs of one benchmark case, each passed by name)
    case: Case, *, steps: int, batch_size: int, cache_dtype: torch.dtype, workdir: Path,
    trainer_padding: bool = True, extrapolate: bool = False, check_selection: bool = True,
    mixed: torch.dtype | None = None,
) -> dict:
    """Build the cache, then train the paths (`trainer_padding`: also the live trainer's padding).

    `extrapolate`: also estimate the speed-up at LLaDA-8B's depth (32 layers of the same width).
    `check_selection`: count chunk refine/skip decisions that differ between cached and live features.
    """
    name, model, config, backbone_dir = case.name, case.model, case.config, case.backbone_dir
    print(f"\n== {name}: {steps} steps of batch {batch_size}", flush=True)
    tokenizer = load_tokenizer(backbone_dir)
    data = config.data.model_copy(update={"n_train": steps * batch_size, "n_eval": 0})
    dataset, _ = build_datasets(data, tokenizer)
    order_flat = EpochSampler(len(dataset), seed=config.training.seed).indices()
    order = [order_flat[i : i + batch_size] for i in range(0, len(order_flat), batch_size)][:steps]
    seed = config.training.seed
    fingerprint = (
        backbone_fingerprint(backbone_dir) if model.backbone.config.d_model < 4096 else f"random-init/{name}"
    )
    manifest = expected_manifest(
        model, backbone=fingerprint, examples=dataset.examples, pad_id=dataset.pad_id, seed=seed, draws=1,
        cache_dtype=cache_dtype, compute="float32",
    )
    start = time.perf_counter()
    device = model.backbone.device
    cache = write_feature_cache(
        model, dataset.examples, workdir / "cache", manifest, pad_id=dataset.pad_id, batch_size=batch_size,
        device=device, autocast_dtype=mixed, progress=False,
    )
    build_s = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in cache.directory.glob("*.safetensors"))
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    batch_max = statistics.mean(max(lengths[i] for i in indices) for indices in order)
    print(
        f"   cache: {len(dataset)} examples padded to {cache.seq_len} tokens (mean batch-max length "
        f"{batch_max:.0f}), {stored / 2**20:.1f} MiB, built in {build_s:.1f} s", flush=True,
    )

    initial = copy.deepcopy(model.refinement_head.state_dict())
    paths: dict[str, Callable[[], Iterator]] = {
        "cached": lambda: cached_batches(cache, model, order),
        "live": lambda: live_batches(dataset, order, seed, model.mask_token_id, cache.seq_len, device),
    }
    if trainer_padding:
        paths["live, batch padding"] = lambda: live_batches(
            dataset, order, seed, model.mask_token_id, None, device
        )
    results: dict[str, dict] = {}
    for path, make in paths.items():
        model.refinement_head.load_state_dict(initial)
        losses, seconds = train_path(model, config, make(), steps, mixed)
        timed = seconds[1:] if len(seconds) > 1 else seconds
        results[path] = {"losses": losses, "steps_per_s": len(timed) / sum(timed)}
        print(f"   {path:>20}: {results[path]['steps_per_s']:8.3f} steps/s", flush=True)
    model.refinement_head.load_state_dict(initial)
    changed, chunks = None, None
    if check_selection:
        with autocast(device, mixed):
            changed, chunks = selection_changes(model, cache, dataset, order)

    cached, live = results["cached"], results["live"]
    gaps = [abs(a - b) for a, b in zip(cached["losses"], live["losses"], strict=True)]
    relative = max(g / abs(b) for g, b in zip(gaps, live["losses"], strict=True))
    trainer = results.get("live, batch padding", live)
    # Depth extrapolation: the live-minus-cached time is the backbone's; LLaDA-8B has 32 such layers.
    layers = model.backbone.config.n_layers
    per_layer = (1 / live["steps_per_s"] - 1 / cached["steps_per_s"]) / layers
    at_32 = (1 / cached["steps_per_s"] + 32 * per_layer) * cached["steps_per_s"]
    summary = {
        "case": name,
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": cache.seq_len,
        "cache_mib": stored / 2**20,
        "cache_build_s": build_s,
        "steps_per_s": {path: r["steps_per_s"] for path, r in results.items()},
        "speedup_same_batches": cached["steps_per_s"] / live["steps_per_s"],
        "speedup_vs_live_trainer": cached["steps_per_s"] / trainer["steps_per_s"],
        "speedup_extrapolated_32_layers": at_32 if extrapolate else None,
        "loss_max_abs_gap": max(gaps),
        "loss_max_rel_gap": relative,
        "loss_first_last": {path: [r["losses"][0], r["losses"][-1]] for path, r in results.items()},
        "chunk_selection_changed": [changed, chunks],
    }
    versus = f", {summary['speedup_vs_live_trainer']:.1f}x vs the live trainer's batch padding"
    deeper = f"; {at_32:.0f}x extrapolated to 32 layers of this width" if extrapolate else ""
    print(
        f"   speed-up: {summary['speedup_same_batches']:.1f}x on the same batches"
        f"{versus if trainer_padding else ''}{deeper}",
        flush=True,
    )
    print(
        f"   loss curves (cached vs live, same noise): max |gap| {summary['loss_max_abs_gap']:.2e} "
        f"(relative {relative:.1e}); first/last cached {cached['losses'][0]:.4f}/{cached['losses'][-1]:.4f}, "
        f"live {live['losses'][0]:.4f}/{live['losses'][-1]:.4f}", flush=True,
    )
    if changed is not None:
        print(f"   chunk selection: {changed} of {chunks} chunks with a masked position decided differently "
              f"(threshold {model.config.confidence_threshold})", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_dtype = DTYPES[args.cache_dtype]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.device}, {args.mixed_precision}, "
          f"cache dtype {args.cache_dtype}{', quick' if args.quick else ''}")
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        case = small_case(args)
        case.model.to(args.device)
        directory = case.backbone_dir
        batch = args.batch_size or case.config.training.batch_size
        summaries.append(run_case(case, steps=args.steps, batch_size=batch, cache_dtype=cache_dtype,
                                  workdir=Path(tmp) / "small", mixed=args.autocast))
        del case
        if not args.no_wide:
            wide = wide_case(args, directory)
            wide.model.to(args.device)
            summaries.append(run_case(wide, steps=args.wide_steps,
                                      batch_size=args.wide_batch_size, cache_dtype=cache_dtype,
                                      workdir=Path(tmp) / "wide", trainer_padding=not args.quick,
                                      extrapolate=True, check_selection=False, mixed=args.autocast))
    print("\nphase-1 steps/s   cached      live  live(batch pad)   speed-up: same batches, vs trainer")
    for s in summaries:
        rate = s["steps_per_s"]
        padded = rate.get("live, batch padding")
        padded_text = f"{padded:15.3f}" if padded else f"{'-':>15}"
        print(f"  {s['case']}\n  {'':15}{rate['cached']:8.3f}  {rate['live']:8.3f}  {padded_text}   "
              f"{s['speedup_same_batches']:10.1f}x  {s['speedup_vs_live_trainer']:9.1f}x")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))
    ok = all(math.isfinite(s["loss_max_abs_gap"]) for s in summaries)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
