"""The main job: does a recursive refiner help a frozen backbone? `llada-trm compare --config FILE`.

Checks the test problems are disjoint from the runs' own, trains each refiner (or arm) per seed, samples them
and the backbone alone on the same test problems, validates them on the same noised examples, and writes
the report (`study.report`). docs/comparison.md describes the steps and every file written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llada_trm.config import RunConfig
from llada_trm.errors import UserError
from llada_trm.io import write_json, write_text_atomic
from llada_trm.study.config import (
    CompareConfig,
)
from llada_trm.study.resume import (
    CHECKPOINT_KEY,
    checkpoint_identity,
    finished_evaluation,
    finished_training,
    record_training,
)

SUMMARY_JSON = "comparison.json"
SUMMARY_MD = "comparison.md"
SUMMARY_PNG = "comparison.png"
ERRORS_JSON = "errors.json"
DIAGNOSTICS_JSON = "diagnostics.json"
RELIABILITY_PNG = "reliability.png"


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    table: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    elapsed_s: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("refiner", "refiner", "{}"),
    ("seed", "seed", "{}"),
    ("accuracy_strict", "acc strict", "{:.3f}"),
    ("accuracy_ci", "95% CI", "{}"),
    ("accuracy_flexible", "acc flexible", "{:.3f}"),
    ("vs_none", "vs none (+/-)", "{}"),
    ("p_vs_none", "p vs none", "{:.3g}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_masked_accuracy", "val masked acc", "{:.3f}"),
    ("mean_refine_steps", "refine steps", "{:.2f}"),
    ("skipped_fraction", "skipped", "{:.1%}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("tokens_per_forward", "TPF", "{:.2f}"),
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


def is_deterministic(options: Any) -> bool:
    """Temperature 0 with low-confidence remasking draws nothing at random: one backbone run serves every
    seed."""
    return options.temperature == 0 and options.remasking == "low_confidence"


def _row(kind: str, seed: int | None, result: Any, val: Mapping[str, Any] | None, train: Mapping[str, Any],
         train_s: float | None) -> dict[str, Any]:  # fmt: skip
    """One table row: sampled accuracy with its interval, validation, refinement efficiency and speed."""
    from llada_trm.evaluate.statistics import proportion

    summary = result.summary
    refinement = summary.get("refinement") or {}
    refined = kind != "none"
    accuracy = proportion(summary["correct_strict"], summary["n"])
    return {
        "refiner": kind,
        "seed": seed,
        "n": summary["n"],
        "accuracy_strict": summary["accuracy_strict"],
        "accuracy_ci": f"[{accuracy['low']:.3f}, {accuracy['high']:.3f}]",
        "accuracy_flexible": summary["accuracy_flexible"],
        "val_loss": (val or {}).get("loss"),
        "val_masked_accuracy": (val or {}).get("masked_accuracy"),
        "mean_refine_steps": refinement.get("mean_refine_steps") if refined else None,
        "skipped_fraction": refinement.get("skipped_fraction") if refined else None,
        "tokens_per_s": summary["speed"]["tokens_per_s"],
        "tokens_per_forward": summary["speed"].get("tokens_per_forward"),
        "nfe": summary["speed"]["nfe"],
        "train_steps": train.get("steps") if refined else None,
        "train_s": train_s,
        "eval_s": summary["speed"]["total_s"],
        "predictions": str(result.out_dir / "predictions.jsonl") if result.out_dir else None,
    }


@dataclass
class _Validator:
    """Per-example validation of a loaded model on the trainer's validation batches and masks."""

    run: RunConfig
    loader: Any = None

    def __call__(self, loaded: Any) -> dict[str, list[float]] | None:
        import torch

        from llada_trm.build import build_records
        from llada_trm.data.collate import SFTDataset
        from llada_trm.training.validation import per_example_validation

        if self.loader is None:
            records = build_records(self.run.data)[1]
            if not records:
                return None
            dataset = SFTDataset(loaded.tokenizer, records, self.run.data.max_length)
            # the trainer's batches, in order: a row's loss depends on its batch's padding
            self.loader = torch.utils.data.DataLoader(
                dataset, batch_size=self.run.training.batch_size, shuffle=False, collate_fn=dataset.collate
            )
        model = loaded.model
        return per_example_validation(
            model,
            self.loader,
            mask_id=model.mask_token_id,
            seed=self.run.data.validation_seed,
            device=next(model.parameters()).device,
        )


