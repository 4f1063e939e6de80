"""The `llada-trm` command line: pretrain, train, eval, generate, export, plot, compare, convert.

Heavy modules (torch, transformers) are imported inside the subcommands, so `llada-trm --help` is instant;
every user error is one line, `llada-trm: error: ...` (`boundary.report`), unless `--debug`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from llada_trm import __version__
from llada_trm.boundary import report
from llada_trm.errors import UserError
from llada_trm.progress import plain_progress
from llada_trm.text import read_utf8

PROG = "llada-trm"
INTERRUPTED = 130
OFF = "off"  # --threshold / --cache: the word `evaluate.loading.resolve_sampling` reads as "switch off"
# The sampler flags of eval and generate: (type or choices, help). Unset, each is the checkpoint's own value
# (a run's `sampling:` section, or the default shown for a bare backbone), so a run is sampled as it trained.
_SAMPLING: dict[str, tuple[Any, str]] = {
    "steps": (int, "denoising steps in all (backbone: 64)"),
    "gen_length": (int, "answer tokens (backbone: 128)"),
    "block_length": (int, "semi-AR block (backbone: 32)"),
    "temperature": (float, "0 = greedy (backbone: 0)"),
    "remasking": (("low_confidence", "random"), "which positions a step commits (backbone: low_confidence)"),
    "threshold": (None, f"Fast-dLLM's parallel decoding threshold, e.g. 0.9; {OFF}: LLaDA's (backbone)"),
    "cache": (("prefix", "dual", OFF), "Fast-dLLM's block-wise KV cache (backbone: off)"),
    "cfg_scale": (float, "classifier-free guidance (backbone: 0)"),
    "batch_size": (int, "problems per batch (backbone: 16)"),
    "seed": (int, "seed of the sampling noise (backbone: 0)"),
}
SAMPLING_FLAGS = tuple(_SAMPLING)


# ------------------------------------------------------------------------------------------ subcommands


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from llada_trm.extras.pretraining.config import load_pretrain_config
    from llada_trm.extras.pretraining.run import pretrain

    config = load_pretrain_config(args.config, _output_overrides(args, resume_dir=_pretrain_resume))
    result = pretrain(
        config,
        progress=True,
        resume=args.resume is not None,
        force=args.force,
        command=_pretrain_command(args),
        echo=print,
    )
    test = result.test["strict_interval"]
    print(
        f"saved {result.output_dir} ({result.parameters / 1e6:.2f}M parameters, {result.steps} steps): "
        f"final loss {result.final_loss:.4f}, masked accuracy {result.masked_accuracy:.3f}, test strict "
        f"accuracy {result.accuracy:.3f} [{test['low']:.3f}, {test['high']:.3f}] on {test['n']} problems, "
        f"{result.elapsed_s / 60:.1f} min"
    )
    return 0


def _pretrain_command(args: argparse.Namespace) -> str:
    """The command that trains this backbone, for its model card (a resumed run equals an uninterrupted one,
    so --resume, --force and --no-progress are left out)."""
    words = [PROG, "pretrain", *(["--config", args.config] if args.config else [])]
    words += [word for value in args.set for word in ("--set", value)]
    out = args.out or (_pretrain_resume(args.resume) if isinstance(args.resume, str) else None)
    return shlex.join(words + (["--out", out] if out else []))


def _pretrain_resume(directory: str) -> str:
    """`pretrain --resume DIR`: DIR is the backbone's output.dir, or its unfinished `DIR.partial`."""
    return directory[: -len(".partial")] if directory.rstrip("/").endswith(".partial") else directory


def _output_overrides(args: argparse.Namespace, resume_dir: Callable[[str], str] = str) -> list[str]:
    """`--set` overrides, then output.dir as named by `--out` or by `--resume DIR` (both naming different
    directories is an error)."""
    overrides = list(args.set)
    resume = resume_dir(args.resume) if isinstance(getattr(args, "resume", None), str) else None
    named = {str(Path(value)) for value in (getattr(args, "out", None), resume) if value}
    if len(named) > 1:
        raise UserError(f"--out {args.out} and --resume {args.resume} name different directories; give one")
    overrides += [f"output.dir={value}" for value in named]
    return overrides


def _run_flags(args: argparse.Namespace) -> AbstractContextManager[None]:
    """The command's flags that are run constants, not settings (`config.FLAGS`: `--device`, `--log-every`,
    `--tensorboard`), set for the command's duration (`config.fixed_settings`)."""
    from llada_trm.config import fixed_settings

    values: dict[str, Any] = {}
    if getattr(args, "device", None):
        values["training.device"] = args.device
    if getattr(args, "log_every", None) is not None:
        values["training.log_every"] = args.log_every
    if getattr(args, "tensorboard", False):
        values["output.tensorboard"] = True
    return fixed_settings(values)


