"""The speed/accuracy frontier of threshold decoding: exact sampler vs Fast-dLLM thresholds, with and
without the prefix / dual KV cache, on the embedded backbone alone or beside a trained refiner.

    PYTHONPATH=src .venv/bin/python scripts/threshold_frontier.py --n 32     # a check (~minutes on a CPU)
    PYTHONPATH=src .venv/bin/python scripts/threshold_frontier.py            # 512 problems: the study
    PYTHONPATH=src .venv/bin/python scripts/threshold_frontier.py --refiner runs/compare/seed0/mlp \
        --thresholds 0.3,0.5,0.7,0.9 --caches prefix,dual                  # the refiner at low thresholds

With `--refiner RUN` (a trained run, e.g. the recipe's refiner of `make run`), every threshold and cache is
sampled twice, by the backbone alone (the run's model with refinement off) and with the refiner at its
trained K, both paired against the backbone's exact sampler: can the refiner buy back what more parallel
decoding loses?

Why: threshold 0.9 lost ~2.6 points against the exact sampler on 192 problems, caches or not. Whether that
is significant, and which threshold keeps the accuracy at what speed, needs one run of every setting on the
same problems with a paired test. The problems are compare's: the generated task's disjoint test split
(`evaluate.load_eval_records`, checked against the run's training and validation problems by
`build.check_test_split`), the run and sampler settings of configs/compare_tiny.yaml with gen_length 128 (the
longest its 256 positions allow). Every setting samples every batch in turn (interleaved), so wall-time
ratios compare like with like on a shared machine. Per setting: strict accuracy with its Wilson 95%
interval, the paired difference vs exact (paired bootstrap 95% interval, exact McNemar p), whether the
interval excludes a loss of more than `--margin` (non-inferiority), NFE and the speed-up in wall time.
Writes frontier.md and frontier.json into `--out` atomically after every batch (a stopped run leaves the
paired result of the problems it finished, marked partial), and prints the estimated time of `--n 512`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXACT = "exact"
CACHES = (None, "prefix", "dual")


@dataclass(frozen=True)
class Setting:
    """One sampler setting: `threshold` None is LLaDA's fixed schedule; `cache` None runs full sequences."""

    name: str
    threshold: float | None = None
    cache: str | None = None
    refine: bool = False  # the run's refiner at its trained K; False: refinement off (the backbone alone)


def frontier_settings(
    thresholds: Sequence[float], caches: Sequence[str | None] = CACHES, *, refiner: bool = False
) -> list[Setting]:
    """The exact sampler, then every threshold with each of `caches` (None: no cache); with `refiner`, each
    of those again with the refiner on."""
    out = [Setting(EXACT)]
    for t in thresholds:
        for cache in caches:
            name = f"threshold {t:g}" + (f" + {cache} cache" if cache else "")
            out.append(Setting(name, t, cache))
            if refiner:
                out.append(Setting(name + " + refiner", t, cache, refine=True))
    return out


@dataclass
class Tally:
    """A setting's results, problem by problem in record order, and its summed generation time."""

    correct: list[bool] = field(default_factory=list)
    seconds: float = 0.0
    nfe: int = 0


