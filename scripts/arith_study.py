"""Issue 26's measurement: accuracy against test-time K, by carry count, beside matched-compute controls.

    python scripts/arith_study.py experiments/arith_study --lsd experiments/arith_study_lsd \
        --arms slot_k4,slot_k8,mlp_matched --steps 1,2,4,8,16,32 --out docs/results/arith_study

Reads a finished arithmetic compare (`configs/arith/compare.yaml`: its backbone row, its trained arms, its
sampler and test problems) and adds, on the same problems:
- test-time depth: every training seed of each `--arms` arm sampled at each K of `--steps`
  (predictions kept under ``<run>/eval/depth_K/``, reused when present);
- the decoding controls of the backbone alone: least-significant-digit-first commits (the baseline row of
  `--lsd`, a compare of `configs/arith/compare_lsd.yaml`, or sampled here with `--lsd-decoding`) and extra
  denoising (`--denoise-steps`: the exact
  schedule, no threshold, one token per model call: the most sequential decoding the sampler has, written
  under ``<out>_controls/``);
- the trained controls at their trained K: every other arm of the compare (phase 2's top block, the slot
  refiner at other training K);
- a refiner on top of the decoding control (`--lsd-arms`): every seed of each listed arm sampled
  LSD-first at its trained K (under ``<run>/eval/lsd_first/``), against every control as the swept arms are.
Problems are grouped by the carries and borrows of their reference (`data.arithmetic.answer_carries`).
Per row and group: accuracy over all (seed, problem) pairs [95% Wilson], and against the backbone and
every control the stratified sign test (one observation per problem: the mean over seeds). Writes
``<out>.md``, ``<out>.json`` and ``<out>.png`` (one panel per carry group: accuracy against test-time K for
the swept arms, the controls as horizontal reference lines).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_trm.data.arithmetic import answer_carries
from llada_trm.data.gsm8k import GSM8KRecord
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.evaluate.evaluator import evaluate_model
from llada_trm.evaluate.loading import load_checkpoint
from llada_trm.evaluate.paired import read_predictions
from llada_trm.evaluate.statistics import mean_std, proportion, stratified_sign_test
from llada_trm.io import write_text_atomic


@dataclass
class Row:
    """One evaluated model or decoding: correctness per problem for each training seed."""

    name: str
    kind: str  # "swept" (an arm at a test-time K), "lsd" (an arm decoded LSD-first), "trained" or "decoding"
    runs: list[list[bool]]
    k: int | None = None
    arm: str | None = None
    calls: list[float] = field(default_factory=list)  # model calls per problem, per seed


def _eval_dir_predictions(directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(predictions, summary) of the one evaluation under ``directory`` (an eval folder or its parent)."""
    files = sorted(directory.glob("predictions.jsonl")) or sorted(directory.glob("*/predictions.jsonl"))
    if not files:
        raise FileNotFoundError(f"{directory}: no predictions.jsonl")
    summary_path = files[0].parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return read_predictions(files[0])[1], summary


def _calls_per_problem(summary: dict[str, Any]) -> float:
    speed = summary.get("speed", {})
    n = summary.get("n") or 1
    batch = summary.get("sampling", {}).get("batch_size") or 1
    # nfe counts batched model calls; every problem of a batch takes part in each of its batch's calls
    return float(speed.get("nfe", 0)) / math.ceil(n / batch)


def _correct(predictions: list[dict[str, Any]]) -> list[bool]:
    return [bool(p["correct_strict"]) for p in predictions]


def _evaluate(checkpoint: Path | str | None, records: list[GSM8KRecord], options: SamplingOptions,
              out_dir: Path, *, refiner: str | None = None, steps: int | None = None
              ) -> tuple[list[bool], float]:  # fmt: skip
    """Correctness and calls per problem of one evaluation, sampled unless ``out_dir`` already holds it."""
    if not (out_dir / "predictions.jsonl").is_file():
        loaded = load_checkpoint(checkpoint, refiner=refiner)
        evaluate_model(loaded.model, loaded.tokenizer, records, options, num_steps=steps, out_dir=out_dir,
                       metadata={"refine_steps": steps}, progress=False)  # fmt: skip
    predictions, summary = _eval_dir_predictions(out_dir)
    return _correct(predictions), _calls_per_problem(summary)


