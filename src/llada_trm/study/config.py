"""The `llada-trm compare` settings: the shared training run, the refiners and seeds, the test problems.

`compare.run_compare` runs them; this module only validates them (`load_compare_config`, `--seeds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from llada_trm.config import MAX_PROBLEMS, RunConfig
from llada_trm.schema import Fraction, Int, Section, command_schema, describe, load_schema, to_int

REFINER_KINDS = ("mlp", "slot")


class CompareEvaluation(Section):
    """The test problems every model answers (the sampler is `run.sampling`, the same for every model) and
    the planned effect behind their number (`planned_difference` at `planned_discordant`, comparison.md)."""

    n_problems: Annotated[int, BeforeValidator(to_int), Field(ge=1, le=MAX_PROBLEMS)] = 24  # as data's sizes
    split: str = Field(default="test", description="held-out split; for gsm8k data also a slice, test[:50]")
    checkpoint: Literal["last", "best"] = "last"
    planned_difference: Fraction = 0.05
    planned_discordant: Fraction = 0.08


class CompareOutput(Section):
    dir: str = "runs/compare"


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, nested mappings key by key (an arm's `run:` over the shared run)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class CompareArm(Section):
    """A named variant of the shared run (a lever or a control): the refiner it trains (`none` trains no
    refiner, e.g. phase 2 on the top backbone layers) and the run settings it changes, as a nested mapping
    merged over `run` (`{model: {carry: true}}`), so one arm differs from the others by what it lists."""

    refiner: Literal["none", "mlp", "slot"]
    run: dict[str, Any] = Field(default_factory=dict)


@command_schema("compare")
class CompareConfig(Section):
    """`run` is the training run shared by every refiner (`model.refiner`, `training.seed` and `output.dir`
    are set per run); `refiners` (`mlp`, `slot`, or names of `arms`) are trained once per seed of `seeds`
    (null = `run.training.seed` alone) and compared with the backbone alone when `baseline` is on, with
    each other (slot vs mlp) and with `reference` (an entry of `refiners`) when it is set."""

    run: RunConfig = Field(default_factory=RunConfig)
    refiners: list[str] = Field(default_factory=lambda: ["mlp", "slot"], min_length=1)
    arms: dict[str, CompareArm] = Field(default_factory=dict)
    reference: str | None = None
    seeds: list[Int] | None = Field(default=None, min_length=1)
    baseline: bool = True
    evaluation: CompareEvaluation = Field(default_factory=CompareEvaluation)
    output: CompareOutput = Field(default_factory=CompareOutput)

    @model_validator(mode="after")
    def _known_models(self) -> CompareConfig:
        for name in self.arms:
            if name in (*REFINER_KINDS, "none") or not name.replace("_", "").isalnum():
                raise ValueError(f"arms: {name!r} is not a usable arm name; use letters, digits and _, "
                                 "other than none/mlp/slot")  # fmt: skip
        unknown = [name for name in self.refiners if name not in REFINER_KINDS and name not in self.arms]
        if unknown:
            raise ValueError(f"refiners: {', '.join(map(repr, unknown))} is neither mlp, slot nor a key of "
                             f"arms ({', '.join(self.arms) or 'none defined'})")  # fmt: skip
        if len(set(self.refiners)) != len(self.refiners):
            raise ValueError(f"refiners: {self.refiners} lists a model twice")
        if self.reference is not None and self.reference not in self.refiners:
            listed = ", ".join(self.refiners)
            raise ValueError(f"reference: {self.reference!r} must be one of refiners ({listed})")
        for name in self.arms:  # an arm's settings fail here, before any model trains
            self.run_for(name, self.run.training.seed, self.run.output.dir)
        return self

    def refiner_of(self, name: str) -> str:
        """The refiner kind a model of `refiners` trains: itself for mlp/slot, its arm's otherwise."""
        return self.arms[name].refiner if name in self.arms else name

    def trained_backbone(self) -> list[str]:
        """The models of `refiners` that change the backbone (phase 2 or 3): their own backbone columns are
        not the frozen backbone's."""
        return [name for name in self.refiners if self.run_for(name, 0, ".").training.phase != 1]

    def run_for(self, name: str, seed: int, out_dir: str | Path) -> RunConfig:
        """The training run of model `name` under training seed `seed`, writing to `out_dir`."""
        data = _merge(self.run.model_dump(mode="python"), self.arms[name].run if name in self.arms else {})
        data["model"]["refiner"] = self.refiner_of(name)
        data["model"]["integration"] = "replace"
        data["training"]["seed"] = seed
        data["output"]["dir"] = str(out_dir)
        try:
            return RunConfig.model_validate(data)
        except ValidationError as error:
            raise ValueError(describe(error, f"arms.{name}.run", RunConfig)) from None

    def seed_list(self) -> list[int]:
        seeds = self.seeds if self.seeds is not None else [self.run.training.seed]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds: {seeds} repeats a seed; list each training seed once")
        if len(seeds) > MAX_SEEDS:  # each seed trains every refiner: thousands is a typo, not a study
            raise ValueError(f"seeds: {len(seeds)} training seeds; a comparison takes at most {MAX_SEEDS}")
        return list(seeds)


MAX_SEEDS = 64


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
