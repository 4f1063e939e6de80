"""The `llada-trm pretrain` settings; `PretrainConfig.run_config` maps them onto the run config of the one
training loop (no refiner, the whole backbone trainable, AdamW's constants the loop's own). `evaluation:` is
the run config's sampler section with the main job's fast defaults, plus how many problems it answers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from llada_trm.config import RunConfig, SamplingConfig
from llada_trm.data.arithmetic import ArithmeticTaskConfig
from llada_trm.data.synthetic import SyntheticTaskConfig
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.schema import (
    Float,
    Fraction,
    Int,
    NonNegInt,
    PosInt,
    Section,
    command_schema,
    load_schema,
    to_float,
)

PositiveFloat = Annotated[float, BeforeValidator(to_float), Field(gt=0)]


class ArchitectureConfig(Section):
    """The backbone's shape (LLaDA's field names); everything else is LLaDA-8B's.

    `init_from`: a backbone directory in HF layout (e.g. src/llada_trm/assets/tiny_backbone) whose weights
    and tokenizer this run starts from instead of random weights and a newly built tokenizer; its shape must
    equal the fields here.
    """

    d_model: PosInt = 128
    n_layers: PosInt = 6
    n_heads: PosInt = 4
    n_kv_heads: PosInt | None = None
    mlp_hidden_size: PosInt = 384
    max_sequence_length: PosInt = 256
    rope_theta: PositiveFloat = 10000.0
    init_from: str | None = None


class TaskConfig(Section):
    """The generated problems the backbone learns (see `llada_trm.data.SyntheticTaskConfig`, or with
    `dataset: arithmetic` the `arithmetic:` section, `llada_trm.data.arithmetic.ArithmeticTaskConfig`).

    `n_eval` validation problems measure the masked-token accuracy; `vocab_size` is the size of the tokenizer
    built from the training problems (unused with `model.init_from`, whose tokenizer is kept).
    `random_padding` EOS-pads each batch to a length drawn from [its longest example, max_length] instead of
    to its longest example: a backbone only learns to end an answer in an EOS tail as long as those it was
    trained on, and sampled with a longer gen_length it commits EOS too early (backbone v3, padded to the
    batch's longest: strict 0.188 on 48 test problems at gen_length 128, exact sampler, 7 answers empty and
    most others cut mid-line, against 0.518 on 768 at gen_length 64).
    """

    n_train: PosInt = 20000
    n_eval: PosInt = 200
    min_steps: PosInt = 1
    max_steps: PosInt = 4
    max_number: PosInt = 20
    max_result: PosInt = 1000
    seed: Int = 0
    vocab_size: PosInt = 1024
    max_length: PosInt = 192
    random_padding: bool = False
    dataset: Literal["synthetic", "arithmetic"] = "synthetic"
    arithmetic: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig)

    def task(self) -> SyntheticTaskConfig | ArithmeticTaskConfig:
        """The generated task: the GSM8K-style one from the fields above, or (`dataset: arithmetic`) the
        arithmetic one of the `arithmetic:` section (its own knobs and seed; n_train / n_eval from here)."""
        if self.dataset == "arithmetic":
            return self.arithmetic
        knobs = {"min_steps", "max_steps", "max_number", "max_result", "seed"}
        return SyntheticTaskConfig(**self.model_dump(include=knobs))


class StopAt(Section):
    """Targets that end training early, at the first evaluation where every one that is set is met.

    Rates are those of the validation problems: `entity_copy` the answer lines naming the question's person
    and object, `line_arithmetic` the lines computed right given the right operands, `strict_min` the strict
    `#### n` accuracy.
    """

    entity_copy: Fraction | None = None
    line_arithmetic: Fraction | None = None
    strict_min: Fraction | None = None


class OptimConfig(Section):
    """The one loop's AdamW with linear warm-up and cosine decay to `min_lr_ratio` x lr (its weight decay,
    betas and gradient clipping: `config.TrainingConfig`'s constants); checkpoints and evaluations.

    `save_every` steps the run's state goes to `checkpoint_dir` (default `<output.dir>.partial`, a
    `llada-trm train` run directory), from which `--resume` continues it exactly. `eval_every` steps (and at
    the end) the model is measured on the validation problems; 0 turns the in-training evaluations off.
    `object_weight` multiplies the loss of the answer's object nouns (the task's items, e.g. " eggs"): at
    1 (LLaDA's loss) the embedded backbone never learnt to copy them from the question (13% of masked
    object tokens right, chance 6%, after 9000 steps), at 5 a 300-step scout reached 67%. `masks`: the
    noise the loss is taken on, the run config's `training.masks` (LLaDA's forward process, or e.g. the
    answer-structure masks to fine-tune a backbone on what a block sampler leaves masked); `forward_mix`:
    with targeted masks, the share of rows that keep the forward process (answer-structure masks alone never
    mask an answer's opening, and a backbone trained on them alone stops writing it).
    """

    steps: PosInt = 3000
    batch_size: PosInt = 32
    lr: Float = 2e-3
    min_lr_ratio: Fraction = 0.1
    warmup_steps: NonNegInt = 100
    object_weight: PositiveFloat = 1.0
    masks: Literal["forward", "answer_structure"] = "forward"
    forward_mix: Fraction = 0.0
    seed: Int = 0
    eval_every: NonNegInt = 250
    log_every: PosInt = 25
    save_every: NonNegInt = 500
    checkpoint_dir: str | None = None
    stop_at: StopAt | None = None
    threads: PosInt | None = None


class EvaluationConfig(SamplingConfig):  # type: ignore[misc, valid-type]  # a pydantic create_model class
    """The sampler of every evaluation (the run config's sampling section, the main job's fast defaults),
    `n_problems` validation problems per in-training evaluation and `n_test` test problems at the end
    (the first problems of the generated test split: those `llada-trm compare` reports on)."""

    n_problems: PosInt = 100
    n_test: PosInt = 768
    batch_size: PosInt = 64
    gen_length: PosInt = 64
    block_length: PosInt = 32
    steps: PosInt = 64
    threshold: float | None = 0.9
    cache: str | None = "prefix"

    def options(self) -> SamplingOptions:
        fields = self.model_dump(exclude={"n_problems", "n_test"})
        return SamplingOptions(**fields)


class PretrainOutputConfig(Section):
    dir: str = "runs/tiny_backbone"
    dtype: str = Field(default="bfloat16", pattern="^(float32|bfloat16)$")


@command_schema("pretrain")
class PretrainConfig(Section):
    """`llada-trm pretrain` config; sections mirror the run config's."""

    model: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    data: TaskConfig = Field(default_factory=TaskConfig)
    training: OptimConfig = Field(default_factory=OptimConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: PretrainOutputConfig = Field(default_factory=PretrainOutputConfig)

    def run_dir(self) -> Path:
        """Where the unfinished run lives: the one loop's run directory (checkpoints, metrics CSVs)."""
        if self.training.checkpoint_dir:
            return Path(self.training.checkpoint_dir)
        out = Path(self.output.dir)
        return out.with_name(out.name + ".partial")

    def plain(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def run_config(self, backbone_dir: Path) -> RunConfig:
        """The run of the one loop that trains this backbone (read from `backbone_dir`): no refiner, every
        backbone tensor trained at `training.lr` (in float32: the backbone trains), checkpoints and metrics
        CSVs in `run_dir()`. The schedule's floor and the logging interval are not run settings: `pretrain`
        applies them around the loop (`run_constants`)."""
        opt = self.training
        return RunConfig.model_validate({
            "model": {"backbone": str(backbone_dir), "refiner": "none"},
            "data": {"max_length": self.data.max_length},  # the datasets themselves: `RunParts.datasets`
            "training": {
                "phase": 3, "lr": opt.lr, "batch_size": opt.batch_size,
                "max_steps": opt.steps, "warmup_steps": opt.warmup_steps,
                "seed": opt.seed, "eval_every": opt.eval_every,
                "save_every": opt.save_every, "masks": opt.masks, "mixed_precision": "fp32",
            },
            "training_params": {"trainable_modules": ["backbone"]},
            "output": {"dir": str(self.run_dir())},  # max_steps ends the run, epoch after epoch
        })  # fmt: skip

    def run_constants(self) -> dict[str, Any]:
        """The run's class constants pretraining sets (`config.fixed_settings`): the cosine's floor (a run
        decays to 0, pretraining to `min_lr_ratio` x lr) and the training rows' interval."""
        opt = self.training
        return {"training.min_lr_ratio": opt.min_lr_ratio, "training.log_every": opt.log_every}


def load_pretrain_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> PretrainConfig:
    """Read and validate a pretrain YAML (None = the defaults), with `--set a.b=c` overrides."""
    return load_schema(PretrainConfig, path, overrides or [])
