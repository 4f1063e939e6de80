"""The current tree against a git ref, side by side in one run: sampling and phase-1 training speed.

Issue 25 asks that the redesign leave sampling and training no slower than the commit before it (04476e5).
Timings on a shared machine drift with its load, so both trees are measured in the same run, in alternating
rounds (current then ref on even rounds, ref then current on odd ones), and each round's ratio pairs two
measurements taken minutes apart under the same load. The default clock is each child's CPU time
(`--clock cpu`): on a machine loaded past its cores, wall time mostly measures the wait for a core.

The ref is checked out into a temporary git worktree that this script creates and removes (also on an error
or Ctrl-C); nothing else in the repository is touched. Every measurement runs in a fresh subprocess of the
same interpreter (sys.executable) with PYTHONPATH set to that tree's src/, so each tree runs its own code.

Workloads (the recipe of configs/compare_tiny.yaml: chunk_selection all, halting none, K = 4):
  sample: backbone alone / sample: + slot refiner
      the embedded backbone (fp32) alone and inside the hybrid with a random slot refiner (built from the
      recipe config below by the tree's `build.hybrid_config`), sampling a fixed set of the generated task's
      test prompts with threshold 0.9 + prefix cache, gen 64, block 32; the two models alternate batch by
      batch in one process. Unit: seconds per prompt (NFE printed beside it). Only API present in both
      trees is used (llada_trm's lazy exports, build.hybrid_config, data.collate.prompt_batch).
  train: slot / train: mlp
      phase-1 optimizer steps of the recipe (answer_structure masks, batch 16) through each tree's own
      `Trainer`, timed between consecutive `optimizer.step()` calls after the warm-up steps (so setup, the
      final checkpoint and the reachability pass are not timed). The run config is the `run:` section of the
      REF tree's configs/compare_tiny.yaml; for a tree that has `llada-trm convert` (the current one) it is
      converted with that tree's own command at run time, so both run the same recipe whatever today's
      schema is.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_versions.py --quick   # 8-12 min, loaded 2-core CPU
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_versions.py --rounds 6 --ref 04476e5
    .venv/bin/python bench/bench_versions.py --workloads train-slot --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REF = "04476e5"  # the commit before issue 25's redesign
SCRIPT_COPY = "bench_versions.py"  # the children's copy of this script, in the run's temporary directory
RESULT_MARK = "BENCH_VERSIONS_RESULT "  # the child's one result line on stdout starts with this
WORKLOADS = ("sampling", "train-slot", "train-mlp")

# configs/compare_tiny.yaml's sampler (`run.sampling`) and the generated task the embedded backbone was
# trained on (`run.data.synthetic`); the hybrid comes from its `run.model` (`recipe_configs`).
RECIPE_SAMPLING = {"steps": 64, "gen_length": 64, "block_length": 32, "threshold": 0.9, "cache": "prefix"}
RECIPE_TASK = {"min_steps": 1, "max_steps": 2, "max_number": 12, "max_result": 100, "seed": 0}
TRAIN_PROBLEMS = 2000  # the training runs' data.synthetic.n_train (the recipe's 20000 only slows the setup)


class BenchError(Exception):
    """A problem the user can fix; printed as one line."""


@dataclass(frozen=True)
class Sizes:
    """How much each child measures."""

    prompts: int  # sampling: test prompts per child
    batch_size: int  # sampling: prompts per sampler call
    warmup_steps: int  # training: optimizer steps before the timed ones
    steps: int  # training: timed optimizer steps


QUICK = Sizes(prompts=16, batch_size=8, warmup_steps=2, steps=8)
FULL = Sizes(prompts=32, batch_size=16, warmup_steps=3, steps=30)


@dataclass
class Series:
    """One workload's per-round times (seconds per unit) for each tree, plus what else the child reported."""

    name: str
    unit: str
    extra_name: str = ""  # what `extra` holds (sampling: NFE), empty when the child reports nothing else
    times: dict[str, list[float]] = field(default_factory=lambda: {"current": [], "ref": []})
    extra: dict[str, list[float]] = field(default_factory=lambda: {"current": [], "ref": []})
    command: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default=DEFAULT_REF,
                        help=f"git ref to compare against (default {DEFAULT_REF})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds per workload (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer prompts and steps ({QUICK.prompts} prompts, {QUICK.steps} timed steps)")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="cpu (default): the child's CPU time, which other jobs on a shared machine "
                        "do not inflate (one torch thread: OMP_NUM_THREADS=1); wall: what a user waits "
                        "(the only clock that sees a GPU)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one measurement
    parser.add_argument("--child-config", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-sizes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-clock", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"--workloads: unknown {unknown or 'empty list'}; choose from {', '.join(WORKLOADS)}")
    return args


# --- the temporary worktree ------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    """`git -C repo args...`; a failure becomes a BenchError carrying git's own message."""
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def resolve_commit(repo: Path, ref: str) -> str:
    """The full commit hash `ref` names in `repo`, or a one-line error naming the ref."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except BenchError:
        raise BenchError(f"--ref {ref!r} is not a commit in {repo}; pass a hash, branch or tag "
                         "(`git log --oneline` lists them)") from None


@contextlib.contextmanager
def ref_worktree(repo: Path, ref: str) -> Iterator[Path]:
    """A detached worktree of `ref` in a new temporary directory, removed on exit however the block ends.

    Only what this function made is removed: its worktree (via `git worktree remove`, which also drops the
    worktree's entry under .git/worktrees) and its temporary directory. No `git worktree prune`, which would
    also drop other people's stale entries.
    """
    commit = resolve_commit(repo, ref)
    parent = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    tree = parent / "ref"
    try:
        git(repo, "worktree", "add", "--detach", str(tree), commit)
        yield tree
    finally:
        if tree.exists():
            with contextlib.suppress(BenchError):
                git(repo, "worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)


def describe_tree(tree: Path) -> str:
    """`<short hash>` plus a note when the tree has uncommitted changes to tracked files."""
    head = git(tree, "rev-parse", "--short", "HEAD")
    dirty = git(tree, "status", "--porcelain", "--untracked-files=no")
    return f"{head}{' + uncommitted changes' if dirty else ''}"


# --- the parent: configs, rounds, children, report ------------------------------------------------------


def round_order(round_index: int) -> tuple[str, str]:
    """Current first on even rounds, the ref first on odd ones, so neither always runs on a warmer machine."""
    return ("current", "ref") if round_index % 2 == 0 else ("ref", "current")


def recipe_configs(trees: dict[str, Path], workdir: Path) -> dict[tuple[str, str], Path]:
    """Per (tree, refiner): the ref's compare_tiny.yaml `run:` section (the hybrid of the sampling workload,
    the run of the training ones), converted for a tree that has `llada-trm convert` (with that tree's own
    converter, so today's schema changes are followed) and used as it is by one that has not."""
    import yaml  # noqa: PLC0415 (PyYAML, the project's dependency: only the parent reads YAML)

    source = trees["ref"] / "configs" / "compare_tiny.yaml"
    if not source.is_file():
        raise BenchError(f"{source} not found: the ref has no recipe config to train with; pick a ref that "
                         "has configs/compare_tiny.yaml")
    run = yaml.safe_load(source.read_text())["run"]
    paths: dict[tuple[str, str], Path] = {}
    for refiner in ("slot", "mlp"):
        config = copy.deepcopy(run)
        config["model"]["refiner"] = refiner
        config["output"]["dir"] = "run"  # relative: each child runs in its own fresh directory
        # TRAIN_PROBLEMS generated training problems instead of 20000: the same distribution of batches, so
        # the same step time, for a tenth of the setup (generating 20000 takes ~4 s of CPU per child)
        if "n_train" in config.get("data", {}).get("synthetic", {}):
            config["data"]["synthetic"]["n_train"] = TRAIN_PROBLEMS
        old = workdir / f"recipe-{refiner}.yaml"
        old.write_text(yaml.safe_dump(config, sort_keys=False))
        for label, tree in trees.items():
            path = old
            if (tree / "src" / "llada_trm" / "convert.py").is_file():
                path = workdir / f"recipe-{refiner}-{label}.yaml"
                convert = [sys.executable, "-m", "llada_trm", "convert", str(old), "--out", str(path)]
                child_run(convert, tree, workdir)
            paths[label, refiner] = path
    return paths


def child_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "src")
    return env


def child_run(command: list[str], tree: Path, cwd: Path) -> str:
    """Run `command` with `tree`'s src/ on the path; its stdout, or a BenchError with its output's tail."""
    done = subprocess.run(command, cwd=cwd, env=child_env(tree), capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BenchError(f"`PYTHONPATH={tree / 'src'} {shlex.join(command)}` failed "
                         f"(exit {done.returncode}):\n{tail}")
    return done.stdout


def measure(workload: str, tree: Path, config: Path | None, args: argparse.Namespace, workdir: Path) -> dict:
    """One measurement of `workload` with `tree`'s code, in a fresh process and a fresh directory."""
    command = child_command(workload, config, args, workdir)
    cwd = Path(tempfile.mkdtemp(prefix=f"{workload}-", dir=workdir))
    out = child_run(command, tree, cwd)
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise BenchError(f"{shlex.join(command)} printed no result line:\n{out[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    expected = (tree / "src").resolve()
    if not Path(result["package"]).resolve().is_relative_to(expected):
        raise BenchError(f"the child imported llada_trm from {result['package']}, not from {expected}: "
                         "an installed copy shadows PYTHONPATH; reinstall the package in editable mode")
    shutil.rmtree(cwd, ignore_errors=True)
    return result


def child_command(workload: str, config: Path | None, args: argparse.Namespace, workdir: Path) -> list[str]:
    """The child's command line: the copy of this script in `workdir` (see `main`), in child mode."""
    sizes = QUICK if args.quick else FULL
    sizes_json = json.dumps(sizes.__dict__, separators=(",", ":"))
    command = [sys.executable, str(workdir / SCRIPT_COPY), "--child", workload,
               "--child-clock", args.clock, "--child-sizes", sizes_json]
    if config is not None:
        command += ["--child-config", str(config)]
    return command


def run_rounds(args: argparse.Namespace, trees: dict[str, Path], workdir: Path) -> list[Series]:
    """Every workload, `args.rounds` times per tree, the trees alternating within each round."""
    configs = recipe_configs(trees, workdir)
    series: dict[str, Series] = {}
    for index in range(args.rounds):
        for workload in args.workloads:
            for label in round_order(index):
                config = configs[label, "slot" if workload == "sampling" else workload.removeprefix("train-")]
                started = time.perf_counter()
                result = measure(workload, trees[label], config, args, workdir)
                for name, entry in result["series"].items():
                    s = series.setdefault(name, Series(name, entry["unit"], entry.get("extra", "")))
                    s.times[label].append(entry["seconds"])
                    s.extra[label].append(entry.get("extra_value", 0.0))
                    if label == "current":  # the ref's differs only in PYTHONPATH and its unconverted config
                        command = shlex.join(child_command(workload, config, args, workdir))
                        s.command = f"PYTHONPATH={ROOT / 'src'} " + command.replace(str(workdir), "$WORKDIR")
                print(f"  round {index + 1}/{args.rounds} {workload:<10} {label:<7} "
                      f"{time.perf_counter() - started:6.1f} s  " + ", ".join(
                          f"{n} {e['seconds']:.4g}" for n, e in result["series"].items()), flush=True)
    return list(series.values())


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if len(values) > 1 else "(1 round)"


def report(series: list[Series]) -> None:
    """Per workload: median seconds per unit for each tree, the median per-round ratio and its range."""
    print("\n| workload | unit | current (median) | ref (median) | current / ref | per-round min-max "
          "| rounds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for s in series:
        ratios = [c / r for c, r in zip(s.times["current"], s.times["ref"], strict=True)]
        print(f"| {s.name} | {s.unit} | {statistics.median(s.times['current']):.4g} | "
              f"{statistics.median(s.times['ref']):.4g} | **{statistics.median(ratios):.3f}** | "
              f"{spread(ratios)} | {len(ratios)} |")
    for s in series:
        if s.extra_name and set(s.extra["current"]) != set(s.extra["ref"]):
            print(f"note: {s.name}: {s.extra_name} differs between the trees "
                  f"(current {sorted(set(s.extra['current']))}, ref {sorted(set(s.extra['ref']))}): "
                  "the trees did different work, so the time ratio mixes speed and work")
        elif s.extra_name:
            print(f"{s.name}: {s.extra_name} {s.extra['current'][0]:g} in both trees")
    print("\nEach measurement, run once per tree and round in a fresh directory. $WORKDIR is this run's "
          "temporary directory: a copy of this script; recipe-<refiner>.yaml, the ref's compare_tiny.yaml "
          "`run:` with model.refiner, output.dir and n_train 2000 set, which the ref reads; "
          "recipe-<refiner>-current.yaml, that file converted by the current tree's `llada-trm convert`.")
    for s in series:
        print(f"  {s.name}: {s.command}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    # A `kill` unwinds like Ctrl-C does, so the worktree is removed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    try:
        with ref_worktree(ROOT, args.ref) as ref_tree, tempfile.TemporaryDirectory(prefix="bv-") as work:
            # The children run a copy of this script, so an edit to it during a run changes no measurement.
            shutil.copy2(Path(__file__).resolve(), Path(work) / SCRIPT_COPY)
            trees = {"current": ROOT, "ref": ref_tree}
            print(f"current: {ROOT} at {describe_tree(ROOT)}; ref: {args.ref} = {describe_tree(ref_tree)} "
                  f"(temporary worktree {ref_tree})")
            print(f"rounds {args.rounds}{', quick' if args.quick else ''}; clock {args.clock}; "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
                  f"load average {os.getloadavg()[0]:.2f}")
            series = run_rounds(args, trees, Path(work))
    except BenchError as error:
        print(f"bench_versions: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_versions: interrupted; the temporary worktree was removed", file=sys.stderr)
        return 130
    report(series)
    flags = [f"--ref {args.ref}", f"--rounds {args.rounds}", *(["--quick"] if args.quick else [])]
    if args.clock != "cpu":
        flags.append(f"--clock {args.clock}")
    if args.workloads != list(WORKLOADS):
        flags.append(f"--workloads {','.join(args.workloads)}")
    print(f"\ncommand: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {sys.executable} "
          f"bench/bench_versions.py {' '.join(flags)}   ({time.perf_counter() - started:.0f} s, load average "
          f"{os.getloadavg()[0]:.2f})")
    return 0


# --- the child: one measurement with the tree on PYTHONPATH ---------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    import llada_trm  # noqa: PLC0415 (the child's tree, from PYTHONPATH)

    sizes = Sizes(**json.loads(args.child_sizes))
    clock = time.process_time if args.child_clock == "cpu" else time.perf_counter
    if args.child == "sampling":
        series = child_sampling(args.child_config, sizes, clock)
    else:
        series = child_training(args.child_config, args.child.removeprefix("train-"), sizes, clock)
    print(RESULT_MARK + json.dumps({"package": str(Path(llada_trm.__file__).parent), "series": series}))
    return 0


def child_sampling(config_path: Path, sizes: Sizes, clock: Callable[[], float]) -> dict[str, dict]:
    """Seconds per prompt of the backbone alone and of the hybrid with the recipe's random slot refiner."""
    import torch  # noqa: PLC0415

    import llada_trm as lt  # noqa: PLC0415
    from llada_trm.build import hybrid_config  # noqa: PLC0415 (same module in both trees)
    from llada_trm.data.collate import prompt_batch  # noqa: PLC0415
    from llada_trm.data.tokenizer import special_token_ids  # noqa: PLC0415

    torch.manual_seed(0)
    backbone_dir = lt.embedded_backbone_dir()
    backbone = lt.LLaDAModel.from_pretrained(backbone_dir, dtype=torch.float32)
    hybrid = lt.LLaDATRMHybrid(backbone, hybrid_config(lt.load_config(config_path))).eval()
    tokenizer = lt.load_tokenizer(backbone_dir)
    ids = special_token_ids(tokenizer)
    records = lt.generate_problems(lt.SyntheticTaskConfig(**RECIPE_TASK), sizes.prompts, split="test")
    batches = [prompt_batch(tokenizer, [r.question for r in records[i : i + sizes.batch_size]])
               for i in range(0, len(records), sizes.batch_size)]
    models = {"sample: backbone alone": backbone, "sample: + slot refiner": hybrid}
    options = dict(RECIPE_SAMPLING, mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot)
    seconds = dict.fromkeys(models, 0.0)
    nfe = dict.fromkeys(models, 0)
    with torch.no_grad():
        for model in models.values():  # warm-up: first-call allocations and lazy imports, not timed
            lt.generate_with_stats(model, *batches[0], **options)
        for index, (prompt, mask) in enumerate(batches):
            names = list(models) if index % 2 == 0 else list(reversed(models))
            for name in names:
                start = clock()
                result = lt.generate_with_stats(models[name], prompt, mask, **options)
                seconds[name] += clock() - start
                nfe[name] += result.nfe
    return {name: {"unit": "s / prompt", "seconds": seconds[name] / len(records),
                   "extra": "NFE (model calls, all batches)", "extra_value": nfe[name]} for name in models}


def child_training(
    config_path: Path, refiner: str, sizes: Sizes, clock: Callable[[], float]
) -> dict[str, dict]:
    """Mean seconds per phase-1 optimizer step after the warm-up, from the tree's own Trainer."""
    import llada_trm as lt  # noqa: PLC0415

    trainer = lt.Trainer(lt.load_config(config_path), progress=False, force=True)
    stamps: list[float] = []
    trainer.optimizer.register_step_post_hook(lambda *_: stamps.append(clock()))
    trainer.train(max_new_steps=sizes.warmup_steps + sizes.steps)
    timed = stamps[sizes.warmup_steps - 1 :]  # a step is the time from one optimizer.step() to the next
    if len(timed) != sizes.steps + 1:
        raise RuntimeError(f"expected {sizes.warmup_steps + sizes.steps} optimizer steps, saw {len(stamps)}")
    per_step = (timed[-1] - timed[0]) / sizes.steps
    return {f"train: {refiner}": {"unit": "s / step", "seconds": per_step}}


if __name__ == "__main__":
    sys.exit(main())
