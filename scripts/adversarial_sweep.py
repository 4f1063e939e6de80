#!/usr/bin/env python
"""Adversarial sweep: bad inputs and faults against the `llada-trm` CLI, each classified automatically.

Usage (from the repository root):

    python scripts/adversarial_sweep.py            # every case, ~5-8 minutes on a laptop CPU
    python scripts/adversarial_sweep.py --quick    # a handful of fast cases (no trained run needed)
    python scripts/adversarial_sweep.py --only yaml --verbose

Each case runs `python -m llada_trm ...` in a subprocess with a timeout and is classified as

    clear      exit != 0, the last stderr line is one line naming the problem, no 'Traceback'
    traceback  a 'Traceback' on stderr
    silent     exit 0 where an error was expected (or a check found a wrong result, e.g. code ran)
    hang       the timeout expired (an absurd size that should have been refused)
    data lost  a file that existed before the case changed or vanished when it should not have
    ok         a control case (valid input) that succeeded; `failed` when a control did not

The cases share one tiny trained run directory, created at start (a 2-step phase-1 run on the embedded
backbone); a case that needs a modified copy makes one. The exit status is 1 when any case is a traceback,
silent, hang, data lost or failed control, so CI can run `--quick`. docs/troubleshooting.md lists the
latest full run's counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("clear", "traceback", "silent", "hang", "data lost", "ok", "failed")
TINY = ["--gen-length", "16", "--block-length", "8", "--steps", "4"]


@dataclass
class Context:
    """Where a sweep works: its scratch directory, the shared tiny run, the embedded backbone."""

    work: Path
    run: Path
    embedded: Path

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def backbone_copy(self, name: str) -> Path:
        target = self.work / name
        if not target.exists():
            shutil.copytree(self.embedded, target)
        return target

    def run_copy(self, name: str) -> Path:
        target = self.work / name
        if not target.exists():
            shutil.copytree(self.run, target)
        return target


Args = Callable[[Context], list[str]]


@dataclass
class Case:
    """One input. `args` builds the CLI arguments (creating any files it needs); `protect` names paths whose
    contents must survive; `check` returns a failure kind (or None) after the run, e.g. 'silent' when a
    warning that should have been printed was not."""

    name: str
    args: Args
    expect: str = "error"  # or "ok"
    quick: bool = False
    needs_run: bool = False
    stdin: str = ""
    timeout: float = 90.0
    protect: Callable[[Context], list[Path]] = field(default=lambda ctx: [])
    check: Callable[[Context, subprocess.CompletedProcess[str]], str | None] | None = None


# ------------------------------------------------------------------------------------------------ helpers


def _config(ctx: Context, name: str, text: str | bytes) -> list[str]:
    return ["train", "--config", str(ctx.file(name, text)), "--no-progress"]


def _train(ctx: Context, *overrides: str, out: str = "scratch_run") -> list[str]:
    sets = [f"--set={o}" for o in ("training.max_steps=1", "training.eval_every=0", *overrides)]
    return [
        "train",
        "--config",
        str(REPO / "configs/tiny_refiner.yaml"),
        f"--set=output.dir={ctx.work / out}",
        *sets,
        "--no-progress",
    ]


def _gsm8k(ctx: Context, name: str, content: str | bytes, *extra: str) -> list[str]:
    path = ctx.file(name, content)
    return [
        "eval",
        "--checkpoint",
        str(ctx.run),
        "--dataset",
        "gsm8k",
        "--data-path",
        str(path),
        "--limit",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *TINY,
        "--out",
        str(ctx.work / "eval_out"),
        *extra,
    ]


def _eval(ctx: Context, checkpoint: Path | str, *extra: str) -> list[str]:
    return [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--limit",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(ctx.work / "eval_out"),
        *TINY,
        *extra,
    ]


def _generate(ctx: Context, question: str, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", str(ctx.run), "--device", "cpu", *extra, question]


def _rewrite_backbone(ctx: Context, name: str, damage: Callable[[dict], None]) -> Path:
    from safetensors.torch import load_file, save_file

    directory = ctx.backbone_copy(name)
    tensors = load_file(str(directory / "model.safetensors"))
    damage(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _int_weight(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("attn_norm.weight"))
    tensors[key] = tensors[key].to(dtype=__import__("torch").int64)


def _nan_weight(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("ff_out.weight"))
    tensors[key][0, 0] = float("nan")


def _truncate(path: Path, keep: int = 200) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _custom_code_backbone(ctx: Context) -> Path:
    directory = ctx.backbone_copy("evil_backbone")
    (directory / "evil_tokenizer.py").write_text(
        f"open({str(ctx.work / 'CODE_RAN')!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _code_ran(ctx: Context, done: subprocess.CompletedProcess[str]) -> str | None:
    return "silent" if (ctx.work / "CODE_RAN").exists() else None


def _warns(*words: str) -> Callable[[Context, subprocess.CompletedProcess[str]], str | None]:
    def check(ctx: Context, done: subprocess.CompletedProcess[str]) -> str | None:
        return None if all(w in done.stderr + done.stdout for w in words) else "silent"

    return check


def _bomb() -> str:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _corrupt_cache(ctx: Context) -> list[str]:
    """A built feature cache whose first shard is then garbled; training from it must name the shard."""
    cache_dir = ctx.work / "cache_run" / "feature_cache"
    base = _train(
        ctx,
        "advanced.feature_cache=true",
        "data.synthetic.n_train=16",
        "data.synthetic.n_eval=0",
        out="cache_run",
    )
    if not (cache_dir / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "llada_trm", "cache", *base[1:]],
            env=_env(),
            capture_output=True,
            timeout=180,
            check=False,
        )
    shard = cache_dir / "shard_00000.safetensors"
    if shard.exists():
        _truncate(shard, 64)
    return base


JSONL_OK = json.dumps(
    {"question": "Tom has 2 pens and buys 3 more. How many pens?", "answer": "2+3=5\n#### 5"}
)


def cases() -> list[Case]:  # noqa: PLR0915 - one flat list is the easiest to read and extend
    c: list[Case] = []
    add = c.append
    # --- config files and overrides
    add(Case("config: file missing", lambda x: ["train", "--config", str(x.work / "nope.yaml")]))
    add(Case("config: YAML syntax error", lambda x: _config(x, "syntax.yaml", "training: [1, 2\n")))
    add(
        Case(
            "config: duplicate key",
            lambda x: _config(x, "dup.yaml", "training:\n  lr: 1e-3\n  lr: 1e-2\n"),
            quick=True,
        )
    )
    add(
        Case(
            "config: duplicate section",
            lambda x: _config(x, "dup2.yaml", "training:\n  lr: 1e-3\ntraining:\n  seed: 3\n"),
        )
    )
    add(Case("config: alias bomb", lambda x: _config(x, "bomb.yaml", _bomb()), quick=True, timeout=30))
    add(Case("config: recursive alias", lambda x: _config(x, "loop.yaml", "training: &t {seed: *t}\n")))
    add(
        Case(
            "config: non-UTF-8 bytes",
            lambda x: _config(x, "latin1.yaml", b"training:\n  # caf\xe9\n  lr: 1\n"),
            quick=True,
        )
    )
    add(Case("config: top level is a list", lambda x: _config(x, "list.yaml", "- 1\n- 2\n")))
    add(Case("config: unknown key", lambda x: _train(x, "training.learnig_rate=1e-3")))
    add(Case("config: unknown section", lambda x: _train(x, "trainig.lr=1e-3")))
    add(Case("config: lr not a number", lambda x: _train(x, "training.lr=fast")))
    add(Case("config: negative lr", lambda x: _train(x, "training.lr=-1")))
    add(Case("config: boolean batch size", lambda x: _train(x, "training.batch_size=true")))
    add(Case("config: batch size 0", lambda x: _train(x, "training.batch_size=0")))
    add(Case("config: batch size 1e6", lambda x: _train(x, "training.batch_size=1e6")))
    add(Case("config: phase 4", lambda x: _train(x, "training.phase=4")))
    add(Case("config: mixed precision fp8", lambda x: _train(x, "training.mixed_precision=fp8")))
    add(Case("config: K = 1000", lambda x: _train(x, "model.max_recursive_steps=1000")))
    add(Case("config: chunk size 1e9", lambda x: _train(x, "model.chunk_size=1e9"), timeout=60))
    add(Case("config: chunk size 0", lambda x: _train(x, "model.chunk_size=0")))
    add(Case("config: max_length 100000", lambda x: _train(x, "data.max_length=100000"), timeout=60))
    add(Case("config: max_length 8 (nothing fits)", lambda x: _train(x, "data.max_length=8")))
    add(Case("config: n_train 1e9", lambda x: _train(x, "data.synthetic.n_train=1e9"), timeout=60))
    add(
        Case(
            "config: task too small for n_train",
            lambda x: _train(
                x,
                "data.synthetic.max_number=1",
                "data.synthetic.max_steps=1",
                "data.synthetic.min_steps=1",
                "data.synthetic.n_train=5000",
            ),
            timeout=120,
        )
    )
    add(Case("config: context layer out of range", lambda x: _train(x, "model.context_layers=[40]")))
    add(
        Case(
            "config: refiner none with cascade",
            lambda x: _train(x, "model.refiner=none", "model.integration=cascade"),
        )
    )
    add(
        Case(
            "--set without '='",
            lambda x: ["train", "--config", str(REPO / "configs/tiny_refiner.yaml"), "--set", "training.lr"],
        )
    )
    add(Case("--set into a value", lambda x: _train(x, "training.lr.x=1")))
    add(Case("--set invalid YAML value", lambda x: _train(x, "training.lr=[1,")))
    # --- data files
    add(Case("gsm8k: dataset without path", lambda x: _train(x, "data.dataset=gsm8k")))
    add(
        Case(
            "gsm8k: path missing",
            lambda x: _train(x, "data.dataset=gsm8k", f"data.path={x.work / 'no.jsonl'}"),
        )
    )
    add(
        Case(
            "gsm8k: invalid JSON line",
            lambda x: _gsm8k(x, "bad.jsonl", JSONL_OK + "\n{not json\n"),
            needs_run=True,
        )
    )
    add(
        Case(
            "gsm8k: non-UTF-8 line",
            lambda x: _gsm8k(x, "latin1.jsonl", JSONL_OK.encode() + b"\n\xff\xfe\n"),
            needs_run=True,
        )
    )
    add(Case("gsm8k: empty file", lambda x: _gsm8k(x, "empty.jsonl", ""), needs_run=True))
    add(
        Case(
            "gsm8k: missing answer key",
            lambda x: _gsm8k(x, "nokey.jsonl", '{"question": "q"}\n'),
            needs_run=True,
        )
    )
    add(
        Case(
            "gsm8k: answer is a number",
            lambda x: _gsm8k(x, "num.jsonl", '{"question": "q", "answer": 5}\n'),
            needs_run=True,
        )
    )
    add(
        Case(
            "gsm8k: bad split",
            lambda x: _gsm8k(x, "ok.jsonl", JSONL_OK + "\n", "--split", "test[::2]"),
            needs_run=True,
        )
    )
    add(
        Case(
            "gsm8k: answers without ####, reported",
            lambda x: _gsm8k(x, "nomarker.jsonl", json.dumps({"question": "1+1?", "answer": "2"}) + "\n"),
            expect="ok",
            needs_run=True,
            check=_warns("####", "nomarker.jsonl:1"),
        )
    )
    # --- backbones
    add(Case("backbone: directory missing", lambda x: _train(x, f"model.backbone={x.work / 'nobackbone'}")))
    add(
        Case(
            "backbone: no tokenizer",
            lambda x: _train(x, f"model.backbone={_without(x.backbone_copy('notok'), 'tokenizer.json')}"),
        )
    )
    add(
        Case(
            "backbone: no weights",
            lambda x: _train(
                x, f"model.backbone={_without(x.backbone_copy('noweights'), 'model.safetensors')}"
            ),
        )
    )
    add(
        Case(
            "backbone: truncated weights",
            lambda x: _train(
                x, f"model.backbone={_truncate(x.backbone_copy('trunc') / 'model.safetensors').parent}"
            ),
        )
    )
    add(
        Case(
            "backbone: config.json not JSON",
            lambda x: _train(x, f"model.backbone={_damage_config(x, 'badjson', None)}"),
        )
    )
    add(
        Case(
            "backbone: heads do not divide d_model",
            lambda x: _train(x, f"model.backbone={_damage_config(x, 'badheads', {'n_heads': 3})}"),
        )
    )
    add(
        Case(
            "backbone: an int64 weight",
            lambda x: _train(x, f"model.backbone={_rewrite_backbone(x, 'intw', _int_weight)}"),
        )
    )
    add(
        Case(
            "backbone: a NaN weight",
            lambda x: _train(x, f"model.backbone={_rewrite_backbone(x, 'nanw', _nan_weight)}"),
        )
    )
    add(
        Case(
            "backbone: tokenizer names custom code (stdin y)",
            lambda x: _train(x, f"model.backbone={_custom_code_backbone(x)}"),
            stdin="y\ny\n",
            check=_code_ran,
        )
    )
    # --- checkpoints and sampling
    add(Case("eval: checkpoint missing", lambda x: _eval(x, x.work / "nocheckpoint")))
    add(Case("eval: checkpoint dir empty", lambda x: _eval(x, _mkdir(x.work / "emptyck"))))
    add(
        Case(
            "eval: truncated checkpoint weights",
            lambda x: _eval(
                x, _truncate(x.run_copy("run_trunc") / "checkpoints/last/model.safetensors").parent
            ),
            needs_run=True,
        )
    )
    add(
        Case(
            "eval: gen-length 100000",
            lambda x: _eval(x, "embedded", "--gen-length", "100000", "--block-length", "100000"),
            quick=True,
            timeout=60,
        )
    )
    add(
        Case(
            "eval: prompt + gen-length beyond the backbone",
            lambda x: _eval(x, x.run) + ["--gen-length", "1024", "--block-length", "32", "--steps", "1024"],
            needs_run=True,
            timeout=60,
        )
    )
    add(Case("eval: steps 0", lambda x: _eval(x, x.run) + ["--steps", "0"], needs_run=True))
    add(
        Case(
            "eval: gen-length not a block multiple",
            lambda x: _eval(x, x.run) + ["--gen-length", "20"],
            needs_run=True,
        )
    )
    add(Case("eval: batch size 0", lambda x: _eval(x, x.run, "--batch-size", "0"), needs_run=True))
    add(Case("eval: limit 0", lambda x: _eval(x, x.run, "--limit", "0"), needs_run=True))
    add(Case("eval: dtype bogus", lambda x: _eval(x, x.run, "--dtype", "int8"), needs_run=True))
    add(Case("eval: refiner bogus", lambda x: _eval(x, x.run, "--refiner", "gru"), needs_run=True))
    add(
        Case(
            "eval: device cuda:7",
            lambda x: _eval(x, x.run)[: -len(TINY)] + ["--device", "cuda:7", *TINY],
            needs_run=True,
        )
    )
    add(
        Case(
            "generate: 1201-token prompt",
            lambda x: _generate(x, "what is one plus one " * 240),
            needs_run=True,
            timeout=60,
        )
    )
    add(Case("generate: empty question", lambda x: _generate(x, "   "), needs_run=True))
    add(
        Case(
            "generate: negative temperature",
            lambda x: _generate(x, "hi", "--temperature", "-1"),
            needs_run=True,
        )
    )
    add(Case("generate: threshold 2", lambda x: _generate(x, "hi", "--threshold", "2"), needs_run=True))
    add(
        Case(
            "train: resume from a missing checkpoint",
            lambda x: _train(x) + ["--resume", str(x.work / "nock")],
        )
    )
    add(
        Case(
            "train: resume from a non-checkpoint",
            lambda x: _train(x) + ["--resume", str(_mkdir(x.work / "e2"))],
        )
    )
    add(Case("train: corrupt feature-cache shard", _corrupt_cache, timeout=180))
    add(
        Case(
            "train: new run into an existing run dir",
            lambda x: (
                _train(
                    x,
                    out="run_overwrite",
                )
                if x.run_copy("run_overwrite")
                else []
            ),
            needs_run=True,
            timeout=120,
            protect=lambda x: [
                x.work / "run_overwrite/training_metrics.csv",
                x.work / "run_overwrite/checkpoints/best/model.safetensors",
            ],
        )
    )
    add(Case("plot: run dir missing", lambda x: ["plot", str(x.work / "norun")], quick=True))
    add(Case("plot: dir without metrics", lambda x: ["plot", str(_mkdir(x.work / "nometrics"))]))
    add(Case("compare: config missing", lambda x: ["compare", "--config", str(x.work / "nocompare.yaml")]))
    add(
        Case(
            "compare: unknown key",
            lambda x: [
                "compare",
                "--config",
                str(REPO / "configs/compare_tiny.yaml"),
                "--set",
                "evaluation.gen_lenght=8",
            ],
        )
    )
    add(Case("pretrain: unknown key", lambda x: ["pretrain", "--set", "training.stepz=1"]))
    add(
        Case(
            "cache: bad config value",
            lambda x: [
                "cache",
                "--config",
                str(REPO / "configs/tiny_refiner.yaml"),
                "--set",
                "advanced.cache_noise_draws=0",
            ],
        )
    )
    # --- controls: valid inputs must keep working
    add(Case("control: eval the tiny run", lambda x: _eval(x, x.run), expect="ok", needs_run=True))
    add(
        Case(
            "control: generate",
            lambda x: _generate(x, "What is 2 plus 3?", *TINY),
            expect="ok",
            needs_run=True,
        )
    )
    add(
        Case(
            "control: plot the tiny run",
            lambda x: ["plot", str(x.run_copy("run_plot"))],
            expect="ok",
            needs_run=True,
        )
    )
    return c


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _without(directory: Path, name: str) -> Path:
    (directory / name).unlink(missing_ok=True)
    return directory


def _damage_config(ctx: Context, name: str, changes: dict | None) -> Path:
    directory = ctx.backbone_copy(name)
    config_file = directory / "config.json"
    if changes is None:
        config_file.write_text("{ this is not json")
    else:
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return directory


# ---------------------------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the sweep is a CPU exercise; a GPU would only change the timings
    return env


def _digest(paths: list[Path]) -> dict[str, str | None]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in paths}


def classify(case: Case, ctx: Context) -> tuple[str, str]:
    """Run one case: (kind, the last stderr line or a note)."""
    try:
        args = case.args(ctx)
    except Exception as exc:  # a broken case is the sweep's bug; report it, do not hide it
        return "failed", f"setup failed: {exc!r}"
    protected = case.protect(ctx)
    before = _digest(protected)
    command = [sys.executable, "-m", "llada_trm", *args]
    try:
        done = subprocess.run(
            command,
            input=case.stdin,
            capture_output=True,
            text=True,
            timeout=case.timeout,
            env=_env(),
            cwd=ctx.work,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "hang", f"no result after {case.timeout:.0f} s"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    after = _digest(protected)
    lost = [p for p, digest in before.items() if digest is not None and after[p] != digest]
    if lost:
        return "data lost", f"changed or removed: {', '.join(Path(p).name for p in lost)}"
    if "Traceback" in done.stderr:
        return "traceback", last
    extra = case.check(ctx, done) if case.check is not None else None
    if extra is not None:
        return extra, f"check failed (exit {done.returncode}): {last or done.stdout.strip()[-120:]}"
    if case.expect == "ok":
        return ("ok", "") if done.returncode == 0 else ("failed", last)
    if done.returncode == 0:
        return "silent", f"exit 0: {done.stdout.strip()[-120:]!r}"
    if not last:
        return "silent", f"exit {done.returncode} with an empty stderr"
    return "clear", last


def _make_run(ctx: Context) -> None:
    """The shared tiny trained run (2 phase-1 steps on the embedded backbone, ~10 s)."""
    overrides = [
        "training.max_steps=2",
        "training.eval_every=0",
        "data.synthetic.n_train=16",
        "data.synthetic.n_eval=8",
        f"output.dir={ctx.run}",
    ]
    command = [
        sys.executable,
        "-m",
        "llada_trm",
        "train",
        "--config",
        str(REPO / "configs/tiny_refiner.yaml"),
        *[f"--set={o}" for o in overrides],
        "--no-progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"could not create the tiny run: {done.stderr.strip()[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the fast cases (no trained run)")
    parser.add_argument("--only", metavar="TEXT", help="only cases whose name contains TEXT")
    parser.add_argument("--workdir", metavar="DIR", help="scratch directory (default: a temporary one)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every case's last stderr line")
    args = parser.parse_args(argv)

    selected = [case for case in cases() if (case.quick or not args.quick)]
    if args.only:
        selected = [case for case in selected if args.only.lower() in case.name.lower()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llada-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    from llada_trm.assets import embedded_backbone_dir

    ctx = Context(work=work, run=work / "tiny_run", embedded=Path(embedded_backbone_dir()))
    started = time.perf_counter()
    if any(case.needs_run for case in selected) and not (ctx.run / "checkpoints/last").exists():
        _make_run(ctx)
    counts: Counter[str] = Counter()
    for number, case in enumerate(selected, start=1):
        t0 = time.perf_counter()
        kind, note = classify(case, ctx)
        counts[kind] += 1
        bad = kind not in ("clear", "ok")
        if args.verbose or bad:
            print(
                f"[{number:2d}/{len(selected)}] {kind:9s} {case.name} "
                f"({time.perf_counter() - t0:.0f} s): {note}"
            )
    print(f"\n{len(selected)} cases in {(time.perf_counter() - started) / 60:.1f} min (work dir {work})")
    print(f"{'kind':10s} count")
    for kind in KINDS:
        print(f"{kind:10s} {counts[kind]}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(counts[k] for k in ("traceback", "silent", "hang", "data lost", "failed")) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
