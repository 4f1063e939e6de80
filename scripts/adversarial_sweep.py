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
    hang       the CPU-time limit expired, or a wall-clock limit six times as long (an absurd size that should
               have been refused), or memory ran out (each case runs under a 12 GiB address-space cap)
    data lost  a file that existed before the case changed or vanished when it should not have
    ok         a control case (valid input) that succeeded; `failed` when a control did not

Cases run through `llada-trm`, `llada-trm-lm-eval` or, for the Python API, a driver that executes a snippet
(an exception the CLI would describe in one line counts as clear). Disk-full cases run under a file-size limit
(writes fail with EFBIG). `--surface new` selects the 220 cases over what issue 28 covers (export, the lm-eval
backend, LoRA, TensorBoard, compare arms and --resume, pretrain's run directory, the caches' --rebuild, the
Python API, trajectory pages); those marked part A (a command deleting what it did not make) are listed
after the run.

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
import signal
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
    runner: str = "cli"  # "cli" (llada-trm), "lm-eval" (llada-trm-lm-eval), "python" (code, the API driver)
    surface: str = "core"  # "new": the surface issue 28 covers (export, lm-eval, LoRA, compare, API, ...)
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: writes past it fail as on a full disk
    env: dict[str, str] = field(default_factory=dict)
    part_a: bool = False  # a command deleting what it did not make: fixed by issue 28's part A


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


def _gen(checkpoint: Path | str, *rest: str, tiny: bool = True) -> list[str]:
    """`generate` of `checkpoint` on the CPU (the tiny sampler unless not `tiny`); `rest`: flags, question."""
    return ["generate", "--checkpoint", str(checkpoint), "--device", "cpu", *(TINY if tiny else ()), *rest]


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
        "data.n_train=16",
        "data.n_eval=0",
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


def cases() -> list[Case]:
    """Every case: the training path's (`core_cases`), then the surface added since (`surface_cases`)."""
    return [*core_cases(), *surface_cases()]