def frontier_rows(
    tallies: Mapping[str, Tally], baseline: str = EXACT, *, margin: float = 0.01, n_boot: int = 10_000
) -> list[dict[str, Any]]:
    """One row per setting (the order of `tallies`): accuracy with its Wilson interval, the paired
    difference vs `baseline` (bootstrap interval, McNemar p, non-inferiority at `margin`), NFE, speed-up."""
    from llada_trm.evaluate.statistics import paired_summary

    base = tallies[baseline]
    rows = []
    for name, tally in tallies.items():
        if len(tally.correct) != len(base.correct):
            raise ValueError(f"{name}: {len(tally.correct)} problems, the baseline {len(base.correct)}")
        paired = paired_summary(base.correct, tally.correct, n_boot=n_boot)
        rows.append({
            "setting": name,
            "n": paired["n"],
            "accuracy": paired["accuracy_b"],
            "diff": paired["diff"],
            "ci_low": paired["ci_low"],
            "ci_high": paired["ci_high"],
            "gained": paired["gained"],
            "lost": paired["lost"],
            "p_mcnemar": paired["p"],
            "within_margin": paired["ci_low"] > -margin,
            "nfe": tally.nfe,
            "seconds": tally.seconds,
            "speedup": base.seconds / tally.seconds if tally.seconds > 0 else float("nan"),
        })
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], margin: float = 0.01) -> str:
    """The frontier as a markdown table (points of accuracy, the interval in brackets)."""
    head = (
        "| setting | strict acc. [Wilson 95%] | diff vs exact [bootstrap 95%] | +/- | McNemar p "
        f"| within {100 * margin:g} pt | NFE | wall s | speed-up |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        acc = r["accuracy"]
        lines.append(
            f"| {r['setting']} | {100 * acc['p']:.1f} [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}] "
            f"| {100 * r['diff']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}] "
            f"| +{r['gained']}/-{r['lost']} | {r['p_mcnemar']:.3f} | {'yes' if r['within_margin'] else 'no'} "
            f"| {r['nfe']} | {r['seconds']:.1f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def estimate_seconds(tallies: Mapping[str, Tally], n_target: int) -> float:
    """Wall seconds a run of `n_target` problems would take: this run's seconds per problem, scaled."""
    per_problem = sum(t.seconds / max(1, len(t.correct)) for t in tallies.values())
    return per_problem * n_target


# ------------------------------------------------------------------------------------------------- run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="test problems (default 512)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "compare_tiny.yaml",
                        help="the compare config whose run and test split are used")
    parser.add_argument("--thresholds", default="0.7,0.8,0.9,0.95,0.99")
    parser.add_argument("--caches", default="none,prefix,dual", help="caches sampled at each threshold")
    parser.add_argument("--refiner", type=Path, default=None,
                        help="a trained run (or its checkpoint): each setting also sampled with its refiner")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="exact sampler's steps (default gen_length)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--margin", type=float, default=0.01, help="non-inferiority margin (1 point)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimate-for", type=int, default=512, help="print the run time of this many")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "frontier")
    args = parser.parse_args(argv)
    args.thresholds = [float(t) for t in args.thresholds.split(",") if t]
    if args.n < 1 or not args.thresholds or any(not 0 < t <= 1 for t in args.thresholds):
        parser.error("--n must be >= 1 and --thresholds a comma-separated list in (0, 1]")
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not caches or any(c not in ("none", "prefix", "dual") for c in caches):
        parser.error("--caches must be a comma-separated list of none, prefix, dual")
    args.caches = [None if c == "none" else c for c in caches]
    args.steps = args.steps or args.gen_length
    return args


