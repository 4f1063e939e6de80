"""The schema of a training run: YAML in, a validated `RunConfig` out.

Every section forbids unknown keys, so a typo such as `training.learnig_rate` is an error (with a suggestion)
instead of a silently ignored setting. Errors are one line that names the file and the key's dotted path.

The model-side types are embedded, not copied: `model:` is a `HybridConfig` (plus the backbone and its
dtype) whose `slot:` / `mlp:` are the refiners' `SlotSettings` / `MLPSettings`, and `data.synthetic:` is the
generator's `SyntheticTaskConfig` (plus the split sizes). Each field is declared and validated once, where
the model reads it. Numbers follow `llada_trm.schema` (`lr: 5e-4` is a float, although YAML 1.1 disagrees).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from pydantic import BeforeValidator, Field, create_model, model_validator

from llada_trm.backbone.lora import LoraConfig
from llada_trm.config_files import (
    SchemaT,
    apply_overrides,
    dump_yaml,
    load_schema,
    parse_override,
    parse_schema,
)
from llada_trm.data.arithmetic import ArithmeticTaskConfig
from llada_trm.data.synthetic import SyntheticTaskConfig
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.errors import ConfigError
from llada_trm.hybrid.config import HybridConfig
from llada_trm.io import write_text_atomic
from llada_trm.refiners.config import MLPSettings, SlotSettings
from llada_trm.schema import (
    Float,
    Fraction,
    Int,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    to_float,
    to_int,
)
from llada_trm.schema import Section as _Section

if TYPE_CHECKING:
    from llada_trm.backbone.config import LLaDAConfig

__all__ = [
    "AdvancedConfig",
    "ArithmeticDataConfig",
    "DataConfig",
    "HealthThresholds",
    "LoraConfig",
    "MLPSettings",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "SamplingConfig",
    "SlotSettings",
    "SyntheticDataConfig",
    "TrainingConfig",
    "TrainingParamsConfig",
    "apply_overrides",
    "check_backbone_fit",
    "load_config",
    "load_schema",
    "parse_config",
    "parse_override",
    "save_config",
]

# The shared number types (llada_trm.schema), also importable from here by the other commands' schemas.
__all__ += ["Float", "Fraction", "Int", "NonNegFloat", "NonNegInt", "PosFloat", "PosInt"]
_to_float, _to_int = to_float, to_int


# --------------------------------------------------------------------------------------------------- model


class ModelConfig(HybridConfig):
    """What to build: the backbone to load, its precision, and the refiners (`HybridConfig`'s fields).

    `confidence_threshold`: chunks whose backbone confidence (mean max-probability over their masked
    positions) is below it are refined; above 1 refines every chunk. `context_layers`: backbone layers whose
    attention contexts feed the slot refiner ([] = only the refiner's own blocks). `cascade_mlp_steps`: in a
    cascade, the MLP's share of the K steps (null = K // 2). `HybridConfig` documents every field.
    """

    backbone: str = Field(
        default="embedded",
        description="a local HF-layout checkpoint directory, or 'embedded' for the package's tiny backbone",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def hybrid(self) -> HybridConfig:
        """The hybrid model's own config: this section less what only the run needs (backbone, dtype)."""
        return HybridConfig(**self.model_dump(include=set(HybridConfig.model_fields)))


# ---------------------------------------------------------------------------------------------------- data


# Ceilings on sizes that no machine this package targets can use; past them a typo (an extra zero or
# three) would run for hours or exhaust memory before failing. The backbone-dependent ones are checked
# against the backbone in `check_backbone_fit`.
MAX_PROBLEMS = 1_000_000
MAX_BATCH_SIZE = 4096


ProblemCount = Annotated[int, BeforeValidator(to_int), Field(ge=0, le=MAX_PROBLEMS)]
BatchSize = Annotated[int, BeforeValidator(to_int), Field(ge=1, le=MAX_BATCH_SIZE)]
Draws = Annotated[int, BeforeValidator(to_int), Field(ge=1, le=1024)]  # cached copies of every example


class SyntheticDataConfig(SyntheticTaskConfig):
    """The generated task (`llada_trm.data.SyntheticTaskConfig`) and how many problems each split gets
    (each at most MAX_PROBLEMS; a task too small for the count is refused when the problems are drawn)."""

    n_train: Annotated[ProblemCount, Field(ge=1)] = 2000
    n_eval: ProblemCount = 100


class ArithmeticDataConfig(ArithmeticTaskConfig):
    """The generated arithmetic task (`llada_trm.data.arithmetic`) and how many problems each split gets."""

    n_train: Annotated[ProblemCount, Field(ge=1)] = 2000
    n_eval: ProblemCount = 100


class DataConfig(_Section):
    """Which records to train on and how to batch them: GSM8K, the generated GSM8K-style task (`synthetic`)
    or the generated arithmetic task (`arithmetic`), each generated one with its own section."""

    dataset: Literal["gsm8k", "synthetic", "arithmetic"] = "synthetic"
    path: str | None = Field(
        default=None, description="GSM8K: a JSONL/parquet file or directory, or a Hugging Face dataset name"
    )
    train_split: str = "train[:1000]"
    eval_split: str | None = "test[:100]"
    max_length: PosInt = Field(default=256, description="at most the backbone's max_sequence_length")
    validation_seed: Int = Field(
        default=0,
        description="seed of the validation masks, fixed apart from training.seed so that runs with "
        "different training seeds are validated on the same noised examples",
    )
    num_workers: NonNegInt = 0
    pin_memory: bool = False
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)
    arithmetic: ArithmeticDataConfig = Field(default_factory=ArithmeticDataConfig)

    def generated(self) -> SyntheticDataConfig | ArithmeticDataConfig | None:
        """The selected generated task's section (None for gsm8k)."""
        return {"synthetic": self.synthetic, "arithmetic": self.arithmetic}.get(self.dataset)

    @model_validator(mode="after")
    def _gsm8k_needs_path(self) -> DataConfig:
        if self.dataset == "gsm8k" and not self.path:
            raise ValueError("dataset 'gsm8k' needs data.path (a JSONL/parquet file, directory or HF name)")
        return self


# ------------------------------------------------------------------------------------------------ training


class TrainingConfig(_Section):
    """Optimisation: phase, learning rates, batch geometry, schedule and bookkeeping intervals.

    init_from: a run directory or checkpoint directory whose saved weights (the refiner's, and the backbone's
        when that run trained some) initialise this run before training, e.g. phase 2/3 from phase 1. Unlike
        `--resume` it restores no optimizer, schedule or step.
    """

    phase: Literal[1, 2, 3] = 1
    lr: NonNegFloat = 5e-4
    backbone_lr: NonNegFloat = 1e-5
    unfreeze_last_n_layers: NonNegInt = 2
    batch_size: BatchSize = 4
    gradient_accumulation_steps: BatchSize = 1
    num_epochs: PosInt = 1
    max_steps: PosInt | None = None
    warmup_steps: NonNegInt | None = None
    warmup_ratio: Fraction = 0.05
    min_lr_ratio: Fraction = 0.0
    weight_decay: NonNegFloat = 0.01
    adam_eps: PosFloat = 1e-8
    adam_betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    max_grad_norm: NonNegFloat = 1.0
    seed: Int = 42
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    eval_every: NonNegInt = 100
    eval_max_batches: PosInt | None = None
    log_every: PosInt = 10
    save_every: NonNegInt = 500
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_from: str | None = None
    val_sampled_problems: NonNegInt = Field(
        default=0,
        description="validation problems answered with the run's `sampling` settings at every validation "
        "(the sampled_accuracy column, which output.save_best may name); 0 = off",
    )
    masks: Literal["forward", "answer_structure", "backbone_errors"] = Field(
        default="forward",
        description="phase 1's training masks (diffusion.targeted_masks): LLaDA's forward process, the "
        "results of an answer's calculator lines and its #### line with the rest masked as a block sampler "
        "leaves it, or the positions the frozen backbone gets wrong in a teacher-forced probe",
    )
    forward_mix: Fraction = Field(
        default=0.0, description="fraction of rows drawn from the forward process instead of `masks`"
    )
    ema_decay: Fraction = Field(
        default=0.0,
        description="exponential moving average of the trained weights (TRM: 0.999), which checkpoints "
        "hold for evaluation; the live weights stay in the trainer state for resuming. 0 = off",
    )
    sampler_state_ratio: Fraction = Field(
        default=0.0,
        description="fraction of each epoch's micro-batches trained on the frozen backbone's own sampler "
        "states (docs/sampler_states.md) instead of forward-process draws; 0 = off",
    )


class TrainingParamsConfig(_Section):
    """What is trained and the weights of the objective's terms.

    denoising_unroll_steps: TRM's N_sup over denoising steps (`training.objective`): the objective is averaged
        over this many consecutive states of a simulated trajectory, each committing the model's most
        confident `denoising_unroll_fraction` of the masked positions to their targets (with
        `model.denoising_carry`, the refiner's latents carried from step to step). 1: off, one state.
    """

    trainable_modules: list[str] = Field(default_factory=lambda: ["refinement_head"])
    train_layer_norms: bool = True
    train_refiner_blocks: bool = True
    deep_supervision_weight: NonNegFloat = 0.3
    orthogonality_weight: NonNegFloat = 0.01
    confidence_calibration_weight: NonNegFloat = 0.0
    denoising_unroll_steps: PosInt = 1
    denoising_unroll_fraction: Fraction = 0.5

    halting_weight: NonNegFloat = Field(
        default=1.0,
        description="weight of the learned halting head's BCE loss (with model.halting: learned; the head's "
        "gradient is its own, so the weight only scales it against gradient clipping); 0 = the head stays "
        "untrained and halts nothing",
    )


# ------------------------------------------------------------------------------------------------ advanced


class HealthThresholds(_Section):
    """When the automatic health checks speak up (docs/troubleshooting.md explains each one).

    window: consecutive logged rows a condition must hold (and the loss window).
    slot_collapse_spread / slot_collapse_overlap / slot_collapse_gate_band: slots count as collapsed when
        their norms differ by less than `spread` (relative) or their projections overlap by at least
        `overlap`, while every gate stays within `gate_band` of 0.5.
    dead_gate: a gate opening below this is dead.
    delta_norm_max: an update norm above this (or NaN) is an explosion; delta_growth: last recursion step's
        update norm over the first step's above this is a diverging recursion.
    loss_rel_std: detrended std of the logged loss over its mean, above which the loss oscillates.
    context_ratio: the context slot's gate or norm below this fraction of the other slots' is unused.
    idle_skipped: a skipped-chunk fraction at or above this means the refiner is almost never trained.
    """

    window: PosInt = 20
    slot_collapse_spread: NonNegFloat = 0.05
    slot_collapse_overlap: Fraction = 0.5
    slot_collapse_gate_band: NonNegFloat = 0.05
    dead_gate: Fraction = 0.05
    delta_norm_max: NonNegFloat = 100.0
    delta_growth: Annotated[float, BeforeValidator(to_float), Field(gt=1.0)] = 10.0
    loss_rel_std: NonNegFloat = 0.5
    context_ratio: NonNegFloat = 0.05
    idle_skipped: Fraction = 0.95


class AdvancedConfig(_Section):
    """Speed/memory switches and the health checks.

    feature_cache: phase 1 trains on the frozen backbone's outputs computed once and stored
        (docs/feature_cache.md); `feature_cache_dir` (null = <output.dir>/feature_cache) holds them,
        `cache_noise_draws` noise draws per example (epoch e trains on draw e % draws), hidden states and
        contexts stored as `cache_dtype`.
    sampler_states_dir / sampler_states_per_problem: where the sampler states of
        `training.sampler_state_ratio` live (null = <output.dir>/sampler_states) and how many states of
        each training problem's sampler run they keep; `sampler_states_problems` samples only the first N
        training problems (null = all): a run of S steps reads about S * batch_size * ratio states.
        `sampler_states_seed` picks the kept steps; it is not `training.seed`, so every seed and arm of a
        study with the same sampler, data and store directory shares one store (paid for once).
    compile_refiner: `torch.compile` around each refiner's step (`refiners.compiling`), in training (the
        cached phase-1 step included) and in sampled validation; off by default: on a CPU the first call
        compiles for a minute or more, which a short run never earns back (bench/bench_compile.py). Where
        torch.compile cannot run it warns and stays eager; results match eager to rounding.
    distributed: under torchrun, how the processes share the work (docs/distributed.md): `ddp` replicates
        the model and averages the trainable parameters' gradients, `fsdp` shards a trainable backbone
        block by block; `auto` is ddp in phases 1 and 2, fsdp in phase 3. One process ignores it.
    """

    gradient_checkpointing: bool = False
    compile: bool = False
    compile_refiner: bool = False
    feature_cache: bool = False
    feature_cache_dir: str | None = None
    cache_noise_draws: Draws = 1
    cache_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    sampler_states_dir: str | None = None
    sampler_states_per_problem: Draws = 4
    sampler_states_problems: ProblemCount | None = None
    sampler_states_seed: Int = 0
    detect_anomaly: bool = False
    health_checks: bool = True
    health: HealthThresholds = Field(default_factory=HealthThresholds)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"

    @model_validator(mode="after")
    def _cache_needs_replicas(self) -> AdvancedConfig:
        if self.feature_cache and self.distributed == "fsdp":
            raise ValueError("feature_cache needs a replicated backbone; set distributed to ddp or auto")
        return self


# -------------------------------------------------------------------------------------------------- output


class OutputConfig(_Section):
    """Where the run writes metrics, checkpoints and its resolved config.

    save_best: the validation_metrics.csv column that picks checkpoints/best: the validation `loss` (the
    default), a masked accuracy, or `sampled_accuracy` (strict accuracy of sampled answers, which is what a
    comparison reports; needs training.val_sampled_problems > 0).
    tensorboard: also write the CSVs' rows as TensorBoard scalars into <dir>/tensorboard/ (needs
    `pip install 'llada-trm[tensorboard]'`); the CSVs stay the run's record.
    """

    dir: str = "runs/run"
    save_best: str = Field(default="loss", description="a validation_metrics.csv column")
    best_mode: Literal["auto", "min", "max"] = "auto"
    keep_last: NonNegInt = 0
    tensorboard: bool = False

    @property
    def best_is_lower(self) -> bool:
        """'auto' minimises losses and maximises everything else (accuracies)."""
        if self.best_mode == "auto":
            return "loss" in self.save_best
        return self.best_mode == "min"


# ------------------------------------------------------------------------------------------------ sampling


class _SamplingSection(_Section):
    """LLaDA's sampler settings of a run (`diffusion.options.SamplingOptions`, less the tokenizer's ids).

    One place for them: the trainer's sampled-accuracy validation and `compare` read this section, and a
    run's saved config.yaml records it.
    """

    @model_validator(mode="after")
    def _valid_options(self) -> _SamplingSection:
        self.options()  # SamplingOptions checks the combination (blocks divide gen_length, ...)
        return self

    def options(self) -> SamplingOptions:
        """The validated options object the sampler takes."""
        return SamplingOptions(**self.model_dump())


def _sampling_fields() -> dict[str, Any]:
    """SamplingOptions' recorded fields as pydantic fields: declared once, in the options dataclass."""
    hints = get_type_hints(SamplingOptions)
    return {
        f.name: (hints[f.name], f.default)
        for f in dataclasses.fields(SamplingOptions)
        if f.metadata.get("recorded", True)
    }


SamplingConfig = create_model("SamplingConfig", __base__=_SamplingSection, **_sampling_fields())


# ------------------------------------------------------------------------------------------------ the run


class RunConfig(_Section):
    """A whole run. `RunConfig()` is a valid CPU run on the embedded backbone and the generated task."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    training_params: TrainingParamsConfig = Field(default_factory=TrainingParamsConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _lora_fits_the_run(self) -> RunConfig:
        if not self.lora.enabled:
            return self
        if self.training.phase == 1:
            raise ValueError(
                "lora.enabled: LoRA adapters train the backbone in phases 2 and 3; set training.phase to 2 "
                "or 3, or lora.enabled to false (phase 1 trains the refiner alone)"
            )
        if self.advanced.distributed == "fsdp":
            raise ValueError(
                "lora.enabled: the frozen base is replicated, not sharded; set advanced.distributed to ddp "
                "or auto (docs/distributed.md: LoRA on one GPU)"
            )
        return self

    def to_yaml(self) -> str:
        """Every setting, resolved; lists of plain values on one line (the task's word lists stay short)."""
        return dump_yaml(self.model_dump(mode="python"))


def check_backbone_fit(config: RunConfig, backbone: LLaDAConfig, where: str) -> None:
    """The run's sizes against the backbone's positions, before any weight loads (`where` names it)."""
    limit = backbone.max_sequence_length
    if config.data.max_length > limit:
        raise ConfigError(
            f"data.max_length={config.data.max_length} exceeds the max_sequence_length={limit} of {where}; "
            f"set data.max_length to 1..{limit}"
        )
    try:
        config.model.check_backbone(backbone)
    except ConfigError as exc:
        raise ConfigError(f"model.{exc} (backbone {where})") from None


# ------------------------------------------------------------------------------------------------- loading


def parse_config(
    data: Mapping[str, Any] | None,
    source: str = "<config>",
    overrides: Sequence[str] = (),
    schema: type[SchemaT] = RunConfig,
) -> SchemaT:
    """Validate a raw dict (as read from YAML) into `schema`; errors name `source` and the dotted key."""
    return parse_schema(schema, data, source, overrides)


def load_config(path: str | Path, overrides: Sequence[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--set a.b=c` overrides, validate. Raises `ConfigError` (one line)."""
    return load_schema(RunConfig, path, overrides)


def save_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (it loads back to an equal `RunConfig`)."""
    return write_text_atomic(path, config.to_yaml())