def _cmd_train(args: argparse.Namespace) -> int:
    from llada_trm.config import load_config
    from llada_trm.dist_utils import is_main_process
    from llada_trm.training.loop import run_train

    overrides = [*args.set, *([f"output.dir={args.out}"] if args.out else [])]
    if args.dry_run:
        from llada_trm.dry_run import plan_train

        with _run_flags(args):
            plan_train(load_config(args.config, overrides))
        return 0
    resume = args.resume
    if resume is True:  # `--resume` alone: the config's own output.dir
        resume = load_config(args.config, overrides).output.dir
    with _run_flags(args):  # where it runs, how often it logs, TensorBoard: the command's, not the run's
        summary = run_train(
            args.config, overrides, resume, progress=True, force=args.force,
            allow_backbone_mismatch=args.allow_backbone_mismatch,
        )
    if not is_main_process():  # under torchrun every rank returns the summary; one prints it
        return 0
    if summary.get("already_finished"):
        steps, checkpoint = summary["steps"], summary["checkpoint"]
        print(f"nothing to do: the run finished at step {steps}; checkpoint: {checkpoint}")
        return 0
    val = summary.get("val") or {}
    parts = [f"trained {summary['steps']} steps in {summary['elapsed_s'] / 60:.1f} min"]
    if summary.get("train_loss") is not None:
        parts.append(f"train loss {summary['train_loss']:.4f}")
    if "loss" in val:
        parts.append(f"val loss {val['loss']:.4f} (backbone {val.get('loss_base', float('nan')):.4f})")
    if "accuracy" in val:
        base = val.get("accuracy_base", float("nan"))
        parts.append(f"val masked accuracy {val['accuracy']:.3f} (backbone {base:.3f})")
    print("; ".join(parts))
    print(f"checkpoint: {summary['checkpoint']}")
    for warning in summary.get("health_warnings") or []:
        print(f"health warning: {warning}")
    return 0


# ------------------------------------------------------------------------------------- eval and generate


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


def _cmd_eval(args: argparse.Namespace) -> int:
    from llada_trm.dist_utils import init_distributed, is_main_process
    from llada_trm.evaluate.evaluator import evaluate_model, load_eval_records, synthetic_settings
    from llada_trm.evaluate.loading import load_checkpoint, resolve_eval_device

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
    device = init_distributed(resolve_eval_device(args.device))  # under torchrun: each rank its own GPU
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from llada_trm.data.gsm8k import GSM8KRecord
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
    from llada_trm.extras.trajectory import Trajectory, render_html, render_text
    from llada_trm.io import write_text_atomic

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


# ------------------------------------------------------------------------------------------ sampler flags


def sampling_options(args: argparse.Namespace) -> Any:
    """The checkpoint's sampler settings (a trained run's `sampling:` section, LLaDA's defaults for a
    backbone) with every flag the user gave in place of its value (`off` switches threshold / cache off);
    read before any weights load, so bad settings fail first."""
    from llada_trm.evaluate.loading import resolve_sampling

    return resolve_sampling(args.checkpoint, {name: getattr(args, name, None) for name in SAMPLING_FLAGS})


def _threshold(text: str) -> float | str:
    """`--threshold`: a confidence in (0, 1], or `off` for LLaDA's fixed schedule."""
    if text == OFF:
        return OFF
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or '{OFF}', got {text!r}") from None


