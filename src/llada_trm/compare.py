"""The main job: does a recursive refiner help a frozen backbone? `llada-trm compare --config FILE`.

1. train the MLP baseline and the slot refiner in phase 1 (backbone frozen) on the generated task, each with
   the same run config except `model.refiner`, each into its own directory under `output.dir`;
2. sample answers with LLaDA's sampler on the SAME held-out problems with no refiner (the backbone alone),
   the MLP refiner and the slot refiner;
3. print and write the comparison: sampled accuracy (strict `#### n` and flexible last number), validation
   loss and masked-token accuracy on the same noised validation set, mean refinement steps per refined chunk,
   the fraction of chunks skipped, and sampling speed; plus each run's plots and a bar chart.

The backbone-alone row's validation figures are the trainer's `loss_base` / `accuracy_base`: the frozen
backbone on exactly the masks the refiners were validated on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llada_trm.config import Float, Int, NonNegFloat, PosInt, RunConfig, _Section, load_schema
from llada_trm.io import write_json, write_text_atomic

__all__ = [
    "CompareConfig",
    "CompareEvaluation",
    "CompareResult",
    "format_table",
    "load_compare_config",
    "run_compare",
]

SUMMARY_JSON = "comparison.json"
SUMMARY_MD = "comparison.md"
SUMMARY_PNG = "comparison.png"


class CompareEvaluation(_Section):
    """The sampled evaluation every model gets: the same problems, the same sampler settings."""

    n_problems: PosInt = 24
    split: str = Field(default="test", description="held-out split; for gsm8k data also a slice, test[:50]")
    checkpoint: Literal["last", "best"] = "last"
    batch_size: PosInt = 24
    steps: PosInt = 64
    gen_length: PosInt = 128
    block_length: PosInt = 32
    temperature: NonNegFloat = 0.0
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: Float | None = None
    cache: Literal["prefix", "dual"] | None = None
    seed: Int = 0


class CompareOutput(_Section):
    dir: str = "runs/compare"


class CompareConfig(_Section):
    """`run` is the training run shared by every refiner (`model.refiner` and `output.dir` are set per
    refiner); `refiners` are trained and compared with the backbone alone when `baseline` is on."""

    run: RunConfig = Field(default_factory=RunConfig)
    refiners: list[Literal["mlp", "slot"]] = Field(default_factory=lambda: ["mlp", "slot"], min_length=1)
    baseline: bool = True
    evaluation: CompareEvaluation = Field(default_factory=CompareEvaluation)
    output: CompareOutput = Field(default_factory=CompareOutput)


def load_compare_config(path: str | Path | None, overrides: Sequence[str] | None = None) -> CompareConfig:
    """Read and validate a compare YAML (None = the defaults) with `--set a.b=c` overrides."""
    return load_schema(CompareConfig, path, overrides)


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    table: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    elapsed_s: float = 0.0


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("refiner", "refiner", "{}"),
    ("accuracy_strict", "acc strict", "{:.3f}"),
    ("accuracy_flexible", "acc flexible", "{:.3f}"),
    ("vs_none", "vs none (+/-)", "{}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_masked_accuracy", "val masked acc", "{:.3f}"),
    ("mean_refine_steps", "refine steps", "{:.2f}"),
    ("skipped_fraction", "skipped", "{:.1%}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("nfe", "NFE", "{}"),
    ("train_s", "train s", "{:.0f}"),
    ("eval_s", "eval s", "{:.0f}"),
)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the comparison (readable as plain text too); missing values show as '-'."""
    header = [title for _, title, _ in _COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in _COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in pairs]
        return "| " + " | ".join(padded) + " |"

    rules = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    rule = "|" + "|".join(rules) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def _refiner_run(config: CompareConfig, kind: str, out: Path) -> RunConfig:
    data = config.run.model_dump(mode="python")
    data["model"]["refiner"] = kind
    data["model"]["integration"] = "replace"
    data["output"]["dir"] = str(out / kind)
    return RunConfig.model_validate(data)


def _row(kind: str, result: Any, train: Mapping[str, Any], train_s: float | None) -> dict[str, Any]:
    """One table row: sampled accuracy, the run's last validation, refinement efficiency and speed."""
    summary = result.summary
    refinement = summary.get("refinement") or {}
    refined = kind != "none"
    val = train.get("val") or {}
    return {
        "refiner": kind,
        "n": summary["n"],
        "accuracy_strict": summary["accuracy_strict"],
        "accuracy_flexible": summary["accuracy_flexible"],
        "val_loss": val.get("loss" if refined else "loss_base"),
        "val_masked_accuracy": val.get("accuracy" if refined else "accuracy_base"),
        "mean_refine_steps": refinement.get("mean_refine_steps") if refined else None,
        "skipped_fraction": refinement.get("skipped_fraction") if refined else None,
        "tokens_per_s": summary["speed"]["tokens_per_s"],
        "nfe": summary["speed"]["nfe"],
        "train_steps": train.get("steps") if refined else None,
        "train_s": train_s,
        "eval_s": summary["speed"]["total_s"],
        "predictions": str(result.out_dir / "predictions.jsonl") if result.out_dir else None,
    }


def _paired(result: Any, baseline: Any | None) -> dict[str, Any]:
    """Problems the refiner solves that the backbone alone misses (gained) and the reverse (lost), strict.

    On the same problems, these two counts say more than the accuracies' difference: a sign test on them
    tells a real change from sampling noise.
    """
    if baseline is None:
        return {}
    before = {p["index"]: p["correct_strict"] for p in baseline.predictions}
    gained = sum(1 for p in result.predictions if p["correct_strict"] and not before[p["index"]])
    lost = sum(1 for p in result.predictions if before[p["index"]] and not p["correct_strict"])
    return {"gained": gained, "lost": lost, "vs_none": f"+{gained} / -{lost}"}


