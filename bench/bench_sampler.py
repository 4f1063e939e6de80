"""Sampler throughput, NFE and accuracy: exact LLaDA vs threshold decoding vs threshold + KV caches.

Every variant runs in this one process on the same problems (the generated task's test split, rebuilt from the
backbone's `pretrain_summary.json`), interleaved batch by batch so that all see the same machine load; the
printed ratios compare like with like. Two parts:

1. decoding modes, with the backbone alone and with the slot refiner inside every denoising step: the exact
   LLaDA schedule (default one token per step, the baseline of Fast-dLLM's GSM8K figures), threshold decoding,
   threshold + prefix cache, threshold + dual cache. tokens/s counts all `gen_length` positions (EOS padding
   included), NFE is model calls per batch;
2. the refiner's share of sampling time at K = 1, 2, 4, 8, refining only low-confidence chunks
   (confidence_threshold 0.5) or every chunk with a masked position (threshold 2.0, i.e. > 1), and the
   time each adds over the backbone alone with the same sampler (`vs none`), against its floor: the FLOPs
   the counted rows force (refined rows x K x refiner FLOPs per row + LM-head rows x d x V, plus any change
   in backbone calls) over the backbone alone's FLOPs, and the ratio measured / floor (see floors.py).

The refiner's time is measured by timing `LLaDATRMHybrid.refine` (chunk selection, K steps, LM head on the
refined rows) inside the sampler's own calls; its share is that time over the sampler's wall time.

Part 1 also runs the hybrid with no refiner built (what a user of the hybrid without a trained refiner runs)
and prints, per variant and batch size (`--batch-sizes 1,16`), the time per model call split into the
backbone, the refiner, the hybrid's wrapper (the rest of its forward) and the sampler's bookkeeping (the rest
of the wall time; `call_timer.py`), so that a regression against the backbone alone shows where it is.

    .venv/bin/python bench/bench_sampler.py --quick
    .venv/bin/python bench/bench_sampler.py --batch-sizes 1,16 --no-share   # the per-call split only
    .venv/bin/python bench/bench_sampler.py --checkpoint runs/compare/seed0/slot   # a trained refiner
    .venv/bin/python bench/bench_sampler.py --backbone DIR --refiner-checkpoint refiner.safetensors
    .venv/bin/python bench/bench_sampler.py --wide     # LLaDA-8B width, random weights (sampler_wide.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import floors
import torch
from call_timer import CallSplit, CallTimer
from flop_meter import FlopCount, FlopMeter
from refine_timer import RefineTimer

from llada_trm.assets import embedded_backbone_dir
from llada_trm.build import hybrid_config
from llada_trm.config import load_config
from llada_trm.data.collate import prompt_batch
from llada_trm.data.gsm8k import GSM8KRecord
from llada_trm.data.synthetic import SyntheticTaskConfig, generate_problems
from llada_trm.data.tokenizer import decode_generated, load_tokenizer, special_token_ids
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.diffusion.sampler import add_stats, sample
from llada_trm.evaluate.extraction import is_correct
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.llada import LLaDAModel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFINER_CONFIG = ROOT / "configs" / "tiny_refiner.yaml"
TASK_FIELDS = ("min_steps", "max_steps", "max_number", "max_result", "seed")
NO_REFINER = "no refiner"
SECTIONS = ("backbone alone", "hybrid, no refiner built", "backbone + slot refiner inside every step")


@dataclass(frozen=True)
class Mode:
    """One sampler setting: `threshold` None is LLaDA's fixed schedule; `cache` None runs full sequences."""

    name: str
    threshold: float | None = None
    cache: str | None = None


def modes(threshold: float) -> list[Mode]:
    return [
        Mode("exact"),
        Mode(f"threshold {threshold}", threshold=threshold),
        Mode(f"threshold {threshold} + prefix cache", threshold=threshold, cache="prefix"),
        Mode(f"threshold {threshold} + dual cache", threshold=threshold, cache="dual"),
    ]