def sampling_source(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """Where the effective `sampling` of a summary came from: the run's config or the defaults, and which
    settings the command line replaced."""
    flags = sorted(name for name in SAMPLING_FLAGS if getattr(args, name, None) is not None)
    return {"base": "run config" if loaded.run_config is not None else "defaults", "flags": flags}


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The sampler flags (`_SAMPLING`), each None unless given."""
    group = parser.add_argument_group(
        "sampling (default: a trained run's `sampling:` settings; for a backbone, the values shown)"
    )
    for name, (kind, text) in _SAMPLING.items():
        kind = _threshold if name == "threshold" else kind
        choices = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        group.add_argument(f"--{name.replace('_', '-')}", default=None, help=text, **choices)


def _cmd_cache(args: argparse.Namespace) -> int:
    from llada_trm.config import load_config
    from llada_trm.training.feature_cache import build_feature_cache

    config = load_config(args.config, _output_overrides(args))
    with _run_flags(args):
        directory = build_feature_cache(config, progress=True, rebuild=args.rebuild)
    print(f"feature cache ready: {directory} (train with --set advanced.feature_cache=true)")
    return 0


def _cmd_reachability(args: argparse.Namespace) -> int:
    from llada_trm.config import load_config
    from llada_trm.training.loop import Trainer
    from llada_trm.training.validation import format_reachability

    config = load_config(args.config, _output_overrides(args))
    if config.model.refiner == "none":
        raise UserError(f"{args.config}: model.refiner is none; reachability measures a refiner's budget")
    with _run_flags(args):
        report = Trainer(config, progress=False).reachability(max_batches=args.batches)
    if not report:
        raise UserError(f"{args.config}: the run has no validation set (set data.n_eval)")
    print(format_reachability(report))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from llada_trm.extras.export import export_run

    if (args.out is None) == (args.old_out is None):
        raise UserError("name the export directory once: llada-trm export RUN --out DIR")
    if args.old_out is not None:
        _deprecated("export's positional OUT", "--out OUT")
    result = export_run(
        args.run, args.out or args.old_out, dtype=args.dtype, force=args.force,
        max_shard_size=args.max_shard_size,
        allow_backbone_mismatch=args.allow_backbone_mismatch,
    )
    print(f"exported {args.run} to {result.directory} (backbone {result.dtype}): {', '.join(result.files)}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from llada_trm.study.plots import plot_run

    written = plot_run(args.run_dir, args.out)
    for path in written:
        print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from llada_trm.convert import convert_path

    convert_path(args.source, args.out)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from llada_trm.study.compare import run_compare
    from llada_trm.study.config import load_compare_config, parse_seeds

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    config = load_compare_config(args.config, _output_overrides(args), seeds)
    with _run_flags(args):
        if args.dry_run:
            from llada_trm.dry_run import plan_compare

            plan_compare(config)
            return 0
        run_compare(config, progress=True, force=args.force, resume=args.resume is not None)
    return 0


# ------------------------------------------------------------------------------------------------ parser


def _add_config_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    hint = "YAML config file" + ("" if required else " (default: the built-in defaults)")
    parser.add_argument("--config", required=required, metavar="FILE", help=hint)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted key, e.g. --set training.lr=3e-4 (repeatable)",
    )


def _deprecated(old: str, new: str) -> None:
    """One line on stderr for an old spelling that still works this release."""
    print(f"{PROG}: warning: {old} is deprecated, use {new} (the old spelling goes in the next release)",
          file=sys.stderr)  # fmt: skip


class _DeprecatedOption(argparse.Action):
    """An old option spelling: stores into the new option's `dest`, with a one-line warning."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None):
        _deprecated(str(option_string), self.new)
        setattr(namespace, self.dest, values)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of steps, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A LLaDA masked-diffusion model with a recursive (TRM-style) refinement head."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def shared(*names: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A parent parser holding one option that several commands take."""
        holder = argparse.ArgumentParser(add_help=False)
        holder.add_argument(*names, **kwargs)
        return holder

    common = shared("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    progress = shared("--no-progress", action="store_true", help="plain progress lines, not a redrawn bar")
    dry_run = shared("--dry-run", action="store_true", help="print the plan; read no weights, write nothing")
    device = shared(
        "--device", choices=("auto", "cpu", "cuda"), default=None,
        help="where the run computes (default auto: cuda when torch sees a GPU, else cpu)",
    )
    mismatch = shared(
        "--allow-backbone-mismatch", action="store_true",
        help="load refiner weights recorded on another backbone (a warning, not an error)",
    )
    force = shared("--force", action="store_true", help="archive what the output holds (as DIR.old-<time>)")
    model = argparse.ArgumentParser(add_help=False, parents=[mismatch])  # what eval and generate load
    model.add_argument(
        "--checkpoint", required=True, metavar="DIR",
        help="a run (or its checkpoints/last, best), an HF-layout backbone directory, or 'embedded'",
    )
    model.add_argument(
        "--refiner", choices=("none", "mlp", "slot"), default=None,
        help="which refiner runs (default: the checkpoint's own; none = the backbone alone)",
    )
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    model.add_argument("--dtype", default="auto", choices=dtypes, help="backbone dtype (auto: build.py)")

    def command(name: str, summary: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, parents=[common, *parents])

    p = command("pretrain", "train the tiny embedded backbone (or on from model.init_from)", progress, force)
    _add_config_options(p, required=False)
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--out", metavar="DIR", help="where the backbone goes (overrides output.dir)")
    p.add_argument("--output", dest="out", action=_DeprecatedOption, new="--out", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_pretrain)

    # mismatch: for --resume and training.init_from
    p = command("train", "train a refiner (phases 1-3)", device, progress, mismatch, dry_run, force)
    _add_config_options(p)
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR", help="continue a run (or output.dir's)")
    p.add_argument("--out", metavar="DIR", help="the run directory (overrides output.dir)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument(
        "--log-every", type=_positive_int, default=None, metavar="N",
        help="write a training_metrics.csv row every N optimizer steps (default 10)",
    )
    p.set_defaults(func=_cmd_train)

    p = command("cache", "compute a phase-1 run's frozen-backbone features once", device, progress)
    _add_config_options(p)
    p.add_argument("--rebuild", action="store_true", help="delete an existing cache first (only a cache)")
    p.set_defaults(func=_cmd_cache)

    p = command("reachability", "the share of the backbone's wrong tokens a run's budget can flip", device)
    _add_config_options(p)
    p.add_argument("--batches", type=int, default=None, metavar="N", help="validation batches (default: all)")
    p.add_argument("--json", action="store_true", help="also print the whole report as JSON")
    p.set_defaults(func=_cmd_reachability)

    p = command("eval", "sampled accuracy, refinement efficiency and speed", model, progress, dry_run)
    p.add_argument("--dataset", choices=("gsm8k", "synthetic", "arithmetic"), default="synthetic")
    p.add_argument("--split", default="test", help="a split, optionally sliced: test (default), test[:200]")
    p.add_argument("--data-path", metavar="PATH", help="GSM8K JSONL/parquet file or folder (for gsm8k)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N problems")
    p.add_argument("--out", metavar="DIR", help="where predictions.jsonl and summary.json go")
    p.add_argument(
        "--against", metavar="RUN_OR_PREDICTIONS",
        help="pair with another evaluation's predictions on the same problems (McNemar, bootstrap)",
    )
    p.add_argument("--refine-steps", type=int, default=None, metavar="K", help="test-time refinement depth")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the confident-error diagnostics")
    add_sampling_options(p)
    p.set_defaults(func=_cmd_eval)

    p = command("generate", "answer one question", model)
    p.add_argument("question", nargs="?", help="the question, quoted (or --file)")
    p.add_argument("--file", metavar="FILE", help="answer every line of FILE (one question a line)")
    p.add_argument("--out", metavar="FILE", help="with --file: write the answers as JSON lines to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the extracted answer and stats")
    p.add_argument("--show-steps", action="store_true", help="print the denoising trajectory")
    p.add_argument("--html", metavar="FILE", help="write the denoising trajectory as an HTML page")
    add_sampling_options(p)
    p.set_defaults(func=_cmd_generate)

    p = command("export", "write a trained run as one directory that load_checkpoint reads", mismatch, force)
    p.add_argument("run", metavar="RUN", help="a run directory, or its checkpoints/last or best")
    p.add_argument("--out", metavar="DIR", help="the directory to write (refused if it exists but --force)")
    p.add_argument("old_out", nargs="?", metavar="OUT", help=argparse.SUPPRESS)  # deprecated: use --out
    p.add_argument("--dtype", default="auto", choices=dtypes, help="the exported backbone's dtype")
    p.add_argument("--max-shard-size", default="5GB", help="split the backbone into shards of this size")
    p.set_defaults(func=_cmd_export)

    p = command("plot", "PNG plots of a training run's metrics")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output.dir")
    p.add_argument("--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    p.set_defaults(func=_cmd_plot)

    p = command("compare", "train refiners, compare them with the backbone", device, progress, dry_run, force)
    _add_config_options(p)
    p.add_argument("--seeds", metavar="S,S,...", help="training seeds, e.g. 0,1,2 (default: the config's)")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR", help="reuse what DIR holds")
    p.add_argument("--out", metavar="DIR", help="the comparison's directory (overrides output.dir)")
    p.set_defaults(func=_cmd_compare)

    p = command("convert", "bring an older run config, compare config, run or checkpoint up to date")
    p.add_argument("source", metavar="OLD", help="a config YAML, a run directory or a checkpoint directory")
    p.add_argument("--out", required=True, metavar="NEW", help="the new file or directory (must not exist)")
    p.set_defaults(func=_cmd_convert)
    return parser


# -------------------------------------------------------------------------------------------------- main


def _know_every_config() -> None:
    """Load every command's config schema (`schema.command_schema`), so that a file given to the wrong command
    is named for the command it belongs to."""
    import llada_trm.config
    import llada_trm.extras.pretraining.config
    import llada_trm.study.config  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 1 failed run, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            _know_every_config()
        with plain_progress(getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        status = report(PROG, exc, lambda line: print(line, file=sys.stderr))
        if status is None:
            raise
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
