"""The `llada-trm` command line: pretrain, train, eval, generate, plot, compare.

Heavy modules (torch, transformers) are imported inside the subcommands, so `llada-trm --help` is instant.
Every user error (a bad config key, a missing checkpoint or data file, an invalid option) is printed as one
line, `llada-trm: error: ...`, with exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llada_trm.cli_sampling import add_sampling_options, sampling_options, sampling_source
from llada_trm.errors import NonFiniteLossError

__all__ = ["build_parser", "main"]

PROG = "llada-trm"
USAGE_ERROR = 2
RUN_FAILED = 1


class UserError(Exception):
    """A problem the user can fix from the command line (reported without a traceback)."""


# ------------------------------------------------------------------------------------------ subcommands


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from llada_trm.pretrain import load_pretrain_config, pretrain

    config = load_pretrain_config(args.config, args.set)
    result = pretrain(config, progress=not args.no_progress)
    print(
        f"saved {result.output_dir} ({result.parameters / 1e6:.2f}M parameters, {result.steps} steps): "
        f"final loss {result.final_loss:.4f}, masked accuracy {result.masked_accuracy:.3f}, sampled accuracy "
        f"{result.accuracy:.3f}, {result.elapsed_s / 60:.1f} min"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from llada_trm.dist_utils import is_main_process
    from llada_trm.training import run_train

    summary = run_train(args.config, args.set, args.resume, progress=not args.no_progress, force=args.force)
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


def _cmd_cache(args: argparse.Namespace) -> int:
    from llada_trm.config import load_config
    from llada_trm.training.feature_cache import build_feature_cache

    config = load_config(args.config, args.set)
    directory = build_feature_cache(config, progress=not args.no_progress, rebuild=args.rebuild)
    print(f"feature cache ready: {directory} (train with --set advanced.feature_cache=true)")
    return 0



def _default_eval_dir(loaded: Any, dataset: str, split: str) -> Path:
    """`<run>/eval/<dataset>-<split>-<refiner>` for a run; `runs/eval/<backbone>/...` for a backbone."""
    name = f"{dataset}-{split.split('[')[0]}"
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from llada_trm.dist_utils import is_main_process
    from llada_trm.evaluate import evaluate_model, load_checkpoint, load_eval_records, synthetic_settings

    options = sampling_options(args)  # bad options and data fail before a (possibly 8B) model loads
    from llada_trm.evaluate.paired import read_predictions, write_paired

    against = read_predictions(args.against) if args.against else None
    records = None
    if args.dataset == "gsm8k" and args.data_path:
        records = load_eval_records("gsm8k", args.split, data_path=args.data_path, limit=args.limit)
        _check_against(against, records)
    device = _join_processes(args.device)
    loaded = load_checkpoint(args.checkpoint, refiner=args.refiner, device=device, dtype=args.dtype)
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
    out = Path(args.out) if args.out else _default_eval_dir(loaded, args.dataset, args.split)
    result = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        records,
        options,
        num_steps=loaded.num_steps,
        out_dir=out,
        metadata={
            "model": loaded.describe(),
            "dataset": args.dataset,
            "split": args.split,
            "sampling_from": sampling_source(args, loaded),
        },
        progress=not args.no_progress,
        desc=f"eval {loaded.refiner}",
    )
    if is_main_process():  # every rank holds the merged summary; one prints it
        _print_eval_summary(args, loaded.refiner, result.summary, out)
        if against is not None:
            print("\n".join(write_paired(against, result.predictions, f"this {loaded.refiner} run", out)))
    return 0


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
    print(f"speed: {rate:.1f} tokens/s, {calls} model calls, {seconds:.1f} s in all")
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")


def _questions(args: argparse.Namespace) -> list[str]:
    """The one quoted question, or the lines of `--file` (blank lines skipped)."""
    if (args.question is None) == (args.file is None):
        raise UserError("give either one quoted question or --file FILE (one question a line)")
    if args.file is None:
        if not args.question.strip():
            raise UserError("the question is empty; pass it as one quoted argument")
        return [args.question]
    lines = Path(args.file).read_text(encoding="utf-8").splitlines()
    questions = [line.strip() for line in lines if line.strip()]
    if not questions:
        raise UserError(f"{args.file}: no questions (write one question a line)")
    return questions


def _cmd_generate(args: argparse.Namespace) -> int:
    from llada_trm.data import GSM8KRecord
    from llada_trm.evaluate import evaluate_model, load_checkpoint

    questions = _questions(args)
    if args.out and args.file is None:
        raise UserError("--out writes the answers of a --file batch; for one question the answer is printed")
    options = sampling_options(args)
    loaded = load_checkpoint(args.checkpoint, refiner=args.refiner, device=args.device, dtype=args.dtype)
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


def _cmd_plot(args: argparse.Namespace) -> int:
    from llada_trm.plots import plot_run

    written = plot_run(args.run_dir, args.out)
    for path in written:
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from llada_trm.compare import load_compare_config, parse_seeds, run_compare

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    config = load_compare_config(args.config, args.set, seeds)
    run_compare(config, progress=not args.no_progress, force=args.force)
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


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a training run's checkpoint (checkpoints/last or best) or run directory, a backbone directory "
        "in Hugging Face layout, or 'embedded'",
    )
    parser.add_argument(
        "--refiner",
        choices=("none", "mlp", "slot"),
        default=None,
        help="which refiner runs (default: the checkpoint's own; none = the backbone alone)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="backbone dtype (auto: bf16 on a GPU, fp32 on a CPU)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A LLaDA masked-diffusion model with a recursive (TRM-style) refinement head.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, parents=[common])

    p = command("pretrain", "train the tiny embedded backbone from scratch")
    _add_config_options(p, required=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    p = command("train", "train a refiner (phases 1-3) from a run config")
    _add_config_options(p)
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (or a run directory)")
    p.add_argument(
        "--force", action="store_true", help="archive a run in output.dir (as DIR.old-<time>), start anew"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = command("cache", "compute a phase-1 run's frozen-backbone features once (advanced.feature_cache)")
    _add_config_options(p)
    p.add_argument("--rebuild", action="store_true", help="delete an existing (e.g. stale) cache first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_cache)

    p = command("eval", "sampled GSM8K-style accuracy, refinement efficiency and speed")
    _add_model_options(p)
    p.add_argument("--dataset", choices=("gsm8k", "synthetic"), default="synthetic")
    p.add_argument("--split", default="test", help="a split, optionally sliced: test (default), test[:200]")
    p.add_argument("--data-path", metavar="PATH", help="GSM8K JSONL/parquet file or folder (for gsm8k)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N problems")
    p.add_argument("--out", metavar="DIR", help="where predictions.jsonl and summary.json go")
    p.add_argument(
        "--against",
        metavar="RUN_OR_PREDICTIONS",
        help="pair this evaluation with another's predictions on the same problems (a predictions.jsonl, "
        "its eval directory, or a run with one eval): gained / lost, McNemar p, bootstrap interval",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_options(p)
    p.set_defaults(func=_cmd_eval)

    p = command("generate", "answer one question")
    _add_model_options(p)
    p.add_argument("question", nargs="?", help="the question, quoted (or --file)")
    p.add_argument("--file", metavar="FILE", help="answer every line of FILE (one question a line)")
    p.add_argument("--out", metavar="FILE", help="with --file: write the answers as JSON lines to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the extracted answer and stats")
    add_sampling_options(p)
    p.set_defaults(func=_cmd_generate)

    p = command("plot", "PNG plots of a training run's metrics")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output.dir")
    p.add_argument("--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    p.set_defaults(func=_cmd_plot)

    p = command("compare", "the main job: train MLP and slot refiners, compare them with the backbone alone")
    _add_config_options(p)
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        help="training seeds, each refiner trained once per seed, e.g. 0,1,2 (default: the config's seeds)",
    )
    p.add_argument(
        "--force", action="store_true", help="archive a comparison in output.dir (as DIR.old-<time>) first"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compare)
    return parser


def _version() -> str:
    from llada_trm import __version__

    return __version__


# -------------------------------------------------------------------------------------------------- main


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "fix your input": our ValueError subclasses, missing files, UserError."""
    return (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 1 failed run, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except NonFiniteLossError as exc:  # a failed run: the message names the step and the last checkpoint
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return RUN_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