@dataclass
class Variant:
    """A model, a sampler mode and (for the hybrid) the config to run it with; accumulates its results."""

    label: str
    model: Any
    mode: Mode
    hybrid_config: HybridConfig | None = None
    elapsed: list[float] = field(default_factory=list)  # per repeat: summed over batches
    nfe: int = 0
    sequence_calls: int = 0  # rows x model calls: the TPF denominator
    batches: int = 0
    tokens: int = 0
    strict: int = 0
    flexible: int = 0
    refine_s: list[float] = field(default_factory=list)
    splits: list[CallSplit] = field(default_factory=list)  # per repeat: summed over batches
    stats: dict[str, float] = field(default_factory=dict)
    flops: FlopCount = field(default_factory=FlopCount)  # counted on the first repeat
    batch_size: int | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", type=Path, default=None,
                        help="backbone directory (default: the packaged tiny backbone)")
    parser.add_argument("--refiner-config", type=Path, default=DEFAULT_REFINER_CONFIG,
                        help="run config whose `model` section builds the hybrid (tiny_refiner.yaml)")
    parser.add_argument("--refiner-checkpoint", type=Path, default=None,
                        help="refiner weights written by LLaDATRMHybrid.save_refiner (default: random)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained run (its directory or checkpoints/last): its backbone, refiner "
                        "config and weights replace --backbone, --refiner-config, --refiner-checkpoint")
    parser.add_argument("--n-problems", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-sizes", default=None,
                        help="batch sizes of the decoding-mode tables and the per-call split, "
                        "comma-separated (default: --batch-size); the share table uses --batch-size")
    parser.add_argument("--no-share", action="store_true", help="skip the refiner share table")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="clock of the per-call split: wall (perf_counter) or cpu (this thread's CPU "
                        "time; steadier on a shared CPU, one torch thread only)")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the exact sampler (default gen_length: one token per step, the "
                        "baseline of LLaDA's and Fast-dLLM's GSM8K numbers)")
    parser.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM's confidence threshold")
    parser.add_argument("--ks", default="1,2,4,8", help="refiner steps K for the share table")
    parser.add_argument("--selective", default="0.5",
                        help="chunk confidence thresholds of the share table's selective variants, "
                        "comma-separated (chunks below it are refined)")
    parser.add_argument("--share-modes", default=None,
                        help="sampler modes of the share table, comma-separated: exact (fixed schedule) "
                        "and/or prefix (threshold + prefix cache); default both, exact with --quick")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats; the fastest one is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="backbone dtype (default float32; bfloat16 with --wide)")
    parser.add_argument("--wide", action="store_true",
                        help="only the LLaDA-8B-width mode: K=4 selective overhead and LM-head cost vs "
                        "floor, extrapolated to 32 layers (bench/sampler_wide.py)")
    parser.add_argument("--wide-layers", type=int, default=2)
    parser.add_argument("--halting", default=None, choices=("confidence", "none"),
                        help="the refiners' halting rule with --wide (default none: the recipe)")
    parser.add_argument("--wide-selection", default="all", choices=("all", "confidence"),
                        help="chunk selection with --wide (default all: the recipe)")
    parser.add_argument("--wide-prompts", type=int, default=3, help="prompts (batch 1 each)")
    parser.add_argument("--wide-prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--wide-gen", type=int, default=16, help="generated positions (one block)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--quick", action="store_true",
                        help="4 problems in one batch, gen_length 64 in blocks of 16, share table on the "
                        "exact sampler only: a minute or two on an idle CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.wide else "float32")
    if args.quick:
        args.n_problems, args.batch_size, args.gen_length, args.block_length = 4, 4, 64, 16
    if args.steps is None:
        args.steps = args.gen_length
    if args.share_modes is None:
        args.share_modes = "exact" if args.quick else "exact,prefix"
    args.ks = [int(k) for k in args.ks.split(",") if k]
    try:
        args.batch_sizes = [int(b) for b in (args.batch_sizes or str(args.batch_size)).split(",") if b]
    except ValueError:
        parser.error(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: give positive batch sizes, e.g. 1,16")
    args.selective = [float(t) for t in args.selective.split(",") if t]
    args.share_modes = [m for m in args.share_modes.split(",") if m]
    unknown = sorted(set(args.share_modes) - {"exact", "prefix"})
    if unknown:
        parser.error(f"--share-modes: unknown {unknown}; choose from exact, prefix")
    try:
        sampling_options(args, Mode("exact"), special_ids=None)
    except ValueError as error:
        parser.error(str(error))
    return args


def sampling_options(args: argparse.Namespace, mode: Mode, special_ids: Any) -> SamplingOptions:
    """Greedy sampling in `mode` with the command line's lengths and steps (and the tokenizer's ids)."""
    ids = {}
    if special_ids is not None:
        ids = dict(mask_id=special_ids.mask, eos_id=special_ids.eos, eot_id=special_ids.eot)
    return SamplingOptions(
        steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
        threshold=mode.threshold, cache=mode.cache, batch_size=args.batch_size, **ids,
    )


def test_problems(backbone_dir: Path, n: int) -> list[GSM8KRecord]:
    """The generated task's test problems, with the settings the backbone was trained on when recorded."""
    summary = backbone_dir / "pretrain_summary.json"
    task = SyntheticTaskConfig()
    if summary.is_file():
        data = json.loads(summary.read_text())["config"]["data"]
        task = SyntheticTaskConfig(**{k: data[k] for k in TASK_FIELDS if k in data})
    else:
        print(f"note: {summary} not found; using the default task settings", file=sys.stderr)
    return generate_problems(task, n, split="test")


def run_interleaved(
    variants: list[Variant], tokenizer: Any, records: list[GSM8KRecord], args: argparse.Namespace, ids: Any,
    timer: RefineTimer | None = None, meter: FlopMeter | None = None, calls: CallTimer | None = None,
) -> None:
    """Greedy sampling of every problem with every variant, the variants interleaved batch by batch.

    Interleaving puts every variant under the same machine load, so their ratios hold on a shared CPU.
    """
    device = torch.device(args.device)
    batches = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        prompt, attention_mask = prompt_batch(tokenizer, [r.question for r in chunk])
        batches.append((chunk, prompt.to(device), attention_mask.to(device)))
    for repeat in range(args.repeats):
        for variant in variants:
            variant.elapsed.append(0.0)
            variant.refine_s.append(0.0)
            variant.splits.append(CallSplit())
        for chunk, prompt, attention_mask in batches:
            for variant in variants:
                if variant.hybrid_config is not None:
                    variant.model.config = variant.hybrid_config  # weights do not depend on K or threshold
                options = sampling_options(args, variant.mode, ids)
                result = timed_sample(variant, prompt, attention_mask, options, timer, meter, calls)
                if repeat:  # tokens are the same in every repeat: score the first only
                    continue
                if meter is not None:
                    variant.flops.add(meter.reset())
                texts = decode_generated(tokenizer, result.tokens.cpu(), result.prompt_length)
                variant.strict += sum(is_correct(t, r.answer) for t, r in zip(texts, chunk, strict=True))
                variant.flexible += sum(
                    is_correct(t, r.answer, flexible=True) for t, r in zip(texts, chunk, strict=True)
                )
                variant.nfe += result.nfe
                variant.sequence_calls += result.generated.shape[0] * result.nfe
                variant.batches += 1
                variant.tokens += result.generated.numel()
                add_stats(variant.stats, result.model_stats_total)


def timed_sample(  # noqa: PLR0913 - the run's three optional meters ride along
    variant: Variant, prompt: torch.Tensor, attention_mask: torch.Tensor, options: SamplingOptions,
    timer: RefineTimer | None, meter: FlopMeter | None, calls: CallTimer | None,
) -> Any:
    """One `sample` call of `variant`, its times added to the variant's current repeat."""
    if timer is not None:
        timer.seconds = 0.0
    if meter is not None:
        meter.reset()
    if calls is None:
        result = sample(variant.model, prompt, attention_mask, options)
    else:
        result, split = calls.sample(variant.model, prompt, attention_mask, options)
        variant.splits[-1].add(split)
    variant.elapsed[-1] += result.elapsed_s
    if timer is not None:
        variant.refine_s[-1] += timer.seconds
    return result


def summary(variant: Variant, n_problems: int) -> dict[str, Any]:
    best = min(range(len(variant.elapsed)), key=variant.elapsed.__getitem__)
    elapsed = variant.elapsed[best]
    calls = max(1, variant.nfe)
    return {
        "variant": variant.label,
        "mode": variant.mode.name,
        "elapsed_s": elapsed,
        "tokens_per_s": variant.tokens / elapsed,
        "nfe_per_batch": variant.nfe / variant.batches,
        "tokens_per_forward": variant.tokens / max(1, variant.sequence_calls),
        "nfe": variant.nfe,
        "accuracy_strict": variant.strict / n_problems,
        "accuracy_flexible": variant.flexible / n_problems,
        "refine_s": variant.refine_s[best],
        "refiner_share": variant.refine_s[best] / elapsed,
        "chunks_refined_per_call": variant.stats.get("chunks_refined", 0.0) / calls,
        "chunks_total_per_call": variant.stats.get("chunks_total", 0.0) / calls,
        "refine_steps": variant.stats.get("refine_steps", 0.0) / calls,
        "backbone_flops": variant.flops.backbone,
        "refiner_floor_flops": variant.flops.refiner,
        "lm_head_floor_flops": variant.flops.lm_head,
        "refined_rows": variant.flops.refined_rows,
        "lm_head_rows": variant.flops.lm_head_rows,
        "batch_size": variant.batch_size,
        "ms_per_call": variant.splits[best].per_call_ms(variant.nfe) if variant.splits else {},
    }


def print_modes(title: str, rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print(f"\n{title}")
    print(f"{'mode':32s} {'tok/s':>8s} {'TPF':>6s} {'speedup':>8s} {'NFE/batch':>10s} {'NFE ratio':>10s} "
          f"{'acc strict':>10s} {'acc flex':>9s}")
    for row in rows:
        speedup = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"{row['mode']:32s} {row['tokens_per_s']:8.1f} {row['tokens_per_forward']:6.2f} "
              f"{speedup:7.2f}x "
              f"{row['nfe_per_batch']:10.1f} {base['nfe'] / row['nfe']:9.2f}x "
              f"{row['accuracy_strict']:10.3f} {row['accuracy_flexible']:9.3f}")


def print_per_call(rows: list[dict[str, Any]], clock: str) -> None:
    """Time per model call, split; `vs backbone` is the variant's sampling time over the backbone alone's,
    same mode and batch size, both from the split's clock."""
    print(f"\ntime per model call (ms, {clock} clock): backbone | refiner (refine()) | hybrid wrapper "
          "(rest of its forward) | sampler bookkeeping (rest of the sampling time)")
    print(f"{'variant':44s} {'mode':32s} {'batch':>5s} {'NFE':>6s} {'backbone':>9s} {'refiner':>8s} "
          f"{'wrapper':>8s} {'sampler':>8s} {'total':>8s} {'vs backbone':>11s}")
    base = {(r["mode"], r["batch_size"]): r for r in rows if r["section"] == SECTIONS[0]}
    for r in rows:
        ms, none = r["ms_per_call"], base.get((r["mode"], r["batch_size"]))
        ratio = float("nan")
        if none:  # sampling time (per call x calls), same clock
            ratio = ms["total"] * r["nfe"] / (none["ms_per_call"]["total"] * none["nfe"])
        r["vs_backbone"] = ratio
        print(f"{r['section']:44s} {r['mode']:32s} {r['batch_size']:5d} {r['nfe']:6d} {ms['backbone']:9.3f} "
              f"{ms['refiner']:8.3f} {ms['wrapper']:8.3f} {ms['sampler']:8.3f} {ms['total']:8.3f} "
              f"{ratio:10.3f}x")


def mode_sections(
    hybrid: LLaDATRMHybrid, bare: LLaDATRMHybrid, args: argparse.Namespace, batch_size: int
) -> dict[str, list[Variant]]:
    """The decoding modes with the backbone alone, the hybrid with no refiner, the hybrid with its refiner."""
    models = {SECTIONS[0]: (hybrid.backbone, None), SECTIONS[1]: (bare, bare.config),
              SECTIONS[2]: (hybrid, hybrid.config)}
    return {
        title: [Variant(m.name, model, m, hybrid_config=config, batch_size=batch_size)
                for m in modes(args.threshold)]
        for title, (model, config) in models.items()
    }


def share_variants(hybrid: LLaDATRMHybrid, args: argparse.Namespace) -> list[Variant]:
    """Per sampler mode of the share table: the backbone alone, then K x (selective, refine-all 2.0)."""
    by_key = {"exact": modes(args.threshold)[0], "prefix": modes(args.threshold)[2]}
    variants = []
    for key in args.share_modes:
        variants.append(Variant(NO_REFINER, hybrid.backbone, by_key[key]))
        for k in args.ks:
            thresholds = [(f"selective {t:g}", t) for t in args.selective] + [("all (2.0)", 2.0)]
            for label, threshold in thresholds:
                config = hybrid.config.model_copy(
                    update={"max_recursive_steps": k, "confidence_threshold": threshold}
                )
                variants.append(Variant(f"K={k} {label}", hybrid, by_key[key], hybrid_config=config))
    return variants


def floor_overhead(row: dict[str, Any], none: dict[str, Any]) -> float:
    """The variant's floor FLOPs (its backbone calls + refiner + LM-head rows) over the backbone alone's, - 1:
    the least the variant can add to sampling time if every FLOP ran at the backbone's rate."""
    total = row["backbone_flops"] + row["refiner_floor_flops"] + row["lm_head_floor_flops"]
    return floors.Floor(total, none["backbone_flops"]).fraction - 1


def print_share(rows: list[dict[str, Any]]) -> None:
    """The share table; `vs none` is the variant's sampling time over the backbone alone's, same mode, and
    `floor` the same ratio of FLOPs (`floor_overhead`); `meas/floor` = vs none / floor."""
    print("\nrefiner share of sampling time (time inside LLaDATRMHybrid.refine / sampler wall time)")
    print(f"{'sampler':32s} {'variant':18s} {'tok/s':>8s} {'NFE/batch':>9s} {'refiner s':>9s} {'share':>6s} "
          f"{'vs none':>8s} {'chunks refined/call':>20s} {'steps/chunk':>11s} {'acc':>6s} "
          f"{'floor':>8s} {'meas/floor':>10s}")
    baseline: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["variant"] == NO_REFINER:
            baseline[r["mode"]] = r
        none = baseline.get(r["mode"])
        added = r["elapsed_s"] / none["elapsed_s"] - 1 if none else float("nan")
        floor = floor_overhead(r, none) if none else float("nan")
        r["overhead_measured"], r["overhead_floor"] = added, floor
        r["measured_over_floor"] = floors.measured_over_floor(added, floor)
        chunks = f"{r['chunks_refined_per_call']:.1f}/{r['chunks_total_per_call']:.1f}"
        print(f"{r['mode']:32s} {r['variant']:18s} {r['tokens_per_s']:8.1f} {r['nfe_per_batch']:9.1f} "
              f"{r['refine_s']:9.2f} {100 * r['refiner_share']:5.1f}% {100 * added:+7.1f}% {chunks:>20s} "
              f"{r['refine_steps']:11.2f} {r['accuracy_strict']:6.3f} {100 * floor:+7.2f}% "
              f"{r['measured_over_floor']:10.2f}")


def build_hybrid(args: argparse.Namespace) -> tuple[LLaDATRMHybrid, Path, str]:
    """The hybrid to time, its backbone directory and a description of its refiner weights."""
    dtype = getattr(torch, args.dtype)
    if args.checkpoint is not None:
        loaded = load_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype)
        return loaded.model.eval(), loaded.backbone_dir, f"trained run {loaded.checkpoint_dir}"
    backbone_dir = Path(args.backbone or embedded_backbone_dir())
    backbone = LLaDAModel.from_pretrained(backbone_dir, dtype=dtype, device=args.device)
    hybrid = LLaDATRMHybrid(backbone, hybrid_config(load_config(args.refiner_config))).eval()
    weights = f"{args.refiner_config.name}, random (untrained) weights"
    if args.refiner_checkpoint is not None:
        hybrid.load_refiner(args.refiner_checkpoint)
        weights = f"{args.refiner_config.name}, weights {args.refiner_checkpoint}"
    return hybrid, backbone_dir, weights


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.wide:
        from sampler_wide import run_wide  # noqa: PLC0415 (the wide mode's imports only when asked for)

        wide = run_wide(args, args.refiner_config)
        if args.json:
            args.json.write_text(json.dumps(wide, indent=1) + "\n")
        return
    hybrid, backbone_dir, weights = build_hybrid(args)
    backbone = hybrid.backbone
    tokenizer = load_tokenizer(backbone_dir)
    ids = special_token_ids(tokenizer)
    records = test_problems(backbone_dir, args.n_problems)
    base_config = hybrid.config
    bare_config = base_config.model_copy(update={"refiner": "none", "integration": "replace"})
    bare = LLaDATRMHybrid(backbone, bare_config).eval()
    timer = RefineTimer(hybrid)
    calls = CallTimer(backbone, [hybrid, bare], clock=args.clock)
    meter = FlopMeter(hybrid)

    size = sum(p.numel() for p in backbone.parameters()) / 1e6
    print(f"backbone {backbone_dir} ({size:.2f} M parameters, {args.dtype}, {args.device}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"{len(records)} test problems in batches of {args.batch_size}; gen_length {args.gen_length}, "
          f"block_length {args.block_length}, exact sampler {args.steps} steps; fastest of {args.repeats}")
    cfg = base_config
    print(f"hybrid: {weights} (refiner {cfg.refiner}, K={cfg.max_recursive_steps}, "
          f"chunk {cfg.chunk_size}, threshold {cfg.confidence_threshold})")

    warmup = [Variant("warm-up", backbone, m) for m in modes(args.threshold)[1:]]
    run_interleaved(warmup, tokenizer, records[:1], argparse.Namespace(**{**vars(args), "repeats": 1}), ids)

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "per call": []}
    for batch_size in args.batch_sizes:
        sections = mode_sections(hybrid, bare, args, batch_size)
        everything = [v for variants in sections.values() for v in variants]
        batch_args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
        run_interleaved(everything, tokenizer, records, batch_args, ids, timer, calls=calls)
        for title, variants in sections.items():
            rows = [{**summary(v, len(records)), "section": title} for v in variants]
            key = title if len(args.batch_sizes) == 1 else f"{title}, batch {batch_size}"
            results[key] = rows
            print_modes(f"{title} (batch {batch_size})", rows)
            results["per call"] += rows
    print_per_call(results["per call"], args.clock)
    if args.no_share:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return
    variants = share_variants(hybrid, args)
    run_interleaved(variants, tokenizer, records, args, ids, timer, meter)
    results["refiner share"] = [summary(v, len(records)) for v in variants]
    print_share(results["refiner share"])
    hybrid.config = base_config

    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
