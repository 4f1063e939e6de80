"""Peak memory of loading a sharded bf16 LLaDA checkpoint: the finiteness scan on whole tensors vs in slices.

Builds a random checkpoint in the official layout (LLaDA-8B's width and vocabulary by default, with few
layers: the two 1.04 GB tensors, the embedding and the LM head, are what a whole-tensor scan blows up), then
loads it in a fresh process per variant and reads the peak RSS over the RSS before the load (VmHWM after a
`/proc/self/clear_refs` reset; Linux). The shards are memory-mapped, so their pages count once: a peak of
1.00x the weights' bytes is one copy. `whole` is the old scan (`torch.isfinite(tensor).all()`), `sliced` the
loader's (64K-element slices).

    PYTHONPATH=src .venv/bin/python bench/bench_load_memory.py                 # d 4096, 1 layer: 2.5 GB
    PYTHONPATH=src .venv/bin/python bench/bench_load_memory.py --layers 2 --dir /big/disk/ckpt --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llada_trm.model.llada import LLaDAModel
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.llada_weights import save_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
                rope_theta=500000.0, max_sequence_length=4096)

# One load in a fresh process: argv = checkpoint, slice length (0: whole tensors, the old scan).
_MEASURE = """
import json, sys, time
import torch
import llada_trm.model.llada_weights as checkpoint
from llada_trm.model.llada import LLaDAModel

def field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {name} in /proc/self/status")

path, step = sys.argv[1], int(sys.argv[2])
if step == 0:
    checkpoint._all_finite = lambda tensor: bool(torch.isfinite(tensor).all())
else:
    checkpoint._FINITE_SLICE = step
    checkpoint._all_finite.__defaults__ = (step,)
with torch.device("meta"):
    model = LLaDAModel(checkpoint.read_config(path))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = field("VmRSS")
start = time.perf_counter()
checkpoint.load_weights(model, path)
seconds = time.perf_counter() - start
nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"extra": field("VmHWM") - base, "bytes": nbytes, "seconds": seconds,
                  "dtypes": sorted({str(t.dtype) for t in model.state_dict().values()})}))
"""


def build(path: Path, layers: int, seed: int = 0) -> int:
    """A random bf16 checkpoint of LLaDA-8B's width with `layers` blocks, sharded like the release."""
    config = LLaDAConfig(**LLADA_8B, n_layers=layers)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in LLaDAModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_state_dict(state, config, path, max_shard_size="2GB")
    return sum(t.numel() * t.element_size() for t in state.values())


def measure(path: Path, step: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(step)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if done.returncode:
        raise SystemExit(f"the {step or 'whole'}-scan load failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks (LLaDA-8B has 32)")
    parser.add_argument("--repeats", type=int, default=3, help="loads per variant, interleaved; best shown")
    parser.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files written in --dir")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    temporary = args.dir is None
    if not temporary and args.dir.exists() and any(args.dir.glob("model*.safetensors*")):
        raise SystemExit(f"--dir {args.dir} already holds a checkpoint; name an empty or new folder")
    path = Path(tempfile.mkdtemp(prefix="llada-load-")) if temporary else args.dir
    try:
        start = time.perf_counter()
        nbytes = build(path, args.layers)
        shards = len(list(path.glob("model-*-of-*.safetensors")))
        print(f"random bf16 checkpoint, LLaDA-8B width, {args.layers} layer(s): {nbytes / 1e9:.2f} GB in "
              f"{shards} shards, written in {time.perf_counter() - start:.0f} s")
        runs: dict[str, list[dict]] = {"whole": [], "sliced": []}
        for _ in range(args.repeats):
            for name, step in (("whole", 0), ("sliced", 1 << 16)):
                runs[name].append(measure(path, step))
        print(f"{'scan':8s} {'peak over baseline':>19s} {'x weights':>10s} {'excess':>9s} {'load s':>7s}")
        rows = {}
        for name, results in runs.items():
            best = min(results, key=lambda r: r["extra"])
            rows[name] = {**best, "ratio": best["extra"] / best["bytes"], "all": results}
            seconds = min(r["seconds"] for r in results)
            print(f"{name:8s} {best['extra'] / 1e9:16.2f} GB {rows[name]['ratio']:9.3f}x "
                  f"{(best['extra'] - best['bytes']) / 1e6:+7.0f} MB {seconds:7.2f}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
        elif not args.keep:  # only the files this command wrote
            for file in path.glob("model*.safetensors*"):
                file.unlink()
            (path / "config.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
