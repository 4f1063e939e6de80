"""The `eval` and `generate` subcommands: sample a checkpoint's answers, score or print them.

Heavy modules are imported inside the commands (the parser in `cli.py` stays instant).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llada_trm.cli_sampling import sampling_options, sampling_source
from llada_trm.errors import UserError
from llada_trm.text import read_utf8

__all__ = ["cmd_eval", "cmd_generate", "split_label"]


def _bound(value: int | float | None, default: str) -> str:
    if value is None:
        return default
    return f"{round(value * 100)}pct" if isinstance(value, float) else str(value)


def split_label(split: str, limit: int | None = None) -> str:
    """The split and the slice of it evaluated, for a directory name: `test`, `test_0-200` (`test[:200]` or
    `test --limit 200`), `test_100-end`, `test_0-10pct`; a limit on a slice it cannot be folded into (from
    the end, a percentage) is added as `-first<N>`."""
    from llada_trm.data.gsm8k import parse_split

    name, selection = parse_split(split)
    start, stop, suffix = selection.start, selection.stop, ""
    if limit is not None:
        if isinstance(start, float) or isinstance(stop, float) or (start or 0) < 0 or (stop or 0) < 0:
            suffix = f"-first{limit}"
        else:
            stop = (start or 0) + limit if stop is None else min(stop, (start or 0) + limit)
    if start is None and stop is None:
        return name + suffix
    return f"{name}_{_bound(start, '0')}-{_bound(stop, 'end')}{suffix}"


def _default_eval_dir(loaded: Any, dataset: str, split: str, limit: int | None = None) -> Path:
    """`<run>/eval/<dataset>-<split slice>-<refiner>` for a run; `runs/eval/<backbone>/...` for a backbone:
    evaluations of different slices of a split go to different directories."""
    name = f"{dataset}-{split_label(split, limit)}"
    if loaded.run_dir is not None:
        return loaded.run_dir / "eval" / f"{name}-{loaded.refiner}"
    backbone = "embedded" if loaded.source == "embedded" else Path(loaded.source).resolve().name
    return Path("runs") / "eval" / backbone / name


def _join_processes(device: str) -> Any:
    """This process's device; under torchrun the process group is joined first, so that each rank loads the
    model onto its own GPU (LOCAL_RANK) and the evaluation's collectives have a group to run in."""
    from llada_trm.dist_utils import init_distributed
    from llada_trm.evaluate.loading import resolve_eval_device

    return init_distributed(resolve_eval_device(device))


def cmd_eval(args: argparse.Namespace) -> int:
    from llada_trm.dist_utils import is_main_process
    from llada_trm.evaluate.evaluator import evaluate_model, load_eval_records, synthetic_settings
    from llada_trm.evaluate.loading import load_checkpoint

    options = sampling_options(args)  # bad options and data fail before a (possibly 8B) model loads
    if getattr(args, "dry_run", False):
        from llada_trm.dry_run import plan_eval

        plan_eval(args, options)
        return 0
    from llada_trm.evaluate.paired import read_predictions, write_paired

    against = read_predictions(args.against) if args.against else None
    records = None
    if args.dataset == "gsm8k" and args.data_path:
        records = load_eval_records("gsm8k", args.split, data_path=args.data_path, limit=args.limit)
        _check_against(against, records)
    device = _join_processes(args.device)
    loaded = load_checkpoint(
        args.checkpoint, refiner=args.refiner, device=device, dtype=args.dtype,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
    )
    if records is None:
        run = loaded.run_config
        records = load_eval_records(
            args.dataset,
            args.split,
            data_path=run.data.path if run is not None else None,
            synthetic=synthetic_settings(run.data if run is not None else None, loaded.backbone_config),
            limit=args.limit,
        )
        _check_against(against, records)
    out = Path(args.out) if args.out else _default_eval_dir(loaded, args.dataset, args.split, args.limit)
    num_steps = loaded.num_steps
    if args.refine_steps is not None:  # test-time depth: K other than the one the refiner trained at
        if num_steps == 0:
            raise UserError("--refine-steps: this model runs no refiner (--refiner none or a backbone)")
        num_steps = args.refine_steps
    overlap = _overlap(loaded, args.dataset, records)
    result = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        records,
        options,
        num_steps=num_steps,
        out_dir=out,
        metadata={
            "model": loaded.describe(),
            "dataset": args.dataset,
            "split": args.split,
            "sampling_from": sampling_source(args, loaded),
            "refine_steps": num_steps,
            **({"overlap_warning": overlap} if overlap else {}),
        },
        progress=True,
        desc=f"eval {loaded.refiner}",
        diagnostics=not getattr(args, "no_diagnostics", False),
    )
    if is_main_process():  # every rank holds the merged summary; one prints it
        _print_eval_summary(args, loaded.refiner, result.summary, out)
        if result.summary.get("diagnostics"):
            from llada_trm.evaluate.diagnostics import diagnostics_markdown

            print("\n" + diagnostics_markdown({loaded.refiner: result.summary["diagnostics"]}))
        if against is not None:
            print("\n".join(write_paired(against, result.predictions, f"this {loaded.refiner} run", out)))
    return 0