def _groups(references: list[str], edges: list[int]) -> list[tuple[str, list[int]]]:
    """[(label, problem indices)] by carry count: one group per edge, the last open-ended, plus 'all'."""
    carries = [answer_carries(r) for r in references]
    groups = [("all", list(range(len(references))))]
    for i, low in enumerate(edges):
        high = edges[i + 1] - 1 if i + 1 < len(edges) else None
        label = f"{low}" if high == low else (f"{low}+" if high is None else f"{low}-{high}")
        members = [j for j, c in enumerate(carries) if c >= low and (high is None or c <= high)]
        groups.append((f"carries {label}", members))
    return groups


def _subset(runs: list[list[bool]], members: list[int]) -> list[list[bool]]:
    return [[run[j] for j in members] for run in runs]


def _cell(row: Row, members: list[int]) -> dict[str, Any]:
    pairs = [c for run in _subset(row.runs, members) for c in run]
    return (
        proportion(sum(pairs), len(pairs))
        if pairs
        else {"k": 0, "n": 0, "p": float("nan"), "low": float("nan"), "high": float("nan")}
    )


def _versus(a: Row, b: Row, members: list[int]) -> dict[str, Any]:
    """b against a on ``members``: points (mean ± std over b's seeds) and the stratified sign test."""
    a_runs, b_runs = _subset(a.runs, members), _subset(b.runs, members)
    n = len(members)
    if n == 0:
        return {"points": None, "sign": None}
    a_mean = sum(sum(run) for run in a_runs) / (len(a_runs) * n)
    diffs = [100 * (sum(run) / n - a_mean) for run in b_runs]
    # the sign test needs as many runs on each side: a single-run side is repeated
    if len(a_runs) != len(b_runs):
        a_runs = a_runs * len(b_runs) if len(a_runs) == 1 else a_runs
        b_runs = b_runs * len(a_runs) if len(b_runs) == 1 else b_runs
    return {"points": mean_std(diffs), "sign": stratified_sign_test(a_runs, b_runs)}


def _plot(path: Path, rows: list[Row], controls: list[Row], groups: list[tuple[str, list[int]]],
          steps: list[int]) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(groups)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), sharey=True)
    arms = sorted({r.arm for r in rows if r.kind == "swept"}, key=str)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1))]
    for ax, (label, members) in zip(axes, groups, strict=True):
        for i, arm in enumerate(arms):
            swept = sorted((r for r in rows if r.kind == "swept" and r.arm == arm), key=lambda r: r.k or 0)
            cells = [_cell(r, members) for r in swept]
            ks = [r.k for r in swept]
            ys = [c["p"] for c in cells]
            err = [[c["p"] - c["low"] for c in cells], [c["high"] - c["p"] for c in cells]]
            ax.errorbar(ks, ys, yerr=err, marker="o", ms=3, capsize=2, color=colours[i % len(colours)],
                        label=arm)  # fmt: skip
        for j, control in enumerate(controls):
            cell = _cell(control, members)
            ax.axhline(cell["p"], color="grey" if j == 0 else colours[(len(arms) + j) % len(colours)],
                       linestyle=styles[j % len(styles)], linewidth=1.2, label=control.name)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(steps) / 1.4, max(steps) * 1.4)
        ax.set_xticks(steps, [str(k) for k in steps])
        ax.set_title(f"{label} (n={len(members)})", fontsize=9)
        ax.set_xlabel("test-time K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("strict accuracy (95% Wilson)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)


def _fmt(cell: dict[str, Any]) -> str:
    return f"{cell['p']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]" if cell["n"] else "-"


def _fmt_versus(v: dict[str, Any]) -> str:
    points, sign = v["points"], v["sign"]
    if points is None:
        return "-"
    spread = "" if points["std"] is None else f" ± {points['std']:.1f}"
    return f"{points['mean']:+.1f}{spread} ({sign['positive']}/{sign['negative']}, p {sign['p']:.2g})"