def sample_interleaved(model: Any, tokenizer: Any, records: list, options: Any, settings: list[Setting],
                       batch_size: int, after_batch: Any = None) -> dict[str, Tally]:
    """Every setting on every batch, batch by batch, so each sees the same machine load; `after_batch`
    (if given) is called with the tallies so far after each batch."""
    from llada_trm.evaluate.evaluator import evaluate_model

    tallies = {s.name: Tally() for s in settings}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        for s in settings:
            chosen = dataclasses.replace(options, threshold=s.threshold, cache=s.cache, batch_size=batch_size)
            steps = None if s.refine else 0  # None: the refiner's trained K; 0: refinement off
            result = evaluate_model(model, tokenizer, batch, chosen, num_steps=steps, progress=False)
            tally = tallies[s.name]
            tally.correct.extend(bool(p["correct_strict"]) for p in result.predictions)
            tally.seconds += result.summary["speed"]["generation_s"]
            tally.nfe += result.summary["speed"]["nfe"]
        done = min(len(records), start + batch_size)
        print(f"  {done}/{len(records)} problems", file=sys.stderr, flush=True)
        if after_batch is not None and done < len(records):
            after_batch(tallies)
    return tallies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from llada_trm.build import check_test_split
    from llada_trm.evaluate.evaluator import load_eval_records, synthetic_settings
    from llada_trm.evaluate.loading import load_checkpoint
    from llada_trm.io import write_json, write_text_atomic
    from llada_trm.study.config import load_compare_config

    torch.set_num_threads(args.threads)
    config = load_compare_config(args.config)
    data = config.run.data
    records = load_eval_records(data.dataset, config.evaluation.split, data_path=data.path,
                                synthetic=synthetic_settings(data), limit=args.n)
    split = check_test_split(config.run, records)  # refuses a test problem the run trains or validates on
    options = dataclasses.replace(config.run.sampling.options(), gen_length=args.gen_length,
                                  block_length=args.block_length, steps=args.steps)
    if args.refiner is not None:  # the backbone settings run the same model with refinement off
        loaded = load_checkpoint(args.refiner, device="cpu", dtype="float32")  # a run or its checkpoint
    else:
        loaded = load_checkpoint(config.run.model.backbone, refiner="none", device="cpu", dtype="float32")
    settings = frontier_settings(args.thresholds, args.caches, refiner=args.refiner is not None)
    print(f"frontier: {len(records)} test problems (disjoint: {split['problems']}), {len(settings)} "
          f"settings, "
          f"gen_length {args.gen_length}, block {args.block_length}, exact {args.steps} steps, "
          f"batch {args.batch_size}, backbone {loaded.describe()}")
    started = time.perf_counter()

    def write(tallies: Mapping[str, Tally]) -> tuple[str, dict[str, Any]]:
        """frontier.md / .json for the problems sampled so far (atomic; a partial run says so); returns the
        table and the run's meta."""
        n = len(next(iter(tallies.values())).correct)
        rows = frontier_rows(tallies, margin=args.margin)
        table = markdown_table(rows, args.margin)
        per_setting = {name: t.seconds / len(t.correct) * 32 for name, t in tallies.items()}
        meta = {
            "n": n, "partial": n < len(records), "split_check": split, "sampling": options.to_dict(),
            "elapsed_s": time.perf_counter() - started, "seconds_per_32_problems": per_setting,
            f"estimated_s_for_{args.estimate_for}": estimate_seconds(tallies, args.estimate_for),
            "config": str(args.config),
        }
        partial = f" -- partial: {n} of {len(records)} done, the run goes on" if meta["partial"] else ""
        who = "backbone alone" if args.refiner is None else f"backbone and the refiner of {args.refiner}"
        command = " ".join(["scripts/threshold_frontier.py", *(sys.argv[1:] if argv is None else argv)])
        header = (f"# Threshold decoding frontier ({n} problems, gen_length {args.gen_length}, "
                  f"{who}{partial})\n\nCommand: `{command}`; sampling {options.to_dict()}.\n\n")
        write_text_atomic(args.out / "frontier.md", header + table)
        write_json(args.out / "frontier.json", {"meta": meta, "rows": rows})
        return table, meta

    tallies = sample_interleaved(loaded.model, loaded.tokenizer, records, options, settings, args.batch_size,
                                 after_batch=write)
    table, meta = write(tallies)
    elapsed, estimate = meta["elapsed_s"], meta[f"estimated_s_for_{args.estimate_for}"]
    per_setting = meta["seconds_per_32_problems"]
    print("\n" + table)
    slowest = max(per_setting, key=per_setting.get)
    print(f"one setting on 32 problems: {min(per_setting.values()):.0f}-{per_setting[slowest]:.0f} s "
          f"(slowest: {slowest}); this run {elapsed:.0f} s; estimated for --n {args.estimate_for}, all "
          f"{len(settings)} settings: {estimate / 60:.0f} min on this machine")
    print(f"wrote {args.out / 'frontier.md'} and {args.out / 'frontier.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