def _overlap(loaded: Any, dataset: str, records: Sequence[Any]) -> str | None:
    """A run's training/validation problems among the evaluated ones: warned about (`compare` refuses it)
    and recorded in the summary."""
    from llada_trm.build import overlap_warning
    from llada_trm.dist_utils import is_main_process

    run = loaded.run_config
    if run is None or dataset != run.data.dataset:
        return None
    warning = overlap_warning(run, list(records))
    if warning and is_main_process():
        print(f"warning: {warning}", file=sys.stderr)
    return warning


def _check_against(against: tuple[Path, list[dict[str, Any]]] | None, records: Sequence[Any]) -> None:
    """Same problems as `--against`, in the same order: checked before any sampling."""
    if against is not None:
        from llada_trm.evaluate.paired import align_predictions

        align_predictions([p["question"] for p in against[1]], [r.question for r in records])


def _print_eval_summary(args: argparse.Namespace, refiner: str, s: dict[str, Any], out: Path) -> None:
    print(
        f"{args.dataset} {args.split} ({s['n']} problems, refiner {refiner}): accuracy strict "
        f"{s['accuracy_strict']:.3f} ({s['correct_strict']}/{s['n']}), flexible {s['accuracy_flexible']:.3f} "
        f"({s['correct_flexible']}/{s['n']})"
    )
    refinement = s.get("refinement")
    if refinement and refiner != "none":
        print(
            f"refinement: {refinement['mean_refine_steps']:.2f} steps per refined chunk, "
            f"{refinement['skipped_fraction']:.1%} of chunks skipped"
        )
    if s.get("prompts"):
        from llada_trm.evaluate.evaluator import prompts_line

        print(prompts_line(s["prompts"], s["sampling"]["gen_length"]))
    empty = s.get("empty_completions", 0)
    if empty > s["n"] / 2:
        print(
            f"warning: {empty} of {s['n']} completions are empty (the model ended its answer at once): the "
            "questions are likely out of this model's domain (the tiny embedded backbone knows only the "
            "generated task: --dataset synthetic), or gen_length / steps are too small for it"
        )
    sampling = s["sampling"]
    print(
        f"sampling: gen_length {sampling['gen_length']}, block_length {sampling['block_length']}, steps "
        f"{sampling['steps']}, threshold {sampling['threshold']}, cache {sampling['cache']} "
        f"({s.get('sampling_from', {}).get('base', 'defaults')})"
    )
    speed = s["speed"]
    rate, calls, seconds = speed["tokens_per_s"], speed["nfe"], speed["total_s"]
    tpf = speed.get("tokens_per_forward")
    tpf_text = f", {tpf:.2f} tokens per forward (TPF)" if tpf else ""
    print(f"speed: {rate:.1f} tokens/s{tpf_text}, {calls} model calls, {seconds:.1f} s in all")
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")