def _lsd_first(report: dict[str, Any]) -> SamplingOptions:
    """The compare's sampler committing each number's digits least significant first."""
    return SamplingOptions(**{**report["sampling"], "digit_order": "lsd_first"})


def _controls(args: argparse.Namespace, report: dict[str, Any], records: list[GSM8KRecord],
              backbone: Row, backbone_path: str | None) -> list[Row] | None:  # fmt: skip
    """The backbone and its decoding controls (LSD-first commits, one token per call)."""
    controls = [backbone]
    if args.lsd is not None:
        lsd, lsd_summary = _eval_dir_predictions(args.lsd / "none" / "eval")
        if [p["question"] for p in lsd] != [r.question for r in records]:
            print(f"{args.lsd}: its problems are not the compare's", file=sys.stderr)
            return None
        row = Row("backbone, LSD-first", "decoding", [_correct(lsd)], calls=[_calls_per_problem(lsd_summary)])
        controls.append(row)
    if args.lsd_decoding:
        out = Path(f"{args.out}_controls") / "lsd"
        correct, calls = _evaluate(backbone_path, records, _lsd_first(report), out, refiner="none")
        controls.append(Row("backbone, LSD-first", "decoding", [correct], calls=[calls]))
    if args.denoise_steps:
        gen_length = report["sampling"]["gen_length"]
        exact = SamplingOptions(**{**report["sampling"], "threshold": None, "steps": gen_length})
        out = Path(f"{args.out}_controls") / "denoise"
        correct, calls = _evaluate(backbone_path, records, exact, out, refiner="none")
        controls.append(Row("backbone, 1 token/call", "decoding", [correct], calls=[calls]))
    return controls


def _arm_rows(args: argparse.Namespace, report: dict[str, Any], records: list[GSM8KRecord],
              controls: list[Row]) -> list[Row]:  # fmt: skip
    """The swept arms at every test-time K; every other trained arm joins ``controls`` at its trained K."""
    options = SamplingOptions(**report["sampling"])
    steps = [int(k) for k in args.steps.split(",")]
    swept_arms = [a for a in args.arms.split(",") if a]
    rows: list[Row] = []
    for arm in [a for a in report.get("config", {}).get("refiners", []) if a != "none"]:
        runs = sorted(args.compare_dir.glob(f"seed*/{arm}"))
        if not runs:
            continue
        if arm not in swept_arms:
            evaluated = [_eval_dir_predictions(run / "eval") for run in runs]
            controls.append(Row(f"{arm} (trained K)", "trained", [_correct(p) for p, _ in evaluated], arm=arm,
                                calls=[_calls_per_problem(s) for _, s in evaluated]))  # fmt: skip
            continue
        for k in steps:
            results = [_evaluate(run / "checkpoints" / "last", records, options, run / "eval" / f"depth_{k}",
                                 steps=k) for run in runs]  # fmt: skip
            rows.append(Row(f"{arm} K={k}", "swept", [r[0] for r in results], k=k, arm=arm,
                            calls=[r[1] for r in results]))  # fmt: skip
    for arm in [a for a in args.lsd_arms.split(",") if a]:
        runs = sorted(args.compare_dir.glob(f"seed*/{arm}"))
        results = [_evaluate(run / "checkpoints" / "last", records, _lsd_first(report),
                             run / "eval" / "lsd_first") for run in runs]  # fmt: skip
        rows.append(Row(f"{arm} (trained K), LSD-first", "lsd", [r[0] for r in results], arm=arm,
                        calls=[r[1] for r in results]))  # fmt: skip
    return rows


