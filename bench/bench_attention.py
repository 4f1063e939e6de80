"""Attention through `F.scaled_dot_product_attention` vs the explicit softmax(QK^T / sqrt(d) + bias) V.

Both the slot refiner's blocks (`model.refiners.base.TransformerBlock`, keys masked with a bool padding mask)
and the backbone's (`model.llada.LLaDABlock`, RoPE and an additive `finfo.min` padding bias) call SDPA.
This script times, in one process and side by side:

- core: the attention operation alone on [B, H, L, head_dim] tensors;
- block: the real module, once as shipped (SDPA) and once with SDPA swapped for the explicit formulation;

each as forward only and as forward + backward, at a few sizes, with and without a padding mask. It prints
the times and the ratio explicit / SDPA (> 1: SDPA is faster), and checks that both give the same outputs.

    .venv/bin/python bench/bench_attention.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llada_trm.model.llada import LLaDABlock, rotary_tables
from llada_trm.model.llada_config import LLaDAConfig
from llada_trm.model.refiners.base import TransformerBlock

SDPA = F.scaled_dot_product_attention


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, materialising the [B, H, L, L] scores; SDPA's semantics for masks.

    A bool mask keeps the True entries; a float mask is added to the scores. Masked scores get `finfo.min`
    rather than -inf so that a fully masked row gives a uniform average instead of NaN, as SDPA does.
    """
    if dropout_p or is_causal:
        raise ValueError("the explicit formulation here covers the non-causal, dropout-free case only")
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


@contextlib.contextmanager
def explicit_sdpa() -> Iterator[None]:
    """Route every `F.scaled_dot_product_attention` call (both modules use it) to the explicit formulation."""
    F.scaled_dot_product_attention = explicit_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = SDPA


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median wall time in ms of `fn` over `repeats` runs, after one warm-up run."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


@dataclass(frozen=True)
class Size:
    batch: int
    length: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def __str__(self) -> str:
        return f"B{self.batch} L{self.length} H{self.heads}x{self.head_dim}"