def _validation_row(columns: Mapping[str, Sequence[float]] | None, base: bool) -> dict[str, float] | None:
    if not columns:
        return None
    suffix = "_base" if base else ""
    masked = sum(columns["masked"])
    loss = columns[f"loss{suffix}"]
    return {"loss": sum(loss) / len(loss), "masked_accuracy": sum(columns[f"correct{suffix}"]) / masked}


def run_compare(
    config: CompareConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    force: bool = False,
    resume: bool = False,
) -> CompareResult:
    """Train each refiner per seed, evaluate them and the backbone alone on the same test problems, and
    write the comparison with its statistics.

    A comparison already in `output.dir` (a refiner's run, or the report) refuses before anything runs;
    `force` archives it whole as `DIR.old-<timestamp>` first; `resume` reuses the trained models and the
    evaluations it holds (`study.resume`) and does the rest.
    """
    from llada_trm.build import check_test_split, resolve_backbone_dir
    from llada_trm.evaluate.evaluator import evaluate_model, load_eval_records, synthetic_settings
    from llada_trm.evaluate.loading import load_checkpoint
    from llada_trm.training.run_dir import claim_compare_dir

    if force and resume:  # one archives the comparison, the other continues it: never one silently ignored
        raise UserError(
            "--resume continues the comparison in output.dir and --force archives it to start anew; give one"
        )
    started = time.perf_counter()
    out = Path(config.output.dir)
    ev, data, seeds = config.evaluation, config.run.data, config.seed_list()
    if not resume:
        claim_compare_dir(
            out, [out / f"seed{seed}" / kind for seed in seeds for kind in config.refiners], force=force
        )
    options = config.run.sampling.options()
    records = load_eval_records(
        data.dataset, ev.split, data_path=data.path, synthetic=synthetic_settings(data), limit=ev.n_problems
    )
    split_check = check_test_split(config.run, records)  # refuses an overlap before any training
    deterministic = is_deterministic(options)
    dataset_name = f"{data.dataset}-{ev.split.split('[')[0]}"
    device = "cpu" if config.run.training.device == "cpu" else "auto"
    alone = " and the backbone alone" if config.baseline else ""
    sizes = split_check["problems"]
    echo(
        f"compare: refiners {', '.join(config.refiners)}{alone} on {len(records)} test {data.dataset} "
        f"problems (disjoint from the {sizes['train']} training and {sizes['validation']} validation "
        f"problems), training seeds {', '.join(map(str, seeds))}; writing to {out}"
    )

    trained = _train_refiners(config, out, progress=progress, echo=echo, resume=resume)
    questions = [record.question for record in records]

    def sample(kind: str, seed: int | None, checkpoint: str | Path) -> tuple[Any, Any]:
        who = "the backbone alone" if kind == "none" else f"the {kind} refiner"
        echo(f"\n== sampling with {who}{'' if seed is None else f', seed {seed}'} ==")
        loaded = load_checkpoint(checkpoint, refiner="none" if kind == "none" else None, device=device)
        # at temperature > 0 the sampler's noise follows the training seed, so seeds are independent draws
        sampling = options if deterministic or seed is None else replace(options, seed=options.seed + seed)
        identity = checkpoint_identity(Path(checkpoint), out)
        # keyed by the checkpoint sampled: `best` and `last` of one run never share (or reuse) an evaluation
        name = dataset_name if identity["checkpoint"] in ("last", "backbone") else (
            f"{dataset_name}-{identity['checkpoint']}"
        )
        directory = out / (kind if seed is None else f"seed{seed}/{kind}") / "eval" / name
        done = finished_evaluation(directory, questions, sampling.to_dict(), identity) if resume else None
        if done is not None:
            echo(f"reusing {directory} (--resume)")
            return done, loaded
        result = evaluate_model(
            loaded.model,
            loaded.tokenizer,
            records,
            sampling,
            num_steps=loaded.num_steps,
            out_dir=directory,
            metadata={"model": loaded.describe(), "dataset": data.dataset, "split": ev.split, "seed": seed,
                      CHECKPOINT_KEY: identity},  # fmt: skip
            progress=progress,
            desc=f"eval {kind}" + ("" if seed is None else f" seed {seed}"),
            diagnostics=True,
        )
        return result, loaded

    validator = _Validator(config.run)
    results: dict[int, dict[str, Any]] = {seed: {} for seed in seeds}
    validation: dict[int, dict[str, Any]] = {seed: {} for seed in seeds}
    files: list[Path] = []
    backbone_rows: dict[int, dict[str, Any]] = {}
    if config.baseline:
        backbone = resolve_backbone_dir(config.run.model.backbone)
        for seed in [None] if deterministic else seeds:
            result, _ = sample("none", seed, backbone)
            files.extend(result.files)
            for s in seeds if seed is None else [seed]:
                results[s]["none"] = result
            backbone_rows[seeds[0] if seed is None else seed] = {"result": result, "seed": seed}
    fallbacks: list[dict[str, Any]] = []
    for seed in seeds:
        for kind in config.refiners:
            summary, train_s = trained[seed, kind]
            checkpoint = out / f"seed{seed}" / kind / "checkpoints" / ev.checkpoint
            if not checkpoint.is_dir() and ev.checkpoint == "best":  # no validation set: no 'best' written
                checkpoint = checkpoint.parent / "last"
                reason = "the run kept no 'best' checkpoint (no validation set)"
                fallbacks.append({"seed": seed, "refiner": kind, "asked": "best", "used": "last",
                                  "reason": reason})  # fmt: skip
                echo(f"note: {kind}, seed {seed}: no 'best' checkpoint (the run has no validation set); "
                     "sampling 'last' instead (recorded in comparison.json)")  # fmt: skip
            result, loaded = sample(kind, seed, checkpoint)
            results[seed][kind] = result
            validation[seed][kind] = validator(loaded)
            files.extend(result.files)
    rows = _table_rows(config, trained, results, validation, backbone_rows)
    for row in rows:  # which checkpoint each row sampled, as asked or as fallen back to
        fell = {(f["seed"], f["refiner"]) for f in fallbacks}
        used = "last" if (row["seed"], row["refiner"]) in fell else ev.checkpoint
        row["checkpoint"] = "backbone" if row["refiner"] == "none" else used
    sampled = {"rows": rows, "results": results, "validation": validation, "fallbacks": fallbacks}
    return _finish(config, out, sampled, split_check, options, started, files, echo)