def _sampling(ev: CompareEvaluation) -> Any:
    from llada_trm.evaluate import SamplingOptions

    return SamplingOptions(
        steps=ev.steps,
        gen_length=ev.gen_length,
        block_length=ev.block_length,
        temperature=ev.temperature,
        remasking=ev.remasking,
        threshold=ev.threshold,
        cache=ev.cache,
        batch_size=ev.batch_size,
        seed=ev.seed,
    )


def run_compare(
    config: CompareConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    force: bool = False,
) -> CompareResult:
    """Train each refiner, evaluate it and the backbone alone on the same problems, write the comparison.

    A comparison already in `output.dir` (a refiner's run, or the report) refuses before anything runs;
    `force` archives it whole as `DIR.old-<timestamp>` first.
    """
    from llada_trm.build import resolve_backbone_dir
    from llada_trm.evaluate import evaluate_model, load_checkpoint, load_eval_records, synthetic_settings
    from llada_trm.plots import plot_comparison, plot_run
    from llada_trm.training import Trainer
    from llada_trm.training.run_dir import claim_compare_dir

    started = time.perf_counter()
    out = Path(config.output.dir)
    claim_compare_dir(out, [out / kind for kind in config.refiners], force=force)
    ev, data = config.evaluation, config.run.data
    options = _sampling(ev)  # checked before any training starts
    records = load_eval_records(
        data.dataset, ev.split, data_path=data.path, synthetic=synthetic_settings(data), limit=ev.n_problems
    )
    dataset_name = f"{data.dataset}-{ev.split.split('[')[0]}"
    device = "cpu" if config.run.training.device == "cpu" else "auto"
    baseline = " and the backbone alone" if config.baseline else ""
    echo(
        f"compare: refiners {', '.join(config.refiners)}{baseline} on {len(records)} held-out "
        f"{data.dataset} problems; writing to {out}"
    )

    trained: dict[str, tuple[dict[str, Any], float]] = {}
    for kind in config.refiners:
        echo(f"\n== training the {kind} refiner (phase 1, backbone frozen) ==")
        run_started = time.perf_counter()
        summary = Trainer(_refiner_run(config, kind, out), progress=progress).train()
        trained[kind] = (summary, time.perf_counter() - run_started)

    def sample(kind: str, checkpoint: str | Path) -> Any:
        echo(f"\n== sampling with {'the backbone alone' if kind == 'none' else f'the {kind} refiner'} ==")
        loaded = load_checkpoint(checkpoint, refiner="none" if kind == "none" else None, device=device)
        return evaluate_model(
            loaded.model,
            loaded.tokenizer,
            records,
            options,
            num_steps=loaded.num_steps,
            out_dir=out / kind / "eval" / dataset_name,
            metadata={"model": loaded.describe(), "dataset": data.dataset, "split": ev.split},
            progress=progress,
            desc=f"eval {kind}",
        )

    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    baseline = None
    if config.baseline:
        baseline = sample("none", resolve_backbone_dir(config.run.model.backbone))
        first_run = next(iter(trained.values()))[0]  # its loss_base: the backbone on the same masks
        rows.append(_row("none", baseline, first_run, None))
        files.extend(baseline.files)
    for kind, (summary, train_s) in trained.items():
        checkpoint = out / kind / "checkpoints" / ev.checkpoint
        if not checkpoint.is_dir():  # no validation set: the trainer wrote no 'best'
            checkpoint = out / kind / "checkpoints" / "last"
        result = sample(kind, checkpoint)
        rows.append(_row(kind, result, summary, train_s) | _paired(result, baseline))
        files.extend([*result.files, *plot_run(out / kind)])

    elapsed = time.perf_counter() - started
    table = format_table(rows)
    files.extend(_write_report(out, rows, table, len(records), config, options, elapsed))
    files.append(plot_comparison(rows, out / SUMMARY_PNG))
    echo(
        f"\n{table}\n\ntotal {elapsed / 60:.1f} min; wrote {out / SUMMARY_MD}, {out / SUMMARY_JSON}, "
        f"{out / SUMMARY_PNG} and each run's plots/"
    )
    return CompareResult(rows=rows, table=table, out_dir=out, files=files, elapsed_s=elapsed)


def _write_report(
    out: Path,
    rows: list[dict[str, Any]],
    table: str,
    problems: int,
    config: CompareConfig,
    options: Any,
    elapsed: float,
) -> list[Path]:
    """comparison.json (rows, settings, the whole config) and comparison.md (the table with its setting)."""
    ev, data = config.evaluation, config.run.data
    report = {
        "rows": rows,
        "problems": problems,
        "dataset": data.dataset,
        "split": ev.split,
        "sampling": options.to_dict(),
        "elapsed_s": elapsed,
        "config": config.model_dump(mode="json"),
    }
    threshold = "" if ev.threshold is None else f", threshold {ev.threshold}"
    threshold += "" if ev.cache is None else f", {ev.cache} KV cache"
    steps = ", ".join(f"{row['refiner']} {row['train_steps']}" for row in rows if row["train_steps"])
    markdown = (
        f"# Refiner comparison\n\n{problems} held-out {data.dataset} problems ({ev.split}); sampler: "
        f"gen_length {ev.gen_length}, block_length {ev.block_length}, steps {ev.steps}, temperature "
        f"{ev.temperature}{threshold}. Refiners trained in phase 1 (backbone frozen) for {steps} "
        f"optimizer steps.\n\n{table}\n\nTotal time {elapsed / 60:.1f} min.\n"
    )
    return [write_json(out / SUMMARY_JSON, report), write_text_atomic(out / SUMMARY_MD, markdown)]