def padding(size: Size, device: torch.device) -> Tensor:
    """[B, L] keep-mask: every other row left-padded by a quarter of its length."""
    keep = torch.ones(size.batch, size.length, dtype=torch.bool, device=device)
    keep[1::2, : size.length // 4] = False
    return keep


def padding_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The backbone's form of the mask: [B, 1, 1, L] additive bias, `finfo.min` on padded keys."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def core_case(kind: str, size: Size, masked: bool, device: torch.device, dtype: torch.dtype) -> tuple:
    """q, k, v (requiring grad) and the mask in the form each module passes to SDPA."""
    shape = (size.batch, size.heads, size.length, size.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = None
    if masked:
        keep = padding(size, device)
        if kind == "refiner":  # AttentionContextExtractor: bool keys mask [B, 1, 1, L]
            mask = keep[:, None, None, :]
        else:  # LLaDAModel.padding_bias: additive finfo.min on padded keys
            mask = padding_bias(keep, dtype)
    return q, k, v, mask


def block_case(kind: str, size: Size, masked: bool, device: torch.device, dtype: torch.dtype):
    """A real block and a closure running it on random inputs (with the padding mask when `masked`)."""
    torch.manual_seed(0)
    x = torch.randn(size.batch, size.length, size.width, device=device, dtype=dtype, requires_grad=True)
    keep = padding(size, device) if masked else None
    if kind == "refiner":
        block: nn.Module = TransformerBlock(size.width, size.heads, mlp_ratio=4.0).to(device, dtype)
        return block, lambda: block(x, keep)[0]
    config = LLaDAConfig(d_model=size.width, n_heads=size.heads, n_layers=1, vocab_size=64,
                         mlp_hidden_size=3 * size.width, max_sequence_length=size.length)
    block = LLaDABlock(config).to(device, dtype)
    sin, cos = rotary_tables(size.length, size.head_dim, config.rope_theta, device)
    bias = None if keep is None else padding_bias(keep, dtype)
    return block, lambda: block(x, sin, cos, bias)[0]


def no_grad(run: Callable[[], Tensor]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            run()

    return step


def forward_backward(run: Callable[[], Tensor], params: list[Tensor]) -> Callable[[], None]:
    def step() -> None:
        torch.autograd.grad(run().float().square().mean(), params)

    return step


def swapped(run: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """`run` with SDPA swapped for the explicit formulation in its forward (backward replays the graph)."""

    def call() -> Tensor:
        with explicit_sdpa():
            return run()

    return call


def measure(kind: str, size: Size, masked: bool, args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    q, k, v, mask = core_case(kind, size, masked, device, dtype)
    variants = {  # what -> (SDPA run, explicit run, tensors the backward differentiates)
        "core": (
            lambda: SDPA(q, k, v, attn_mask=mask),
            lambda: explicit_attention(q, k, v, attn_mask=mask),
            [q, k, v],
        ),
    }
    if size.width <= args.max_block_width:
        block, run_block = block_case(kind, size, masked, device, dtype)
        variants["block"] = (run_block, swapped(run_block), [*block.parameters()])
    rows = []
    for what, (sdpa_run, explicit_run, params) in variants.items():
        with torch.no_grad():
            error = (sdpa_run() - explicit_run()).abs().max().item()
        for pass_name in ("forward", "fwd+bwd"):
            if pass_name == "forward":
                sdpa_step, explicit_step = no_grad(sdpa_run), no_grad(explicit_run)
            else:
                sdpa_step = forward_backward(sdpa_run, params)
                explicit_step = forward_backward(explicit_run, params)
            sdpa_ms = timed(sdpa_step, args.repeats, device)
            explicit_ms = timed(explicit_step, args.repeats, device)
            rows.append(dict(kind=kind, size=str(size), mask=masked, what=what, pass_=pass_name,
                             sdpa_ms=sdpa_ms, explicit_ms=explicit_ms, max_abs_diff=error))
    return rows


def sizes(kind: str, quick: bool) -> list[Size]:
    """Refiner: the tiny refiner (d_inner 128, 4 heads) and a LLaDA-8B-sized one (d_inner 512, 8 heads);
    backbone: the tiny backbone's heads (4 x 32) and LLaDA-8B's (32 x 128); lengths of a GSM8K prompt+answer.
    """
    if kind == "refiner":
        shapes = [(4, 32), (8, 64)]
    else:
        shapes = [(4, 32), (32, 128)]
    lengths = [256] if quick else [128, 256, 512]
    batch = 4 if quick else 8
    return [Size(batch, length, heads, head_dim) for heads, head_dim in shapes for length in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one length per shape, batch 4, 3 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-block-width", type=int, default=None,
                        help="time whole blocks only up to this width (default: 1024 on CPU, 8192 on GPU; a "
                        "LLaDA-8B-wide block has 218 M parameters)")
    args = parser.parse_args()
    if args.max_block_width is None:
        args.max_block_width = 1024 if args.device == "cpu" else 8192
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats} runs; "
          "ratio = explicit / SDPA (> 1: SDPA faster)")
    print(f"{'module':8s} {'size':20s} {'mask':5s} {'what':5s} {'pass':8s} {'SDPA ms':>9s} "
          f"{'explicit ms':>11s} {'ratio':>6s} {'max|diff|':>9s}")
    for kind in ("refiner", "backbone"):
        for size in sizes(kind, args.quick):
            for masked in (False, True):
                for r in measure(kind, size, masked, args):
                    print(f"{r['kind']:8s} {r['size']:20s} {'yes' if r['mask'] else 'no':5s} {r['what']:5s} "
                          f"{r['pass_']:8s} {r['sdpa_ms']:9.2f} {r['explicit_ms']:11.2f} "
                          f"{r['explicit_ms'] / r['sdpa_ms']:6.2f} {r['max_abs_diff']:9.1e}")


if __name__ == "__main__":
    main()
