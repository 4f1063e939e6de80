"""Test-time depth: a compare arm's trained refiners sampled at K = 1 .. 16 refinement steps, paired with the
backbone on the same problems (issue 24's recursion measurement).

    python scripts/depth_sweep.py runs/recipe_study --arm recipe --steps 1,2,4,8,16 --out docs/results/depth

For every training seed of the arm, its `checkpoints/last` is sampled on the compare's own problems with the
compare's sampler at each K (`evaluate_model(num_steps=K)`); the backbone's answers are the compare's
(`none/`).
Per K the table gives the strict accuracy over all (seed, problem) pairs [Wilson], the difference from the
backbone (mean +/- std over seeds) and the stratified sign test (one observation per problem: the mean over
seeds), the verdict the compare report uses. Writes `<out>.md` and `<out>.json`; re-running reuses the
predictions already written under `<run>/eval/depth_K/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llada_trm.data.gsm8k import GSM8KRecord
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.evaluate.evaluator import evaluate_model
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.evaluate.paired import read_predictions
from llada_trm.evaluate.statistics import mean_std, proportion, stratified_sign_test
from llada_trm.io import write_text_atomic


def _predictions(path: Path) -> list[dict[str, Any]]:
    return read_predictions(path)[1]


def _sweep_run(run: Path, records: list[GSM8KRecord], steps: list[int], options: SamplingOptions
               ) -> dict[int, list[bool]]:  # fmt: skip
    """{K: correctness per problem} of one trained run, sampling only the K not sampled before."""
    loaded = None
    out: dict[int, list[bool]] = {}
    for k in steps:
        directory = run / "eval" / f"depth_{k}"
        if not (directory / "predictions.jsonl").is_file():
            if loaded is None:
                loaded = load_checkpoint(run / "checkpoints" / "last")
            evaluate_model(loaded.model, loaded.tokenizer, records, options, num_steps=k, out_dir=directory,
                           metadata={"refine_steps": k}, progress=False)  # fmt: skip
        out[k] = [bool(p["correct_strict"]) for p in _predictions(directory / "predictions.jsonl")]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path, help="a compare output directory (output.dir)")
    parser.add_argument("--arm", required=True, help="the arm whose trained refiners are swept")
    parser.add_argument("--steps", default="1,2,4,8,16", help="test-time K values, comma separated")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    steps = [int(k) for k in args.steps.split(",")]
    report = json.loads((args.compare_dir / "comparison.json").read_text())
    baseline_files = sorted((args.compare_dir / "none" / "eval").glob("*/predictions.jsonl"))
    if not baseline_files:
        print(f"{args.compare_dir}: no backbone predictions under none/eval/", file=sys.stderr)
        return 2
    baseline = _predictions(baseline_files[0])
    records = [GSM8KRecord(question=p["question"], answer=p["reference"]) for p in baseline]
    options = SamplingOptions(**report["sampling"]) if "sampling" in report else None
    runs = sorted(args.compare_dir.glob(f"seed*/{args.arm}"))
    if not runs or options is None:
        print(f"{args.compare_dir}: no trained runs of arm {args.arm!r} (or no sampling settings)",
              file=sys.stderr)  # fmt: skip
        return 2
    per_seed = [_sweep_run(run, records, steps, options) for run in runs]
    none = [bool(p["correct_strict"]) for p in baseline]
    rows = []
    for k in steps:
        runs_k = [seed[k] for seed in per_seed]
        pairs = [c for seed in runs_k for c in seed]
        diffs = [100 * (sum(seed) - sum(none)) / len(none) for seed in runs_k]
        sign = stratified_sign_test([none] * len(runs_k), runs_k)
        accuracy = proportion(sum(pairs), len(pairs))
        rows.append({"steps": k, "accuracy": accuracy, "diff_points": mean_std(diffs), "sign_test": sign})
    base = proportion(sum(none), len(none))
    lines = [
        f"# Test-time depth: arm `{args.arm}` of {args.compare_dir}",
        "",
        f"{len(none)} problems, {len(runs)} training seeds; the backbone alone: {base['p']:.3f} "
        f"[{base['low']:.3f}, {base['high']:.3f}]. Command: `python scripts/depth_sweep.py "
        f"{args.compare_dir} --arm {args.arm} --steps {args.steps} --out {args.out}`.",
        "",
        "| test-time K | acc strict (all pairs) [95% Wilson] | vs backbone, points (mean ± std over seeds) | "
        "problems better / worse | stratified sign p |",
        "|---:|---|---:|---|---:|",
    ]
    for row in rows:
        acc, diff, sign = row["accuracy"], row["diff_points"], row["sign_test"]
        spread = "" if diff["std"] is None else f" ± {diff['std']:.1f}"
        lines.append(f"| {row['steps']} | {acc['p']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] | "
                     f"{diff['mean']:+.1f}{spread} | {sign['positive']} / {sign['negative']} | "
                     f"{sign['p']:.2g} |")  # fmt: skip
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    summary = {"arm": args.arm, "backbone": base, "rows": rows}
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
