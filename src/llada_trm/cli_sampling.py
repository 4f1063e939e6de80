"""The sampler flags of `llada-trm eval` and `generate`: unset means "the checkpoint's own value".

A trained run is evaluated with its config's `sampling:` section (what its validation and `compare` used);
a bare backbone with LLaDA's defaults (`SamplingOptions()`); each flag given replaces one setting.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

__all__ = [
    "OFF",
    "SAMPLING_FLAGS",
    "add_sampling_options",
    "resolve_sampling",
    "sampling_options",
    "sampling_source",
]

SAMPLING_FLAGS = (
    "steps",
    "gen_length",
    "block_length",
    "temperature",
    "remasking",
    "threshold",
    "cache",
    "cfg_scale",
    "batch_size",
    "seed",
)
OFF = "off"  # threshold / cache: switch off what a run's `sampling:` section switched on


def sampling_options(args: argparse.Namespace) -> Any:
    """The checkpoint's sampler settings (a trained run's `sampling:` section, LLaDA's defaults for a
    backbone) with every flag the user gave in place of its value (`off` switches threshold / cache off);
    read before any weights load, so bad settings fail first."""
    return resolve_sampling(args.checkpoint, {name: getattr(args, name, None) for name in SAMPLING_FLAGS})


def resolve_sampling(checkpoint: Any, given: Mapping[str, Any]) -> Any:
    """`checkpoint`'s sampler settings with `given` in place of its values: None keeps the checkpoint's
    value, `off` switches a setting off (threshold, cache). The one rule for every entry point that takes
    a checkpoint and sampler overrides (`eval`, `generate`, the lm-eval backend)."""
    from llada_trm.evaluate.loading import checkpoint_sampling, override_sampling

    off = [name for name, value in given.items() if value == OFF]
    on = {name: value for name, value in given.items() if value != OFF}
    options = override_sampling(checkpoint_sampling(checkpoint), **on)
    return replace(options, **dict.fromkeys(off)) if off else options


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
    """Every flag defaults to None: "the checkpoint's value" (a run's `sampling:` section, or the default
    shown for a bare backbone), so a run is evaluated the way it was trained and compared."""
    group = parser.add_argument_group(
        "sampling (default: a trained run's `sampling:` settings; for a backbone, the values shown)"
    )
    group.add_argument("--steps", type=int, default=None, help="denoising steps in all (backbone: 64)")
    group.add_argument("--gen-length", type=int, default=None, help="answer tokens (backbone: 128)")
    group.add_argument("--block-length", type=int, default=None, help="semi-AR block (backbone: 32)")
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy (backbone: 0)")
    group.add_argument("--remasking", choices=("low_confidence", "random"), default=None)
    group.add_argument(
        "--threshold",
        type=_threshold,
        default=None,
        help=f"Fast-dLLM parallel decoding threshold, e.g. 0.9; {OFF}: LLaDA's schedule (backbone: off)",
    )
    group.add_argument(
        "--cache",
        choices=("prefix", "dual", OFF),
        default=None,
        help="Fast-dLLM's block-wise KV cache (backbone: off)",
    )
    group.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (backbone: 0)")
    group.add_argument("--seed", type=int, default=None, help="seed of the sampling noise (backbone: 0)")
    group.add_argument("--batch-size", type=int, default=None, help="problems per batch (backbone: 16)")