def _train_refiners(
    config: CompareConfig, out: Path, *, progress: bool, echo: Callable[[str], None], resume: bool = False
) -> dict[tuple[int, str], tuple[dict[str, Any], float]]:
    """Train every model for every seed: (seed, model) -> (training summary, seconds); with `resume`, a
    finished training of the same run is reused."""
    from llada_trm.training.loop import Trainer

    trained: dict[tuple[int, str], tuple[dict[str, Any], float]] = {}
    for seed in config.seed_list():
        for kind in config.refiners:
            run = config.run_for(kind, seed, out / f"seed{seed}" / kind)
            done = finished_training(Path(run.output.dir), run) if resume else None
            if done is not None:
                echo(f"\n== reusing the trained {kind}, seed {seed} ({run.output.dir}, --resume) ==")
                trained[seed, kind] = done
                continue
            what = "backbone frozen" if run.training.phase == 1 else "backbone partly trainable"
            echo(f"\n== training {kind} ({run.model.refiner} refiner), seed {seed} "
                 f"(phase {run.training.phase}, {what}) ==")  # fmt: skip
            run_started = time.perf_counter()
            # under --resume a training cut short before its marker starts over (its directory archived)
            summary = Trainer(run, progress=progress, force=resume).train()
            trained[seed, kind] = (summary, time.perf_counter() - run_started)
            record_training(Path(run.output.dir), summary, trained[seed, kind][1])
    return trained


