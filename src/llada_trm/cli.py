"""The `llada-trm` command line: pretrain, train, eval, generate, export, plot, compare.

Heavy modules (torch, transformers) are imported inside the subcommands, so `llada-trm --help` is instant.
Every user error (a bad config key, a missing checkpoint or data file, an invalid option) is printed as one
line, `llada-trm: error: ...`, with exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llada_trm.boundary import report
from llada_trm.cli_eval import cmd_eval, cmd_generate
from llada_trm.cli_sampling import add_sampling_options
from llada_trm.errors import UserError
from llada_trm.progress import plain_progress

__all__ = ["build_parser", "main"]

PROG = "llada-trm"
INTERRUPTED = 130


# ------------------------------------------------------------------------------------------ subcommands


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from llada_trm.pretraining.config import load_pretrain_config
    from llada_trm.pretraining.loop import pretrain

    config = load_pretrain_config(args.config, _output_overrides(args, resume_dir=_pretrain_resume))
    result = pretrain(
        config,
        progress=True,
        resume=args.resume is not None,
        force=args.force,
        command=_pretrain_command(args),
        echo=print,
    )
    if result.interrupted:
        return INTERRUPTED
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


def _output_overrides(
    args: argparse.Namespace, device_key: str = "training.device", resume_dir: Callable[[str], str] = str
) -> list[str]:
    """`--set` overrides, then output.dir as named by `--out` or by `--resume DIR` (both naming different
    directories is an error), then `--device` where the command has it."""
    overrides = list(args.set)
    resume = resume_dir(args.resume) if isinstance(args.resume, str) else None
    named = {str(Path(value)) for value in (args.out, resume) if value}
    if len(named) > 1:
        raise UserError(f"--out {args.out} and --resume {args.resume} name different directories; give one")
    overrides += [f"output.dir={value}" for value in named]
    if getattr(args, "device", None):
        overrides.append(f"{device_key}={args.device}")
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from llada_trm.dist_utils import is_main_process
    from llada_trm.training import run_train

    overrides = [*args.set, *([f"output.dir={args.out}"] if args.out else [])]
    overrides += [f"training.device={args.device}"] if args.device else []
    if args.dry_run:
        from llada_trm.config import load_config
        from llada_trm.dry_run import plan_train

        plan_train(load_config(args.config, overrides))
        return 0
    resume = args.resume
    if resume is True:  # `--resume` alone: the config's own output.dir
        from llada_trm.config import load_config

        resume = load_config(args.config, overrides).output.dir
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


def _cmd_cache(args: argparse.Namespace) -> int:
    from llada_trm.config import load_config
    from llada_trm.training.feature_cache import build_feature_cache

    device = [f"training.device={args.device}"] if args.device else []
    config = load_config(args.config, [*args.set, *device])
    if args.sampler_states:
        from llada_trm.training.sampler_states import build_sampler_states

        directory = build_sampler_states(config, progress=True, rebuild=args.rebuild)
        print(f"sampler states ready: {directory} (train with --set training.sampler_state_ratio=0.25)")
        return 0
    directory = build_feature_cache(config, progress=True, rebuild=args.rebuild)
    print(f"feature cache ready: {directory} (train with --set advanced.feature_cache=true)")
    return 0

def _cmd_reachability(args: argparse.Namespace) -> int:
    import json

    from llada_trm.config import load_config
    from llada_trm.training import Trainer
    from llada_trm.training.validation import format_reachability

    device = [f"training.device={args.device}"] if args.device else []
    config = load_config(args.config, [*args.set, *device])
    if config.model.refiner == "none":
        raise UserError(f"{args.config}: model.refiner is none; reachability measures a refiner's budget")
    report = Trainer(config, progress=False).reachability(max_batches=args.batches)
    if not report:
        raise UserError(f"{args.config}: the run has no validation set (set data.synthetic.n_eval or "
                        "data.eval_split)")  # fmt: skip
    print(format_reachability(report))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from llada_trm.export import export_run

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
    from llada_trm.plots import plot_run

    written = plot_run(args.run_dir, args.out)
    for path in written:
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from llada_trm.compare import load_compare_config, parse_seeds, run_compare

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    config = load_compare_config(args.config, _output_overrides(args, "run.training.device"), seeds)
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
        help="backbone dtype (auto: as the checkpoint stores it when that is bf16/fp16, e.g. LLaDA-8B; "
        "else bf16 on a bf16 GPU, fp32 on a CPU)",
    )
    _add_mismatch_option(parser)


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


def _add_out_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", metavar="DIR", help=f"{what} (overrides output.dir)")


def _add_resume_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR", help=what)


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None,
        help="where the model runs (overrides training.device; cuda: each torchrun rank its own GPU)",
    )


def _add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no redrawn progress bar: plain progress lines (step, loss, lr, s/step, ETA every log_every "
        "steps), as printed whenever stderr is not a terminal",
    )


def _add_dry_run_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (freezing, parameters, memory estimate, data counts, sampler) without reading "
        "weights or writing anything; works on a CPU for a cuda config and before the weights are downloaded",
    )


def _add_mismatch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-backbone-mismatch",
        action="store_true",
        help="load refiner weights recorded on another backbone than this one (a warning, not an error)",
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

    p = command("pretrain", "train the tiny embedded backbone (from scratch, or on from model.init_from)")
    _add_config_options(p, required=False)
    _add_resume_option(
        p, "continue the unfinished run's checkpoint (DIR: the backbone's output.dir; default: the config's)"
    )
    _add_out_option(p, "where the backbone goes")
    p.add_argument("--output", dest="out", action=_DeprecatedOption, new="--out", help=argparse.SUPPRESS)
    p.add_argument(
        "--force", action="store_true",
        help="archive an existing output.dir backbone and an unfinished run (as DIR.old-<time>), start anew",
    )
    _add_progress_option(p)
    p.set_defaults(func=_cmd_pretrain)

    p = command("train", "train a refiner (phases 1-3) from a run config")
    _add_config_options(p)
    _add_resume_option(
        p, "continue from a checkpoint or a run directory (default: the run in the config's output.dir)"
    )
    _add_out_option(p, "the run directory")
    _add_device_option(p)
    p.add_argument(
        "--force", action="store_true", help="archive a run in output.dir (as DIR.old-<time>), start anew"
    )
    _add_progress_option(p)
    _add_mismatch_option(p)  # for --resume and training.init_from
    _add_dry_run_option(p)
    p.set_defaults(func=_cmd_train)

    p = command("cache", "compute a phase-1 run's frozen-backbone features once (advanced.feature_cache)")
    _add_config_options(p)
    p.add_argument(
        "--rebuild", action="store_true", help="delete an existing (e.g. stale) cache first (only a cache)"
    )
    p.add_argument(
        "--sampler-states",
        action="store_true",
        help="record the frozen backbone's sampler states instead (training.sampler_state_ratio)",
    )
    _add_device_option(p)
    _add_progress_option(p)
    p.set_defaults(func=_cmd_cache)

    p = command("reachability", "the share of the backbone's wrong tokens a run's update budget can flip")
    _add_config_options(p)
    p.add_argument("--batches", type=int, default=None, metavar="N",
                   help="validation batches to read (default: training.eval_max_batches)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the whole report as JSON")
    _add_device_option(p)
    p.set_defaults(func=_cmd_reachability)

    p = command("eval", "sampled GSM8K-style accuracy, refinement efficiency and speed")
    _add_model_options(p)
    p.add_argument("--dataset", choices=("gsm8k", "synthetic", "arithmetic"), default="synthetic")
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
    p.add_argument("--refine-steps", type=int, default=None, metavar="K",
                   help="refinement steps per model call at test time (default: the K the refiner trained "
                   "with); test-time depth")  # fmt: skip
    p.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="skip the per-commit records and the confident-error diagnostics (first errors at p >= 0.9, "
        "tokens the refiner changed, reliability)",
    )
    _add_progress_option(p)
    _add_dry_run_option(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_eval)

    p = command("generate", "answer one question")
    _add_model_options(p)
    p.add_argument("question", nargs="?", help="the question, quoted (or --file)")
    p.add_argument("--file", metavar="FILE", help="answer every line of FILE (one question a line)")
    p.add_argument("--out", metavar="FILE", help="with --file: write the answers as JSON lines to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the extracted answer and stats")
    p.add_argument(
        "--show-steps",
        action="store_true",
        help="print the denoising trajectory: what each step committed, which chunks the refiner refined",
    )
    p.add_argument(
        "--html", metavar="FILE", help="write the denoising trajectory as a self-contained HTML page"
    )
    add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = command("export", "write a trained run as one self-contained directory that load_checkpoint reads")
    p.add_argument("run", metavar="RUN", help="a run directory, or its checkpoints/last or best")
    p.add_argument(
        "--out", metavar="DIR", help="the directory to write (refused if it exists, unless --force)"
    )
    p.add_argument("old_out", nargs="?", metavar="OUT", help=argparse.SUPPRESS)  # deprecated: use --out
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="the exported backbone's dtype (auto: as the run's backbone stores it)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="split the backbone into shards of this size")
    p.add_argument(
        "--force", action="store_true", help="archive an existing export in --out (as OUT.old-<time>)"
    )
    _add_mismatch_option(p)
    p.set_defaults(func=_cmd_export)

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
    _add_resume_option(
        p,
        "reuse the trained models and evaluations already in the comparison's directory (DIR, default: "
        "output.dir; an interrupted study, or seeds run in parallel with --seeds), train and sample the "
        "rest, then write the report",
    )
    _add_out_option(p, "the comparison's directory")
    _add_device_option(p)
    _add_progress_option(p)
    _add_dry_run_option(p)
    p.set_defaults(func=_cmd_compare)
    return parser


def _version() -> str:
    from llada_trm import __version__

    return __version__


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 1 failed run, 130 interrupted).

    Every failure the user can act on (`boundary.describe_failure`: bad input, any OSError, a failed write,
    input nested too deeply, ...) is one line on stderr; only a bug keeps its traceback (and --debug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
