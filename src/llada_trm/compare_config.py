"""The `llada-trm compare` settings: the shared training run, the refiners and seeds, the test problems.

`compare.run_compare` runs them; this module only validates them (`load_compare_config`, `--seeds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from llada_trm.config import Int, PosInt, RunConfig, _Section, load_schema
from llada_trm.schema import Fraction

__all__ = ["CompareConfig", "CompareEvaluation", "CompareOutput", "load_compare_config", "parse_seeds"]


class CompareEvaluation(_Section):
    """The test problems every model answers (the sampler is `run.sampling`, the same for every model) and
    the planned effect behind their number (`planned_difference` at `planned_discordant`, comparison.md)."""

    n_problems: PosInt = 24
    split: str = Field(default="test", description="held-out split; for gsm8k data also a slice, test[:50]")
    checkpoint: Literal["last", "best"] = "last"
    planned_difference: Fraction = 0.05
    planned_discordant: Fraction = 0.08


class CompareOutput(_Section):
    dir: str = "runs/compare"


class CompareConfig(_Section):
    """`run` is the training run shared by every refiner (`model.refiner`, `training.seed` and `output.dir`
    are set per run); `refiners` are trained once per seed of `seeds` (null = `run.training.seed` alone)
    and compared with the backbone alone when `baseline` is on."""

    run: RunConfig = Field(default_factory=RunConfig)
    refiners: list[Literal["mlp", "slot"]] = Field(default_factory=lambda: ["mlp", "slot"], min_length=1)
    seeds: list[Int] | None = Field(default=None, min_length=1)
    baseline: bool = True
    evaluation: CompareEvaluation = Field(default_factory=CompareEvaluation)
    output: CompareOutput = Field(default_factory=CompareOutput)

    def seed_list(self) -> list[int]:
        seeds = self.seeds if self.seeds is not None else [self.run.training.seed]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: {seeds} repeats a seed; list each training seed once")
        return list(seeds)


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` -> [0, 1, 2] (one-line ValueError otherwise)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ValueError("--seeds: give at least one training seed, e.g. --seeds 0")
    return seeds


def load_compare_config(
    path: str | Path | None, overrides: Sequence[str] | None = None, seeds: Sequence[int] | None = None
) -> CompareConfig:
    """Read and validate a compare YAML (None = the defaults) with `--set a.b=c` overrides; `seeds`
    (`--seeds`) replaces the config's list."""
    config = load_schema(CompareConfig, path, overrides)
    if seeds is not None:
        config = config.model_copy(update={"seeds": list(seeds)})
    config.seed_list()  # a repeated seed fails before any training
    return config