def _table_rows(
    config: CompareConfig,
    trained: Mapping[tuple[int, str], tuple[dict[str, Any], float]],
    results: Mapping[int, Mapping[str, Any]],
    validation: Mapping[int, Mapping[str, Any]],
    backbone_rows: Mapping[int, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The table: each seed's backbone row (when it has one), then its refiners."""
    rows: list[dict[str, Any]] = []
    for seed in config.seed_list():
        frozen = [kind for kind in config.refiners if kind not in config.trained_backbone()]
        first = validation[seed][frozen[0]] if frozen else None
        if seed in backbone_rows:
            entry = backbone_rows[seed]
            rows.append(_row("none", entry["seed"], entry["result"], _validation_row(first, True), {}, None))
        for kind in config.refiners:
            summary, train_s = trained[seed, kind]
            rows.append(_row(kind, seed, results[seed][kind], _validation_row(validation[seed][kind], False),
                             summary, train_s))  # fmt: skip
    return rows


def _finish(
    config: CompareConfig,
    out: Path,
    sampled: Mapping[str, Any],
    split_check: Mapping[str, Any],
    options: Any,
    started: float,
    files: list[Path],
    echo: Callable[[str], None],
) -> CompareResult:
    """Statistics, error analysis, plots and the three report files; the console gets the tables.
    `sampled`: the table rows, per seed and model the evaluation result and the per-example validation
    columns, and the `best` -> `last` fallbacks."""
    from llada_trm.study import report as cr
    from llada_trm.study.plots import plot_paired_comparison, plot_reliability, plot_run

    ev, data = config.evaluation, config.run.data
    rows, results, validation = sampled["rows"], sampled["results"], sampled["validation"]
    predictions = {s: {kind: r.predictions for kind, r in models.items()} for s, models in results.items()}
    stats = cr.statistics_sections(predictions, config.reference)
    for row in rows:  # the paired figures against the backbone alone, in the table
        paired = stats["per_seed"][str(row["seed"] if row["seed"] is not None else config.seed_list()[0])]
        against = paired["paired"].get(f"{row['refiner']}_vs_none")
        if against is not None:
            row.update(gained=against["gained"], lost=against["lost"], p_vs_none=against["p"],
                       vs_none=f"+{against['gained']} / -{against['lost']}")  # fmt: skip
    valid = {s: v for s, v in validation.items() if all(columns for columns in v.values())}
    validation_stats = (
        cr.validation_sections(valid, config.reference, config.trained_backbone()) if valid else None
    )
    problems = len(next(iter(predictions[config.seed_list()[0]].values())))
    first_seed = stats["per_seed"][str(config.seed_list()[0])]["paired"]
    power = cr.power_section(problems, ev.planned_difference, ev.planned_discordant, first_seed)
    errors = None
    if data.dataset == "synthetic" and config.baseline:
        errors = cr.error_sections(predictions)
        files.append(write_json(out / ERRORS_JSON, errors))
    diagnostics = cr.diagnostics_sections(predictions)
    if diagnostics is not None:
        files.append(write_json(out / DIAGNOSTICS_JSON, diagnostics))
    for seed in config.seed_list():
        for kind in config.refiners:
            files.extend(plot_run(out / f"seed{seed}" / kind))
    elapsed = time.perf_counter() - started
    table = format_table(rows)
    report = {
        "rows": rows,
        "problems": problems,
        "seeds": config.seed_list(),
        "dataset": data.dataset,
        "split": ev.split,
        "split_check": dict(split_check),
        "sampling": options.to_dict(),
        "backbone_runs": _backbone_runs(options, config),
        "per_seed": stats["per_seed"],
        "pooled": stats["pooled"],
        "validation": validation_stats,
        "power": power,
        "errors": ERRORS_JSON if errors is not None else None,
        "diagnostics": None if diagnostics is None else {"file": DIAGNOSTICS_JSON, "plot": RELIABILITY_PNG,
                                                          "pooled": cr.diagnostics_summary(diagnostics)},
        "elapsed_s": elapsed,
        "checkpoint": {"asked": ev.checkpoint, "fallbacks": sampled["fallbacks"]},
        "config": config.model_dump(mode="json"),
    }
    statistics = cr.statistics_markdown(stats, validation_stats)
    markdown = cr.comparison_markdown(config, report, table, statistics, errors, diagnostics)
    files += [write_json(out / SUMMARY_JSON, report), write_text_atomic(out / SUMMARY_MD, markdown)]
    files.append(plot_paired_comparison(report, out / SUMMARY_PNG))
    reliability = plot_reliability(diagnostics["pooled"], out / RELIABILITY_PNG) if diagnostics else None
    files += [reliability] if reliability is not None else []
    echo(
        f"\n{table}\n\n{statistics}\ntotal {elapsed / 60:.1f} min; wrote {out / SUMMARY_MD}, "
        f"{out / SUMMARY_JSON}, {out / SUMMARY_PNG}"
        + (f", {out / ERRORS_JSON}" if errors else "")
        + (f", {out / DIAGNOSTICS_JSON}, {out / RELIABILITY_PNG}" if diagnostics else "")
        + " and each run's plots/"
    )
    return CompareResult(rows=rows, table=table, out_dir=out, files=files, elapsed_s=elapsed, report=report)


def _backbone_runs(options: Any, config: CompareConfig) -> str:
    if not config.baseline:
        return "no backbone-alone run (baseline: false)"
    if is_deterministic(options):
        return ("sampled once: temperature 0 with low-confidence remasking is deterministic, so every seed "
                "pairs with the same backbone answers")  # fmt: skip
    return "sampled once per seed (temperature > 0 or random remasking: the sampler's seed follows the seed)"