def core_cases() -> list[Case]:  # noqa: PLR0915 - one flat list is the easiest to read and extend
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
    add(Case("config: n_train 1e9", lambda x: _train(x, "data.n_train=1e9"), timeout=60))
    add(
        Case(
            "config: task too small for n_train",
            lambda x: _train(
                x,
                "data.dataset=arithmetic",  # 1-digit single lines: 200 problems at most
                "data.arithmetic.max_digits=1",
                "data.arithmetic.max_chain=1",
                "data.n_train=5000",
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
            lambda x: _gen(x.run, "what is one plus one " * 240, tiny=False),
            needs_run=True,
            timeout=60,
        )
    )
    add(Case("generate: empty question", lambda x: _gen(x.run, "   ", tiny=False), needs_run=True))
    add(
        Case(
            "generate: negative temperature",
            lambda x: _gen(x.run, "--temperature", "-1", "hi", tiny=False),
            needs_run=True,
        )
    )
    add(
        Case(
            "generate: threshold 2",
            lambda x: _gen(x.run, "--threshold", "2", "hi", tiny=False),
            needs_run=True,
        )
    )
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
            lambda x: _gen(x.run, "What is 2 plus 3?"),
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


# =================================================================== the surface added since (issue 28)
#
# Export, the lm-eval backend, LoRA, TensorBoard, compare arms and --resume, pretrain's run directory, the
# caches' --rebuild, the Python API and trajectory pages. Cases marked `part_a` test what issue 28's part A
# fixes (a command deletes only what it made; --force archives): on a branch without it they read "data lost".

API_DRIVER = """
import sys
from llada_trm.boundary import describe_failure
try:
    exec(compile(sys.argv[1], "<case>", "exec"), {"__name__": "__case__"})
except Exception as exc:
    described = describe_failure(exc)
    if described is None:
        raise
    print("error:", described[0].encode("utf-8", "backslashreplace").decode(), file=sys.stderr)
    sys.exit(2)
"""
TINY_SETS = ["sampling.gen_length=16", "sampling.block_length=8", "sampling.steps=4"]
LM_EVAL = ["--model", "llada_trm", "--tasks", "gsm8k_local", "--limit", "2", "--device", "cpu"]
LM_TINY = "steps=4,gen_length=16,block_length=8"
PYTHON_TINY = "steps=4, gen_length=16, block_length=8"


def _api(code: str) -> Args:
    return lambda x: [code.replace("{work}", str(x.work)).replace("{run}", str(x.run))]


def _lm(ctx: Context, model_args: str, *extra: str) -> list[str]:
    data = json.dumps({"gsm8k_data": str(_gsm_dir(ctx))})
    return [
        *LM_EVAL,
        "--model_args",
        model_args,
        "--metadata",
        data,
        *extra,
        "--output_path",
        str(ctx.work / "lm_out"),
    ]


def _gsm_dir(ctx: Context) -> Path:
    directory = ctx.work / "gsm"
    if not (directory / "test.jsonl").exists():
        rows = [
            {"question": "Tom has 2 pens and buys 3 more. How many pens?", "answer": "2+3=5\n#### 5"},
            {"question": "Ann has 4 eggs and eats 1. How many are left?", "answer": "4-1=3\n#### 3"},
        ]
        ctx.file("gsm/test.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return directory


def _exported(ctx: Context) -> Path:
    """The tiny run exported once (a control of its own checks that it loads)."""
    out = ctx.work / "export"
    if not (out / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "llada_trm", "export", str(ctx.run), str(out)],
            env=_env(),
            capture_output=True,
            timeout=300,
            check=False,
        )
    return out


def _export_copy(ctx: Context, name: str, edit: Callable[[Path], None] | None = None) -> Path:
    target = ctx.work / name
    if not target.exists():
        shutil.copytree(_exported(ctx), target)
        if edit is not None:
            edit(target)
    return target


def _section(**changes: object) -> Callable[[Path], None]:
    """Edit an export's `llada_trm` section of config.json (a dotted key per change, `__` for `.`)."""

    def edit(directory: Path) -> None:
        raw = json.loads((directory / "config.json").read_text())
        for dotted, value in changes.items():
            node = raw["llada_trm"]
            *parents, last = dotted.split("__")
            for part in parents:
                node = node[part]
            node[last] = value
        (directory / "config.json").write_text(json.dumps(raw))

    return edit


def _refiner_values(value: float) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = directory / "refiner.safetensors"
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        name = next(k for k, t in tensors.items() if t.is_floating_point())
        tensors[name].view(-1)[0] = value
        save_file(tensors, str(path), metadata=metadata)

    return edit


def _symlinked_refiner(directory: Path) -> None:
    outside = directory.parent / f"{directory.name}_outside.safetensors"
    (directory / "refiner.safetensors").rename(outside)
    (directory / "refiner.safetensors").symlink_to(outside)


def _outside_shards(directory: Path) -> None:
    from safetensors import safe_open

    outside = directory.parent / f"{directory.name}_weights.safetensors"
    (directory / "model.safetensors").rename(outside)
    with safe_open(str(outside), framework="pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, f"../{outside.name}")}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _backbone_config(ctx: Context, name: str, **changes: object) -> Path:
    directory = ctx.backbone_copy(name)
    path = directory / "config.json"
    raw = json.loads((ctx.embedded / "config.json").read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return directory


def _template(ctx: Context, name: str, template: object) -> Path:
    directory = ctx.backbone_copy(name)
    path = directory / "tokenizer_config.json"
    raw = json.loads((ctx.embedded / "tokenizer_config.json").read_text())
    raw["chat_template"] = template
    path.write_text(json.dumps(raw))
    return directory


def _file_in_the_way(ctx: Context) -> Path:
    """A plain file, used as a parent folder of an output path (ENOTDIR / EEXIST)."""
    return ctx.file("a_file", "not a folder\n")


def _nested_yaml(depth: int = 3000) -> str:
    return "training:\n  lr: " + "[" * depth + "]" * depth + "\n"


def _train_tiny(ctx: Context, *overrides: str, out: str = "scratch_new") -> list[str]:
    return _train(ctx, *TINY_SETS, "data.n_train=16", "data.n_eval=4", *overrides, out=out)


def _pretrain(ctx: Context, *overrides: str, out: str = "pretrain_out") -> list[str]:
    tiny = [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.mlp_hidden_size=64",
        "data.n_train=40",
        "data.n_eval=4",
        "data.max_steps=2",
        "data.vocab_size=300",
        "training.steps=2",
        "training.batch_size=4",
        "training.warmup_steps=1",
        "training.eval_every=0",
        "training.save_every=0",
        "evaluation.n_problems=2",
        "evaluation.n_test=2",
        "evaluation.batch_size=2",
        "evaluation.gen_length=16",
        "evaluation.block_length=16",
        "evaluation.steps=4",
        "output.dtype=float32",
        f"output.dir={ctx.work / out}",
    ]
    return ["pretrain", "--no-progress", *[w for o in [*tiny, *overrides] for w in ("--set", o)]]


def _compare(
    ctx: Context, *overrides: str, out: str = "compare_out", flags: tuple[str, ...] = ()
) -> list[str]:
    tiny = [
        "run.training.max_steps=1",
        "run.training.eval_every=1",
        "run.training.val_sampled_problems=0",
        "run.data.n_train=16",
        "run.data.n_eval=4",
        "run.sampling.gen_length=16",
        "run.sampling.block_length=8",
        "run.sampling.steps=4",
        "evaluation.n_problems=2",
        "refiners=[slot]",
        f"output.dir={ctx.work / out}",
    ]
    sets = [w for o in [*tiny, *overrides] for w in ("--set", o)]
    return ["compare", "--config", str(REPO / "configs/compare_tiny.yaml"), *sets, "--no-progress", *flags]


def _compared(ctx: Context, out: str) -> Path:
    """A finished tiny comparison in `out` (made once), for --resume and --force cases."""
    target = ctx.work / out
    if not (target / "comparison.json").exists():
        subprocess.run(
            [sys.executable, "-m", "llada_trm", *_compare(ctx, out=out)],
            env=_env(),
            capture_output=True,
            timeout=600,
            check=False,
        )
    return target


def _run_folder(ctx: Context, name: str) -> Path:
    """A folder that holds someone's files (not made by the command pointed at it)."""
    target = ctx.work / name
    if not target.exists():
        ctx.file(f"{name}/notes.txt", "precious notes\n")
        ctx.file(f"{name}/data/table.csv", "a,b\n1,2\n")
    return target


def _protect_folder(name: str) -> Callable[[Context], list[Path]]:
    return lambda x: [x.work / name / "notes.txt", x.work / name / "data" / "table.csv"]


def _no_reuse_of_other_checkpoint(ctx: Context, done: subprocess.CompletedProcess[str]) -> str | None:
    """compare --resume after a change of evaluation.checkpoint must not reuse the other checkpoint's eval."""
    reused = "reusing" in done.stdout and "/eval/" in done.stdout.split("reusing", 1)[1].splitlines()[0]
    return "silent" if reused else None


def _fallback_recorded(ctx: Context, done: subprocess.CompletedProcess[str]) -> str | None:
    path = ctx.work / "compare_nobest" / "comparison.json"
    if not path.exists():
        return "silent"
    report = json.loads(path.read_text())
    said = "no 'best' checkpoint" in done.stdout
    return None if said and report.get("checkpoint", {}).get("fallbacks") else "silent"


def _html_written(name: str) -> Callable[[Context, subprocess.CompletedProcess[str]], str | None]:
    return lambda x, done: None if (x.work / name).is_file() else "silent"


def surface_cases() -> list[Case]:  # noqa: C901, PLR0915 - one flat list is the easiest to read and extend
    c: list[Case] = []

    def add(case: Case) -> None:
        case.surface = "new"
        c.append(case)

    # --- non-finite and out-of-range sampler settings, at every entry point
    for flag, value in (
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("temperature", "-inf"),
        ("cfg-scale", "nan"),
        ("cfg-scale", "inf"),
        ("cfg-scale", "-1"),
        ("threshold", "nan"),
        ("threshold", "inf"),
        ("threshold", "0"),
        ("temperature", "1e309"),
    ):
        add(
            Case(
                f"generate: --{flag} {value}",
                lambda x, f=flag, v=value: _gen("embedded", f"--{f}={v}", "hi"),
            )
        )
    for key, value in (
        ("temperature", ".nan"),
        ("cfg_scale", ".inf"),
        ("temperature", "-.inf"),
        ("threshold", ".nan"),
        ("cfg_scale", "nan"),
    ):
        add(
            Case(
                f"train config: sampling.{key}={value}",
                lambda x, k=key, v=value: _train_tiny(x, f"sampling.{k}={v}"),
            )
        )
    for key, value in (
        ("temperature", "float('nan')"),
        ("cfg_scale", "float('inf')"),
        ("temperature", "-1.0"),
        ("threshold", "float('nan')"),
        ("temperature", "'hot'"),
        ("seed", "1.5"),
    ):
        add(
            Case(
                f"API: generate({key}={value})",
                _api(
                    "from llada_trm import load_checkpoint\n"
                    f"load_checkpoint('embedded', device='cpu').generate('hi', {PYTHON_TINY}, {key}={value})"
                ),
                runner="python",
            )
        )
    for key, value in (("temperature", "nan"), ("cfg_scale", "inf")):
        add(
            Case(
                f"API: SamplingOptions({key}={value})",
                _api(f"from llada_trm import SamplingOptions\nSamplingOptions({key}=float('{value}'))"),
                runner="python",
            )
        )
    add(
        Case(
            "eval: --temperature nan on the run",
            lambda x: _eval(x, x.run, "--temperature", "nan"),
            needs_run=True,
        )
    )
    add(
        Case(
            "eval: --cfg-scale inf on the run",
            lambda x: _eval(x, x.run, "--cfg-scale", "inf"),
            needs_run=True,
        )
    )
    add(
        Case("compare: run.sampling.temperature=.nan", lambda x: _compare(x, "run.sampling.temperature=.nan"))
    )
    add(Case("compare: run.sampling.cfg_scale=.inf", lambda x: _compare(x, "run.sampling.cfg_scale=.inf")))
    add(Case("pretrain: evaluation.temperature=.nan", lambda x: _pretrain(x, "evaluation.temperature=.nan")))
    add(Case("pretrain: training.lr=.nan", lambda x: _pretrain(x, "training.lr=.nan")))
    add(
        Case(
            "train config: training.max_grad_norm=.inf",
            lambda x: _train_tiny(x, "training.max_grad_norm=.inf"),
        )
    )
    add(Case("train config: lora.alpha=.nan", lambda x: _train_tiny(x, "lora.alpha=.nan")))

    # --- the lm-eval backend (every error one line through llada-trm-lm-eval)
    env = {"HF_DATASETS_OFFLINE": "1"}
    for args, why in (
        (f"checkpoint=embedded,{LM_TINY},max_length=100000", "max_length past the positions"),
        (f"checkpoint=embedded,{LM_TINY},max_length=0", "max_length 0"),
        (f"checkpoint=embedded,{LM_TINY},temperature=nan", "temperature nan"),
        (f"checkpoint=embedded,{LM_TINY},cfg_scale=inf", "cfg_scale inf"),
        (f"checkpoint=embedded,{LM_TINY},mc_num=10000000000", "mc_num 1e10"),
        (f"checkpoint=embedded,{LM_TINY},batch_size=0", "batch_size 0"),
        (f"checkpoint=embedded,{LM_TINY},bogus=1", "unknown model arg"),
        ("checkpoint={work}/missing_ckpt", "missing checkpoint"),
        (f"checkpoint=embedded,{LM_TINY},refiner=gru", "refiner gru"),
        ("checkpoint=embedded,steps=7,gen_length=16,block_length=8", "steps not a block multiple"),
        ("checkpoint=embedded,steps=4,gen_length=1000,block_length=1000", "gen_length past the positions"),
    ):
        add(
            Case(
                f"lm-eval: {why}",
                lambda x, a=args: _lm(x, a.replace("{work}", str(x.work))),
                runner="lm-eval",
                env=env,
                timeout=300,
            )
        )
    add(
        Case(
            "lm-eval: gen_kwargs temperature=nan",
            lambda x: _lm(x, f"checkpoint=embedded,{LM_TINY}", "--gen_kwargs", "temperature=nan"),
            runner="lm-eval",
            env=env,
            timeout=300,
        )
    )
    add(
        Case(
            "lm-eval: task data missing",
            lambda x: _lm(
                x,
                f"checkpoint=embedded,{LM_TINY}",
                "--metadata",
                json.dumps({"gsm8k_data": str(x.work / "no_gsm")}),
            ),
            runner="lm-eval",
            env=env,
            timeout=300,
        )
    )
    add(
        Case(
            "lm-eval: output path under a file",
            lambda x: [
                *_lm(x, f"checkpoint=embedded,{LM_TINY}")[:-2],
                "--output_path",
                str(_file_in_the_way(x) / "lm"),
            ],
            runner="lm-eval",
            env=env,
            timeout=300,
        )
    )
    add(
        Case(
            "lm-eval: chat template nested loops",
            lambda x: _lm(
                x, f"checkpoint={_template(x, 'tpl_lm', _LOOPS)},{LM_TINY}", "--apply_chat_template"
            ),
            runner="lm-eval",
            env=env,
            timeout=300,
        )
    )
    add(
        Case(
            "control: lm-eval on the embedded backbone",
            lambda x: _lm(x, f"checkpoint=embedded,{LM_TINY}"),
            runner="lm-eval",
            env=env,
            timeout=400,
            expect="ok",
        )
    )

    # --- a model folder's config.json: bounds before allocation
    for changes in (
        {"n_layers": 100000},
        {"n_layers": 1024},
        {"n_layers": 0},
        {"d_model": 1048576},
        {"d_model": 512, "n_heads": 8},
        {"n_heads": 100000},
        {"vocab_size": 2**31},
        {"embedding_size": 2**31},
        {"max_sequence_length": 2**40},
        {"mlp_ratio": 10**6},
        {"mlp_hidden_size": 10**9},
        {"rope_theta": float("nan")},
        {"rms_norm_eps": 1e308},
        {"init_std": float("inf")},
        {"mask_token_id": -1},
        {"n_layers": "6"},
        {"n_layers": 6.5},
        {"d_model": True},
        {"n_kv_heads": 3},
        {"block_type": "gpt2"},
    ):
        label = ", ".join(f"{k}={v}" for k, v in changes.items())
        add(
            Case(
                f"config.json: {label}",
                lambda x, ch=changes, n=label: _gen(
                    _backbone_config(x, "cfg_" + hashlib.md5(n.encode()).hexdigest()[:8], **ch), "hi"
                ),
                timeout=60,
            )
        )
    add(
        Case(
            "config.json: nested too deeply",
            lambda x: _gen(
                _write(x.backbone_copy("cfg_deep") / "config.json", "[" * 100000 + "]" * 100000),
                "hi",
                tiny=False,
            ),
        )
    )
    add(
        Case(
            "config.json: not UTF-8",
            lambda x: _gen(
                _write(x.backbone_copy("cfg_latin") / "config.json", b'{"d_model": 128, "caf\xe9": 1}'),
                "hi",
                tiny=False,
            ),
        )
    )
    add(
        Case(
            "backbone: shard index names ../",
            lambda x: _gen(_edited_backbone(x, "bb_outside", _outside_shards), "hi"),
        )
    )
    add(
        Case(
            "train: model.backbone with n_layers 100000",
            lambda x: _train_tiny(
                x, f"model.backbone={_backbone_config(x, 'cfg_train_layers', n_layers=100000)}"
            ),
            timeout=60,
        )
    )

    # --- a model folder's chat template
    for name, template in (
        ("nested loops", _LOOPS),
        ("string doubling", _DOUBLING),
        ("repetition 1e10", "{{ 'a' * 10000000000 }}"),
        ("sandbox escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
        ("recursive macro", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"),
        ("raise_exception", "{{ raise_exception('no system role') }}"),
        ("output past the limit", "{% for i in range(99999) %}{{ 'x' * 100 }}{% endfor %}"),
        ("center 1e10", "{{ 'x'|center(10000000000) }}"),
        ("power 10**10**9", "{{ 10 ** 1000000000 }}"),
        ("syntax error", "{% for m in messages %}{{ m.content }"),
        ("named without default", {"tool_use": "{{ 'x' }}"}),
        ("not text", 42),
    ):
        add(
            Case(
                f"chat template: {name}",
                lambda x, t=template, n=name: _gen(
                    _template(x, "tpl_" + hashlib.md5(n.encode()).hexdigest()[:8], t), "hi"
                ),
                timeout=60,
            )
        )
    add(
        Case(
            "control: an unknown but benign chat template",
            lambda x: _gen(
                _template(
                    x,
                    "tpl_benign",
                    json.loads((x.embedded / "tokenizer_config.json").read_text())["chat_template"] + "{# #}",
                ),
                "What is 2 plus 3?",
            ),
            expect="ok",
        )
    )
    add(
        Case(
            "chat template: nested loops in eval",
            lambda x: _eval(x, _template(x, "tpl_eval", _LOOPS)),
            timeout=60,
        )
    )

    # --- text that is not text
    add(Case("generate: undecodable bytes in the question", lambda x: _gen("embedded", "caf\udce9?")))
    add(
        Case(
            "generate: --file with non-UTF-8 bytes",
            lambda x: _gen("embedded", "--file", str(x.file("latin.txt", b"What is caf\xe9 plus 2?\n"))),
        )
    )
    add(
        Case(
            "eval: gsm8k with a lone surrogate",
            lambda x: _gsm8k(
                x,
                "surrogate.jsonl",
                json.dumps({"question": "What is \udce9 plus 2?", "answer": "#### 2"}) + "\n",
            ),
            needs_run=True,
        )
    )
    add(
        Case(
            "API: generate a lone surrogate",
            _api(
                "from llada_trm import load_checkpoint\n"
                f"load_checkpoint('embedded', device='cpu').generate('a\\udcff?', {PYTHON_TINY})"
            ),
            runner="python",
        )
    )
    add(
        Case(
            "compare: config not UTF-8",
            lambda x: [
                "compare",
                "--config",
                str(x.file("cmp_latin.yaml", b"refiners: [slot]\n# caf\xe9\n")),
            ],
        )
    )
    add(
        Case(
            "pretrain: config not UTF-8",
            lambda x: [
                "pretrain",
                "--config",
                str(x.file("pre_latin.yaml", b"training:\n  steps: 2 # caf\xe9\n")),
            ],
        )
    )

    # --- nesting and alias bombs in every YAML that is read
    add(
        Case(
            "--set: alias bomb in a value",
            lambda x: _train_tiny(x, "model.context_layers=" + _flow_bomb()),
            timeout=60,
        )
    )
    add(Case("--set: nested too deeply", lambda x: _train_tiny(x, "training.lr=" + "[" * 5000 + "]" * 5000)))
    add(Case("--set: duplicate key in a value", lambda x: _train_tiny(x, "training={lr: 1, lr: 2}")))
    add(
        Case(
            "--set: section value with a bad key",
            lambda x: _train_tiny(x, "training={lr: fast}"),
            check=_warns("--set training"),
        )
    )
    add(
        Case(
            "--set: bad sampling blamed on the --set",
            lambda x: _train_tiny(x, "sampling.steps=7"),
            check=_warns("--set sampling.steps"),
        )
    )
    add(Case("config: nested too deeply", lambda x: _config(x, "deep.yaml", _nested_yaml())))
    add(Case("compare: --set alias bomb", lambda x: _compare(x, "refiners=" + _flow_bomb()), timeout=60))
    add(
        Case(
            "compare: config nested too deeply",
            lambda x: [
                "compare",
                "--config",
                str(x.file("cmp_deep.yaml", "refiners: " + "[" * 5000 + "]" * 5000 + "\n")),
            ],
        )
    )
    add(
        Case(
            "pretrain: --set alias bomb", lambda x: _pretrain(x, "model.n_layers=" + _flow_bomb()), timeout=60
        )
    )
    add(
        Case(
            "pretrain: config nested too deeply",
            lambda x: ["pretrain", "--config", str(x.file("pre_deep.yaml", _nested_yaml()))],
        )
    )
    add(
        Case(
            "eval: run's config.yaml nested too deeply",
            lambda x: _eval(
                x,
                _edited_run(
                    x, "run_deep", lambda r: _write(r / "checkpoints/last/config.yaml", _nested_yaml())
                ),
            ),
            needs_run=True,
        )
    )
    add(
        Case(
            "eval: run's config.yaml alias bomb",
            lambda x: _eval(
                x, _edited_run(x, "run_bomb", lambda r: _write(r / "checkpoints/last/config.yaml", _bomb()))
            ),
            needs_run=True,
            timeout=60,
        )
    )

    # --- file-system failures: one line naming the path, the previous state intact
    add(
        Case(
            "generate: --html under a file",
            lambda x: _gen("embedded", "--html", str(_file_in_the_way(x) / "page.html"), "hi"),
        )
    )
    add(
        Case(
            "generate: --html into /proc",
            lambda x: _gen("embedded", "--html", "/proc/page.html", "hi"),
        )
    )
    add(
        Case(
            "generate: --html is a folder",
            lambda x: _gen("embedded", "--html", str(_mkdir(x.work / "html_dir")), "hi"),
        )
    )
    add(
        Case(
            "generate: --out under a file",
            lambda x: _gen(
                "embedded",
                "--file",
                str(x.file("q.txt", "What is 2 plus 3?\n")),
                "--out",
                str(_file_in_the_way(x) / "answers.jsonl"),
            ),
        )
    )
    add(
        Case(
            "eval: --out under a file",
            lambda x: (
                _eval(x, "embedded")[: -len(TINY) - 2] + ["--out", str(_file_in_the_way(x) / "eval"), *TINY]
            ),
        )
    )
    add(
        Case(
            "plot: --out under a file",
            lambda x: ["plot", str(x.run_copy("run_plot2")), "--out", str(_file_in_the_way(x) / "plots")],
            needs_run=True,
        )
    )
    add(
        Case(
            "train: output.dir under a file",
            lambda x: _train_tiny(x, f"output.dir={_file_in_the_way(x) / 'run'}"),
        )
    )
    add(
        Case(
            "pretrain: output.dir under a file",
            lambda x: _pretrain(x, f"output.dir={_file_in_the_way(x)}/bb"),
        )
    )
    add(
        Case(
            "compare: output.dir under a file", lambda x: _compare(x, f"output.dir={_file_in_the_way(x)}/cmp")
        )
    )
    add(
        Case(
            "export: OUT under a file",
            lambda x: ["export", str(x.run), str(_file_in_the_way(x) / "out")],
            needs_run=True,
        )
    )
    add(Case("export: OUT in /proc", lambda x: ["export", str(x.run), "/proc/llada_export"], needs_run=True))
    add(
        Case(
            "cache: feature_cache_dir under a file",
            lambda x: [
                "cache",
                *_train_tiny(x, f"advanced.feature_cache_dir={_file_in_the_way(x) / 'fc'}")[1:],
            ],
        )
    )
    add(
        Case(
            "export: disk full (1 MB file limit)",
            lambda x: ["export", str(x.run), str(x.work / "export_full")],
            needs_run=True,
            fsize=2**20,
        )
    )
    add(
        Case(
            "export: disk full leaves no partial export",
            lambda x: ["export", str(x.run), str(x.work / "export_partial")],
            needs_run=True,
            fsize=2**20,
            check=lambda x, d: "silent" if (x.work / "export_partial").exists() else None,
        )
    )
    add(
        Case(
            "train: disk full (64 KB file limit)", lambda x: _train_tiny(x, out="run_full"), fsize=64 * 2**10
        )
    )
    add(
        Case(
            "train: disk full on a resumed run keeps its checkpoint",
            lambda x: (
                _train(
                    x,
                    "data.n_train=16",
                    "data.n_eval=8",
                    "training.max_steps=3",
                    out="run_resume_full",
                )
                + ["--resume", str(x.run_copy("run_resume_full"))]
            ),
            needs_run=True,
            fsize=64 * 2**10,
            protect=lambda x: [
                x.work / "run_resume_full/checkpoints/last/model.safetensors",
                x.work / "run_resume_full/checkpoints/last/trainer_state.pt",
            ],
        )
    )
    add(
        Case(
            "pretrain: disk full (64 KB file limit)", lambda x: _pretrain(x, out="pre_full"), fsize=64 * 2**10
        )
    )
    add(Case("eval: disk full (1 KB file limit)", lambda x: _eval(x, "embedded"), fsize=1024))
    add(
        Case(
            "generate: --html on a full disk",
            lambda x: _gen("embedded", "--html", str(x.work / "full.html"), "hi"),
            fsize=1024,
        )
    )
    add(Case("compare: disk full", lambda x: _compare(x, out="cmp_full"), fsize=64 * 2**10, timeout=180))
    add(
        Case(
            "cache: disk full",
            lambda x: ["cache", *_train_tiny(x, "advanced.feature_cache=true", out="cache_full")[1:]],
            fsize=64 * 2**10,
            timeout=180,
        )
    )
    add(
        Case(
            "plot: disk full",
            lambda x: ["plot", str(x.run_copy("run_plot_full"))],
            needs_run=True,
            fsize=1024,
        )
    )

    # --- export
    for name, edit in (
        ("refiner_file ../..", _section(refiner_file="../../refiner.safetensors")),
        ("refiner_file absolute", _section(refiner_file="/etc/refiner.safetensors")),
        ("refiner_file in a subfolder", _section(refiner_file="sub/refiner.safetensors")),
        ("refiner_file '..'", _section(refiner_file="..")),
        ("refiner_file a number", _section(refiner_file=7)),
        ("refiner_file links outside", _symlinked_refiner),
        ("NaN refiner weight", _refiner_values(float("nan"))),
        ("inf refiner weight", _refiner_values(float("inf"))),
        ("format_version 99", _section(format_version=99)),
        (
            "section not a mapping",
            lambda d: _write(
                d / "config.json",
                json.dumps({**json.loads((d / "config.json").read_text()), "llada_trm": [1]}),
            ),
        ),
        ("model section unknown key", _section(model__bogus=1)),
        ("sampling temperature NaN", _section(sampling__temperature=float("nan"))),
        ("sampling steps 0", _section(sampling__steps=0)),
        ("refiner file missing", lambda d: (d / "refiner.safetensors").unlink()),
        ("refiner file truncated", lambda d: _truncate(d / "refiner.safetensors", 100)),
        ("shard index names ../", _outside_shards),
        ("config.json nested too deeply", lambda d: _write(d / "config.json", "[" * 100000)),
    ):
        add(
            Case(
                f"export: {name}",
                lambda x, e=edit, n=name: _eval(
                    x, _export_copy(x, "exp_" + hashlib.md5(n.encode()).hexdigest()[:8], e)
                ),
                needs_run=True,
            )
        )
    add(
        Case(
            "export: existing OUT without --force",
            lambda x: ["export", str(x.run), str(_mkdir(x.work / "exists"))],
            needs_run=True,
        )
    )
    add(Case("export: OUT is the run", lambda x: ["export", str(x.run), str(x.run)], needs_run=True))
    add(
        Case(
            "export: OUT inside the run",
            lambda x: ["export", str(x.run), str(x.run / "checkpoints")],
            needs_run=True,
        )
    )
    add(
        Case(
            "export: --max-shard-size 0",
            lambda x: ["export", str(x.run), str(x.work / "e_shard"), "--max-shard-size", "0"],
            needs_run=True,
        )
    )
    add(
        Case(
            "export: --max-shard-size lots",
            lambda x: ["export", str(x.run), str(x.work / "e_shard2"), "--max-shard-size", "lots"],
            needs_run=True,
        )
    )
    add(Case("export: run missing", lambda x: ["export", str(x.work / "no_run"), str(x.work / "e_none")]))
    add(
        Case(
            "export: run is an empty folder",
            lambda x: ["export", str(_mkdir(x.work / "empty_run")), str(x.work / "e_empty")],
        )
    )
    add(
        Case(
            "export --force: OUT someone else's folder",
            lambda x: ["export", str(x.run), str(_run_folder(x, "not_an_export")), "--force"],
            needs_run=True,
            protect=_protect_folder("not_an_export"),
            part_a=True,
        )
    )
    add(Case("control: eval an export", lambda x: _eval(x, _exported(x)), needs_run=True, expect="ok"))
    add(
        Case(
            "API: load an export with refiner_file ../",
            lambda x: (
                _exported(x)
                and _api(
                    "import shutil, json\nfrom pathlib import Path\nfrom llada_trm import load_checkpoint\n"
                    "src = Path('{work}/export'); dst = Path('{work}/api_export')\n"
                    "shutil.copytree(src, dst, dirs_exist_ok=True)\n"
                    "raw = json.loads((dst / 'config.json').read_text())\n"
                    "raw['llada_trm']['refiner_file'] = '../x'\n"
                    "(dst / 'config.json').write_text(json.dumps(raw))\nload_checkpoint(dst, device='cpu')"
                )(x)
            ),
            runner="python",
            needs_run=True,
        )
    )

    # --- LoRA
    lora = (
        "training.phase=2",
        "lora.enabled=true",
        "training.unfreeze_last_n_layers=1",
        "training.backbone_lr=1e-3",
    )
    for override in (
        "lora.rank=4096",
        "lora.rank=129",
        "lora.rank=0",
        "lora.rank=1e9",
        "lora.alpha=.inf",
        "lora.alpha=0",
        "lora.dropout=1",
        "lora.target_modules=[bogus]",
        "lora.target_modules=[]",
        "lora.target_modules=[q_proj, q_proj]",
    ):
        add(Case(f"lora: {override}", lambda x, o=override: _train_tiny(x, *lora, o, out="lora_bad")))
    add(
        Case(
            "API: add_lora rank past the width",
            _api(
                "from llada_trm.model.llada_config import LLaDAConfig\n"
                "from llada_trm.model.llada import LLaDAModel\n"
                "from llada_trm.model.lora import add_lora\n"
                "m = LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64))\n"
                "add_lora(m, [0], rank=64, alpha=1.0)"
            ),
            runner="python",
        )
    )
    add(
        Case(
            "control: a LoRA run",
            lambda x: _train_tiny(x, *lora, "lora.rank=4", out="lora_ok"),
            expect="ok",
            timeout=180,
        )
    )

    # --- TensorBoard
    add(
        Case(
            "control: a TensorBoard run",
            lambda x: _train_tiny(x, "output.tensorboard=true", out="tb_ok"),
            expect="ok",
            timeout=180,
        )
    )
    add(Case("tensorboard: not a boolean", lambda x: _train_tiny(x, "output.tensorboard=maybe")))
    add(
        Case(
            "tensorboard: its folder is a file",
            lambda x: (
                _train_tiny(x, "output.tensorboard=true", out="tb_file")
                if x.file("tb_file/tensorboard", "a file\n")
                else []
            ),
        )
    )

    # --- compare: arms, --resume, --force
    add(
        Case(
            "compare: --resume --force",
            lambda x: _compare(x, out="cmp_rf", flags=("--resume", "--force")),
        )
    )
    add(
        Case(
            "compare: --resume after changing evaluation.checkpoint",
            lambda x: (
                _compared(x, "compare_ck")
                and _compare(x, "evaluation.checkpoint=best", out="compare_ck", flags=("--resume",))
            ),
            expect="ok",
            check=_no_reuse_of_other_checkpoint,
            timeout=400,
        )
    )
    add(
        Case(
            "compare: best without a validation set",
            lambda x: _compare(
                x,
                "evaluation.checkpoint=best",
                "run.data.n_eval=0",
                "run.training.eval_every=0",
                out="compare_nobest",
            ),
            expect="ok",
            check=_fallback_recorded,
            timeout=400,
        )
    )
    add(
        Case(
            "compare: --resume with another learning rate",
            lambda x: (
                _compared(x, "compare_ck")
                and _compare(x, "run.training.lr=0.5", out="compare_ck", flags=("--resume",))
            ),
            timeout=400,
        )
    )
    add(
        Case(
            "compare: again without --resume or --force",
            lambda x: _compared(x, "compare_ck") and _compare(x, out="compare_ck"),
            timeout=400,
            protect=lambda x: [x.work / "compare_ck/comparison.json"],
        )
    )
    add(Case("compare: unknown arm", lambda x: _compare(x, "refiners=[slot, carry]")))
    add(
        Case(
            "compare: arm named like a refiner",
            lambda x: _compare(x, "refiners=[slot]", "arms={slot: {refiner: mlp}}"),
        )
    )
    add(
        Case(
            "compare: arm with an unknown run key",
            lambda x: _compare(x, "refiners=[x]", "arms={x: {refiner: slot, run: {model: {bogus: 1}}}}"),
        )
    )
    add(Case("compare: reference not compared", lambda x: _compare(x, "reference=carry")))
    add(Case("compare: a model twice", lambda x: _compare(x, "refiners=[slot, slot]")))
    add(Case("compare: --seeds a,b", lambda x: [*_compare(x), "--seeds", "a,b"]))
    add(
        Case(
            "compare: --seeds 1e9 seeds", lambda x: [*_compare(x), "--seeds", ",".join(map(str, range(5000)))]
        )
    )
    add(Case("compare: --seeds empty", lambda x: [*_compare(x), "--seeds", ""]))
    add(Case("compare: n_problems 1e9", lambda x: _compare(x, "evaluation.n_problems=1e9"), timeout=60))
    add(
        Case(
            "compare --force: output.dir someone else's folder",
            lambda x: (
                _compare(x, out="cmp_theirs", flags=("--force",)) if _run_folder(x, "cmp_theirs") else []
            ),
            protect=_protect_folder("cmp_theirs"),
            part_a=True,
            timeout=300,
        )
    )

    # --- pretrain's run directory
    add(
        Case(
            "pretrain: training.checkpoint_dir=someone's folder",
            lambda x: _pretrain(x, f"training.checkpoint_dir={_run_folder(x, 'pre_theirs')}", out="pre_a"),
            protect=_protect_folder("pre_theirs"),
            part_a=True,
            timeout=180,
        )
    )
    add(
        Case(
            "pretrain --force: output.dir someone's folder",
            lambda x: [*_pretrain(x, out="pre_theirs2"), "--force"] if _run_folder(x, "pre_theirs2") else [],
            protect=_protect_folder("pre_theirs2"),
            part_a=True,
            timeout=180,
        )
    )
    add(
        Case("pretrain: --resume without a checkpoint", lambda x: [*_pretrain(x, out="pre_nock"), "--resume"])
    )
    add(Case("pretrain: model.n_layers=100000", lambda x: _pretrain(x, "model.n_layers=100000"), timeout=60))
    add(
        Case(
            "pretrain: model.d_model=65536",
            lambda x: _pretrain(x, "model.d_model=65536", "model.n_heads=64"),
            timeout=60,
        )
    )
    add(
        Case(
            "pretrain: 8 x 16384 wide",
            lambda x: _pretrain(
                x,
                "model.d_model=16384",
                "model.n_heads=64",
                "model.n_layers=8",
                "model.mlp_hidden_size=65536",
            ),
            timeout=60,
        )
    )
    add(Case("pretrain: init_from a file", lambda x: _pretrain(x, f"model.init_from={_file_in_the_way(x)}")))
    add(
        Case(
            "pretrain: --out under a file",
            lambda x: [*_pretrain(x), "--out", str(_file_in_the_way(x) / "o")],
        )
    )

    # --- the caches' --rebuild
    add(
        Case(
            "cache --rebuild: feature_cache_dir=someone's folder",
            lambda x: [
                "cache",
                *_train_tiny(
                    x,
                    "advanced.feature_cache=true",
                    f"advanced.feature_cache_dir={_run_folder(x, 'fc_theirs')}",
                    out="fc_run",
                )[1:],
                "--rebuild",
            ],
            protect=_protect_folder("fc_theirs"),
            part_a=True,
            timeout=180,
        )
    )
    add(
        Case(
            "cache --rebuild: feature_cache_dir=the run itself",
            lambda x: [
                "cache",
                *_train_tiny(
                    x,
                    "advanced.feature_cache=true",
                    f"advanced.feature_cache_dir={x.run_copy('run_as_cache')}",
                    out="fc_run2",
                )[1:],
                "--rebuild",
            ],
            needs_run=True,
            part_a=True,
            timeout=180,
            protect=lambda x: [x.work / "run_as_cache/checkpoints/last/model.safetensors"],
        )
    )
    add(
        Case(
            "cache: cache_noise_draws 1e9",
            lambda x: [
                "cache",
                *_train_tiny(x, "advanced.feature_cache=true", "advanced.cache_noise_draws=1e9")[1:],
            ],
            timeout=60,
        )
    )

    # --- the Python API
    for label, call in (
        ("generate('')", "''"),
        ("generate('   ')", "'   '"),
        ("generate({...})", "{'q': 'x'}"),
        ("generate(set)", "{'a', 'b'}"),
        ("generate(b'...')", "b'bytes'"),
        ("generate(7)", "7"),
        ("generate([])", "[]"),
        ("generate(['ok', ''])", "['What is 2?', '']"),
        ("generate([None])", "[None]"),
    ):
        add(
            Case(
                f"API: {label}",
                _api(
                    "from llada_trm import load_checkpoint\n"
                    f"load_checkpoint('embedded', device='cpu').generate({call}, {PYTHON_TINY})"
                ),
                runner="python",
            )
        )
    for label, code in (
        (
            "generate(bogus=1)",
            "from llada_trm import load_checkpoint\n"
            f"load_checkpoint('embedded', device='cpu').generate('hi', {PYTHON_TINY}, bogus=1)",
        ),
        (
            "generate(steps=0)",
            "from llada_trm import load_checkpoint\n"
            "load_checkpoint('embedded', device='cpu').generate('hi', steps=0)",
        ),
        (
            "generate(gen_length=10**9)",
            "from llada_trm import load_checkpoint\n"
            "load_checkpoint('embedded', device='cpu').generate('hi', gen_length=10**9, block_length=10**9)",
        ),
        ("load_checkpoint(missing)", "from llada_trm import load_checkpoint\nload_checkpoint('{work}/nope')"),
        (
            "load_checkpoint(refiner='gru')",
            "from llada_trm import load_checkpoint\nload_checkpoint('embedded', refiner='gru')",
        ),
        (
            "load_checkpoint(dtype='int8')",
            "from llada_trm import load_checkpoint\nload_checkpoint('embedded', dtype='int8')",
        ),
        (
            "LLaDAConfig(n_layers=100000)",
            "from llada_trm import LLaDAConfig\n"
            "LLaDAConfig(d_model=32, n_heads=4, n_layers=100000, vocab_size=64)",
        ),
        (
            "HybridConfig(max_recursive_steps=1e9)",
            "from llada_trm import HybridConfig\nHybridConfig(max_recursive_steps=10**9)",
        ),
        (
            "HybridConfig(confidence_threshold=nan)",
            "from llada_trm import HybridConfig\nHybridConfig(confidence_threshold=float('nan'))",
        ),
        (
            "load_config(a deep file)",
            "from pathlib import Path\nfrom llada_trm import load_config\n"
            "p = Path('{work}/api_deep.yaml')\n"
            "p.write_text('training: ' + '[' * 5000 + ']' * 5000)\nload_config(p)",
        ),
        (
            "export_run into the run",
            "from llada_trm.extras.export import export_run\nexport_run('{run}', '{run}')",
        ),
    ):
        add(Case(f"API: {label}", _api(code), runner="python", needs_run="{run}" in code))
    add(
        Case(
            "control: API generate",
            _api(
                "from llada_trm import load_checkpoint\n"
                "model = load_checkpoint('embedded', device='cpu')\n"
                f"print(model.generate('What is 2 plus 3?', {PYTHON_TINY}).answers)"
            ),
            runner="python",
            expect="ok",
        )
    )

    # --- trajectory pages
    add(
        Case(
            "trajectory: --html with --file",
            lambda x: _gen(
                "embedded", "--html", str(x.work / "t.html"), "--file", str(x.file("q2.txt", "hi\n"))
            ),
        )
    )
    add(
        Case(
            "trajectory: --show-steps with undecodable bytes",
            lambda x: _gen("embedded", "--show-steps", "caf\udce9"),
        )
    )
    add(
        Case(
            "trajectory: --html of an export",
            lambda x: _gen(_exported(x), "--html", str(x.work / "export.html"), "What is 2 plus 3?"),
            needs_run=True,
            expect="ok",
            check=_html_written("export.html"),
        )
    )
    add(
        Case(
            "control: trajectory page",
            lambda x: _gen("embedded", "--html", str(x.work / "ok.html"), "What is 2 plus 3?"),
            expect="ok",
            check=_html_written("ok.html"),
        )
    )
    add(
        Case(
            "trajectory: HTML in the question is escaped",
            lambda x: _gen("embedded", "--html", str(x.work / "xss.html"), "<script>alert(1)</script>"),
            expect="ok",
            check=lambda x, d: "silent" if "<script>alert" in (x.work / "xss.html").read_text() else None,
        )
    )
    return c


_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
_DOUBLING = (
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s }}"
)


def _flow_bomb() -> str:
    parts = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "[" + ", ".join(parts) + "]"


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path.parent


def _edited_backbone(ctx: Context, name: str, edit: Callable[[Path], None]) -> Path:
    fresh = not (ctx.work / name).exists()
    directory = ctx.backbone_copy(name)
    if fresh:
        edit(directory)
    return directory


def _edited_run(ctx: Context, name: str, edit: Callable[[Path], object]) -> Path:
    fresh = not (ctx.work / name).exists()
    directory = ctx.run_copy(name)
    if fresh:
        edit(directory)
    return directory


# ---------------------------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the sweep is a CPU exercise; a GPU would only change the timings
    return env


# The address space of each case: a memory blow-up fails (and is counted) instead of swapping the machine.
MEMORY_CAP = 12 * 2**30


def _command(case: Case, args: list[str]) -> list[str]:
    if case.runner == "lm-eval":
        return [sys.executable, "-m", "llada_trm.extras.harness", *args]
    if case.runner == "python":
        return [sys.executable, "-c", API_DRIVER, *args]
    return [sys.executable, "-m", "llada_trm", *args]


# A case's `timeout` is CPU seconds (RLIMIT_CPU): on a loaded machine a process may wait for a core far
# longer than it computes, so wall time alone would call a slow start a hang. The wall clock still stops a
# case that sleeps or deadlocks, after WALL_FACTOR times as long.
WALL_FACTOR = 6


def _limits(fsize: int | None, cpu_seconds: float) -> Callable[[], None]:
    """In the child: the CPU-time limit, the memory cap, and with `fsize` a file-size limit that fails
    writes (EFBIG) as a full disk would (SIGXFSZ ignored, so the write returns the error instead of killing
    the process)."""

    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        cpu = int(cpu_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        cap = MEMORY_CAP if hard == resource.RLIM_INFINITY else min(MEMORY_CAP, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return apply


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
    try:
        done = subprocess.run(
            _command(case, args),
            input=case.stdin,
            capture_output=True,
            text=True,
            timeout=case.timeout * WALL_FACTOR,
            env={**_env(), **case.env},
            cwd=ctx.work,
            check=False,
            preexec_fn=_limits(case.fsize, case.timeout),
            errors="backslashreplace",
        )
    except subprocess.TimeoutExpired:
        return "hang", f"no result after {case.timeout * WALL_FACTOR:.0f} s of wall time"
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "hang", f"still computing after {case.timeout:.0f} s of CPU time"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    after = _digest(protected)
    lost = [p for p, digest in before.items() if digest is not None and after[p] != digest]
    if lost:
        return "data lost", f"changed or removed: {', '.join(Path(p).name for p in lost)}"
    if "Traceback" in done.stderr:
        return "traceback", last
    if "out of memory" in last or "MemoryError" in last:
        return "hang", f"memory blow-up: {last}"
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
        "data.n_train=16",
        "data.n_eval=8",
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
    parser.add_argument(
        "--only", metavar="TEXT", action="append", help="only cases whose name contains TEXT (repeatable)"
    )
    parser.add_argument("--range", metavar="FIRST:LAST", help="only the selected cases FIRST..LAST (from 1)")
    parser.add_argument(
        "--surface",
        choices=("all", "core", "new"),
        default="all",
        help="core: the training path's cases; new: the surface issue 28 covers (export, lm-eval, LoRA, ...)",
    )
    parser.add_argument("--workdir", metavar="DIR", help="scratch directory (default: a temporary one)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every case's last stderr line")
    args = parser.parse_args(argv)

    selected = [case for case in cases() if (case.quick or not args.quick)]
    if args.only:
        selected = [case for case in selected if any(o.lower() in case.name.lower() for o in args.only)]
    if args.surface != "all":
        selected = [case for case in selected if case.surface == args.surface]
    if args.range:  # split a long sweep over sessions or machines
        first, _, last = args.range.partition(":")
        selected = selected[int(first or 1) - 1 : int(last) if last else None]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llada-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    from llada_trm.assets import embedded_backbone_dir

    ctx = Context(work=work, run=work / "tiny_run", embedded=Path(embedded_backbone_dir()))
    started = time.perf_counter()
    if any(case.needs_run for case in selected) and not (ctx.run / "checkpoints/last").exists():
        _make_run(ctx)
    counts: Counter[str] = Counter()
    part_a: list[str] = []
    for number, case in enumerate(selected, start=1):
        t0 = time.perf_counter()
        kind, note = classify(case, ctx)
        counts[kind] += 1
        if case.part_a:
            part_a.append(f"{case.name}: {kind}")
        bad = kind not in ("clear", "ok")
        if args.verbose or bad:
            print(
                f"[{number:2d}/{len(selected)}] {kind:9s} {case.name} "
                f"({time.perf_counter() - t0:.0f} s): {note}"
            )
    print(f"\n{len(selected)} cases in {(time.perf_counter() - started) / 60:.1f} min (work dir {work})")
    if part_a:  # listed before the table, whose last seven lines CI parses
        print("cases whose data-loss fix is issue 28's part A (a command deletes only what it made):")
        for line in part_a:
            print(f"  {line}")
    print(f"{'kind':10s} count")
    for kind in KINDS:
        print(f"{kind:10s} {counts[kind]}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(counts[k] for k in ("traceback", "silent", "hang", "data lost", "failed")) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