def _table_lines(title: str, names: list[str], cells: list[list[str]], groups: list[str]) -> list[str]:
    lines = ["", title, "", "| row | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    return lines + [f"| {name} | " + " | ".join(row) + " |" for name, row in zip(names, cells, strict=True)]


def _report(args: argparse.Namespace, n: int, split: str, table: list[dict[str, Any]], groups: list[str],
            controls: list[Row]) -> list[str]:  # fmt: skip
    cmd = " ".join(["python scripts/arith_study.py", *sys.argv[1:]])
    lines = [
        f"# Recursion on carries: {args.compare_dir}",
        "",
        f"{n} test problems ({split}), strict accuracy over all (seed, problem) pairs [95% Wilson]; vs: "
        "points (mean ± std over seeds) (problems better / worse, stratified sign p). Groups: the carries "
        "and borrows of the reference answer.",
        f"Command: `{cmd}`.",
        "",
        "## Accuracy by carry count",
        "",
        "| row | seeds | calls / problem | " + " | ".join(groups) + " |",
        "|---|---:|---:|" + "---|" * len(groups),
    ]
    for entry in table:
        calls = entry["calls_per_problem"]
        cells = " | ".join(_fmt(entry["groups"][g]) for g in groups)
        lines.append(f"| {entry['name']} | {entry['seeds']} | {calls['mean']:.1f} | {cells} |")
    versus = [[_fmt_versus(e["vs_backbone"][g]) for g in groups] for e in table[1:]]
    lines += _table_lines("## Against the backbone", [e["name"] for e in table[1:]], versus, groups)
    swept = [e for e in table if e["kind"] in ("swept", "lsd")]
    for control in controls[1:]:
        versus = [[_fmt_versus(e["vs_controls"][control.name][g]) for g in groups] for e in swept]
        lines += _table_lines(
            f"## Swept arms against {control.name}", [e["name"] for e in swept], versus, groups
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_dir", type=Path, help="the arithmetic compare's output.dir")
    parser.add_argument("--lsd", type=Path, help="the LSD-first compare's output.dir (its backbone row)")
    parser.add_argument("--lsd-decoding", action="store_true", help="sample the LSD-first control here")
    parser.add_argument("--arms", default="slot_k4,mlp_matched", help="arms swept over test-time K")
    parser.add_argument("--steps", default="1,2,4,8,16,32", help="test-time K values, comma separated")
    parser.add_argument("--lsd-arms", default="", help="arms also sampled LSD-first at their trained K")
    parser.add_argument(
        "--denoise-steps", action="store_true", help="add the extra-denoising control: one token per call"
    )
    parser.add_argument("--carry-edges", default="0,1,2,3,5", help="lower edges of the carry groups")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json and OUT.png")
    args = parser.parse_args(argv)
    report = json.loads((args.compare_dir / "comparison.json").read_text())
    untrained = [a for a in args.lsd_arms.split(",") if a and not any(args.compare_dir.glob(f"seed*/{a}"))]
    if untrained:  # checked before any sampling: the sweep before it takes hours at full size
        print(f"--lsd-arms: {args.compare_dir} has no trained arm {', '.join(untrained)}", file=sys.stderr)
        return 2
    baseline, base_summary = _eval_dir_predictions(args.compare_dir / "none" / "eval")
    records = [GSM8KRecord(question=p["question"], answer=p["reference"]) for p in baseline]
    backbone = Row("backbone", "decoding", [_correct(baseline)], calls=[_calls_per_problem(base_summary)])
    controls = _controls(args, report, records, backbone, base_summary.get("model", {}).get("checkpoint"))
    if controls is None:
        return 2
    rows = _arm_rows(args, report, records, controls)
    groups = _groups([p["reference"] for p in baseline], [int(e) for e in args.carry_edges.split(",")])
    table: list[dict[str, Any]] = []
    for row in controls + rows:
        entry = {"name": row.name, "kind": row.kind, "k": row.k, "arm": row.arm, "seeds": len(row.runs),
                 "calls_per_problem": mean_std(row.calls),
                 "groups": {g: _cell(row, m) for g, m in groups}}  # fmt: skip
        if row is not backbone:
            entry["vs_backbone"] = {g: _versus(backbone, row, m) for g, m in groups}
        if row.kind in ("swept", "lsd"):
            entry["vs_controls"] = {c.name: {g: _versus(c, row, m) for g, m in groups} for c in controls[1:]}
        table.append(entry)
    labels = [g for g, _ in groups]
    lines = _report(args, len(records), report.get("split", "test"), table, labels, controls)
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text_atomic(args.out.with_suffix(".json"), json.dumps({"groups": labels, "rows": table}, indent=2))
    _plot(args.out.with_suffix(".png"), rows, controls, groups[1:], [int(k) for k in args.steps.split(",")])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