def _questions(args: argparse.Namespace) -> list[str]:
    """The one quoted question, or the lines of `--file` (blank lines skipped)."""
    if (args.question is None) == (args.file is None):
        raise UserError("give either one quoted question or --file FILE (one question a line)")
    if args.file is None:
        if not args.question.strip():
            raise UserError("the question is empty; pass it as one quoted argument")
        return [args.question]
    lines = read_utf8(args.file, ValueError).splitlines()  # a non-UTF-8 byte named with file:line
    questions = [line.strip() for line in lines if line.strip()]
    if not questions:
        raise UserError(f"{args.file}: no questions (write one question a line)")
    return questions


def cmd_generate(args: argparse.Namespace) -> int:
    from llada_trm.data import GSM8KRecord
    from llada_trm.evaluate.evaluator import evaluate_model
    from llada_trm.evaluate.loading import load_checkpoint

    questions = _questions(args)
    if args.out and args.file is None:
        raise UserError("--out writes the answers of a --file batch; for one question the answer is printed")
    watching = getattr(args, "show_steps", False) or getattr(args, "html", None)
    if watching and args.file is not None:
        raise UserError("--show-steps and --html trace one question's denoising; give one quoted question")
    options = sampling_options(args)
    loaded = load_checkpoint(
        args.checkpoint, refiner=args.refiner, device=args.device, dtype=args.dtype,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
    )
    if watching:
        return _generate_traced(args, loaded, questions[0], options)
    records = [GSM8KRecord(question=question, answer="") for question in questions]
    result = evaluate_model(
        loaded.model, loaded.tokenizer, records, options, num_steps=loaded.num_steps, progress=False
    )
    if args.file is not None:
        return _write_answers(args, result.predictions, options)
    prediction = result.predictions[0]
    print(prediction["completion"].strip())
    if args.verbose:
        print(json.dumps({"answer": prediction["prediction_strict"] or prediction["prediction_flexible"],
                          "refinement": result.summary.get("refinement"),
                          "speed": result.summary["speed"]}, indent=2))
    return 0


def _generate_traced(args: argparse.Namespace, loaded: Any, question: str, options: Any) -> int:
    """One answer with its denoising trajectory: printed (`--show-steps`), written as a page (`--html`)."""
    from llada_trm.evaluate.evaluator import answer_questions
    from llada_trm.io import write_text_atomic
    from llada_trm.trajectory import Trajectory, render_html, render_text

    trajectory = Trajectory()
    answers = answer_questions(
        loaded.model, loaded.tokenizer, question, options, num_steps=loaded.num_steps, on_step=trajectory
    )
    if args.show_steps:
        print(render_text(trajectory, loaded.tokenizer, legend=True))
        print()
    print(answers.answers[0])
    if args.verbose:
        stats = {"stats": answers.stats, "nfe": answers.nfe, "elapsed_s": answers.elapsed_s}
        print(json.dumps(stats, indent=2))
    if args.html:
        settings = ", ".join(f"{key} {value}" for key, value in options.to_dict().items())
        settings = f"refiner {loaded.refiner}; {settings}"
        page = render_html(trajectory, loaded.tokenizer, title=question, settings=settings)
        print(f"wrote {write_text_atomic(Path(args.html), page)}")
    return 0


def _write_answers(args: argparse.Namespace, predictions: list[dict[str, Any]], options: Any) -> int:
    """One JSON row per question (question, completion, extracted answer, the sampler settings), written
    atomically to `--out`; without `--out`, the completions one a line on stdout."""
    from llada_trm.io import write_jsonl

    rows = [
        {
            "index": p["index"],
            "question": p["question"],
            "completion": p["completion"].strip(),
            "answer": p["prediction_strict"] or p["prediction_flexible"],
        }
        for p in predictions
    ]
    if args.out is None:
        for row in rows:
            print(" ".join(row["completion"].split()))
        return 0
    sampling = options.to_dict()
    path = write_jsonl(Path(args.out), [{**row, "sampling": sampling} for row in rows])
    print(f"wrote {len(rows)} answers to {path}")
    return 0
