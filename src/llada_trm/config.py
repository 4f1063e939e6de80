"""The schema of a training run: YAML in, a validated `RunConfig` out (docs/settings.md).

The model-side types are embedded, not copied (`model:` is a `HybridConfig`, `data.synthetic:` the
generator's config), so each field is declared and validated once, where the code reads it. A retired
setting is a class constant (`ClassVar`) of its section: code still reads `config.training.adam_eps`, but no
file or `--set` can change it, and a file that names one is told to run `llada-trm convert`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, get_type_hints

from pydantic import BaseModel, BeforeValidator, Field, PrivateAttr, create_model, model_validator

from llada_trm.data.arithmetic import ArithmeticTaskConfig
from llada_trm.data.synthetic import (
    DEFAULT_CONTAINERS,
    DEFAULT_GROUPS,
    DEFAULT_ITEMS,
    DEFAULT_NAMES,
    DEFAULT_PURCHASES,
    OPERATIONS,
    SyntheticTaskConfig,
)
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.errors import ConfigError
from llada_trm.io import write_text_atomic
from llada_trm.model.hybrid_config import RETIRED_MODEL_SETTINGS, HybridConfig
from llada_trm.model.lora import LORA_TARGETS
from llada_trm.schema import (
    Int,
    NonNegFloat,
    NonNegInt,
    PosInt,
    SchemaT,
    command_schema,
    dump_yaml,
    load_schema,
    parse_schema,
    register_retired,
    to_int,
)
from llada_trm.schema import Section as _Section

if TYPE_CHECKING:
    from llada_trm.model.llada_config import LLaDAConfig



# --------------------------------------------------------------------------------------------------- model


class ModelConfig(HybridConfig):
    """What to build: the backbone to load and the refiners (`HybridConfig` documents each field). The
    backbone's precision is derived (`build.choose_backbone_dtype`)."""

    backbone: str = Field(
        default="embedded",
        description="a local HF-layout checkpoint directory, or 'embedded' for the package's tiny backbone",
    )

    dtype: ClassVar[str] = "auto"

    def hybrid(self) -> HybridConfig:
        """The hybrid model's own config: this section less what only the run needs (backbone, dtype)."""
        return HybridConfig(**self.model_dump(include=set(HybridConfig.model_fields)))


# Old `model.*` key -> its value now: not class constants (the refiners' constants are their build configs'
# defaults); `llada-trm convert` drops one at that value and refuses another.
RETIRED_MODEL: dict[str, Any] = {f"model.{key}": value for key, value in RETIRED_MODEL_SETTINGS.items()}
# A legacy spelling `convert.RENAMED` rewrites.
register_retired(["model.halt_on_confidence"])


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
    """The generated GSM8K-style task, fixed at the one the embedded backbone was pretrained on; a study that
    varies a task's difficulty uses `data.arithmetic`."""

    min_steps: ClassVar[int] = 1
    max_steps: ClassVar[int] = 2
    max_number: ClassVar[int] = 12
    max_result: ClassVar[int] = 100
    operations: ClassVar[tuple[str, ...]] = OPERATIONS
    test_fraction: ClassVar[float] = 0.1
    names: ClassVar[tuple[str, ...]] = DEFAULT_NAMES
    items: ClassVar[tuple[str, ...]] = DEFAULT_ITEMS
    containers: ClassVar[tuple[str, ...]] = DEFAULT_CONTAINERS
    groups: ClassVar[tuple[tuple[str, ...], ...]] = DEFAULT_GROUPS
    purchases: ClassVar[tuple[str, ...]] = DEFAULT_PURCHASES
    seed: ClassVar[int] = 0


class ArithmeticDataConfig(ArithmeticTaskConfig):
    """The generated arithmetic task (`llada_trm.data.arithmetic`)."""

    min_carries: ClassVar[int] = 0
    seed: ClassVar[int] = 0
    max_carries: ClassVar[int | None] = None
    test_fraction: ClassVar[float] = 0.1


class DataConfig(_Section):
    """Which problems to train and validate on: of a generated task, the first `n_train` / `n_eval` of its
    train and validation splits; of GSM8K, the first `n_train` of its train split and the last `n_eval` of it
    (validation never reads test)."""

    dataset: Literal["gsm8k", "synthetic", "arithmetic"] = "synthetic"
    path: str | None = Field(
        default=None, description="GSM8K: a JSONL/parquet file or directory, or a Hugging Face dataset name"
    )
    n_train: Annotated[ProblemCount, Field(ge=1)] = 2000
    n_eval: ProblemCount = 100
    max_length: PosInt = Field(default=256, description="at most the backbone's max_sequence_length")
    # apart from training.seed: runs with different seeds are validated on the same noised examples
    validation_seed: ClassVar[int] = 0
    num_workers: ClassVar[int] = 0
    pin_memory: ClassVar[bool] = False
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)
    arithmetic: ArithmeticDataConfig = Field(default_factory=ArithmeticDataConfig)

    def generated(self) -> SyntheticDataConfig | ArithmeticDataConfig | None:
        """The selected generated task's section (None for gsm8k)."""
        return {"synthetic": self.synthetic, "arithmetic": self.arithmetic}.get(self.dataset)

    @property
    def train_split(self) -> str:
        """GSM8K's training slice (derived from n_train): the first n_train problems of train."""
        return f"train[:{self.n_train}]"

    @property
    def eval_split(self) -> str | None:
        """GSM8K's validation slice (derived from n_eval): the last n_eval problems of train; None if 0."""
        return f"train[-{self.n_eval}:]" if self.n_eval else None

    @model_validator(mode="after")
    def _gsm8k_needs_path(self) -> DataConfig:
        if self.dataset == "gsm8k" and not self.path:
            raise ValueError("dataset 'gsm8k' needs data.path (a JSONL/parquet file, directory or HF name)")
        return self


# ------------------------------------------------------------------------------------------------ training


DEFAULT_DEVICE, DEFAULT_LOG_EVERY = "auto", 10  # `--device`, `--log-every` unless given (`FLAGS`)


class TrainingConfig(_Section):
    """Optimisation: phase, learning rates, batch geometry, schedule and bookkeeping intervals."""

    phase: Literal[1, 2, 3] = 1
    lr: NonNegFloat = 5e-4
    backbone_lr: NonNegFloat = 1e-5
    unfreeze_last_n_layers: NonNegInt = 2
    batch_size: BatchSize = 4
    gradient_accumulation_steps: BatchSize = 1
    max_steps: PosInt | None = Field(
        default=None, description="optimizer steps, epoch after epoch over the data; null: one epoch"
    )
    warmup_steps: NonNegInt | None = Field(default=None, description="null: 5% of the run's steps")
    seed: Int = 42
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    eval_every: NonNegInt = 100
    save_every: NonNegInt = 500
    init_from: str | None = Field(
        default=None, description="a run or checkpoint whose saved weights start this run (not --resume)"
    )
    val_sampled_problems: NonNegInt = Field(
        default=0,
        description="validation problems answered with the run's `sampling` settings at every validation "
        "(the sampled_accuracy column, which output.save_best may name); 0 = off",
    )
    masks: Literal["forward", "answer_structure", "backbone_errors"] = Field(
        default="forward",
        description="phase 1's training masks (diffusion.forward_process): LLaDA's forward process, the "
        "results of an answer's calculator lines and its #### line with the rest masked as a block sampler "
        "leaves it, or the positions the frozen backbone gets wrong in a teacher-forced probe",
    )

    warmup_ratio: ClassVar[float] = 0.05
    min_lr_ratio: ClassVar[float] = 0.0
    weight_decay: ClassVar[float] = 0.01
    adam_eps: ClassVar[float] = 1e-8
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    max_grad_norm: ClassVar[float] = 1.0
    forward_mix: ClassVar[float] = 0.0

    # flags of the command, not settings (`FLAGS`)
    device: ClassVar[str] = DEFAULT_DEVICE
    log_every: ClassVar[int] = DEFAULT_LOG_EVERY


class TrainingParamsConfig(_Section):
    """What is trained (`trainable_modules`, whole: layer norms and refiner blocks included)."""

    trainable_modules: list[str] = Field(default_factory=lambda: ["refinement_head"])

    deep_supervision_weight: ClassVar[float] = 0.3
    orthogonality_weight: ClassVar[float] = 0.01
    halting_weight: ClassVar[float] = 1.0


# ------------------------------------------------------------------------------------------------ advanced


class AdvancedConfig(_Section):
    """Speed/memory switches."""

    feature_cache: bool = False  # phase 1 on the stored backbone outputs (docs/feature_cache.md)

    gradient_checkpointing: ClassVar[bool] = False
    cache_noise_draws: ClassVar[int] = 1
    health_checks: ClassVar[bool] = True
    distributed: ClassVar[str] = "auto"


# -------------------------------------------------------------------------------------------------- output


class OutputConfig(_Section):
    """Where the run writes metrics, checkpoints and its resolved config."""

    dir: str = "runs/run"
    save_best: str = Field(
        default="loss", description="the validation_metrics.csv column that picks checkpoints/best"
    )

    keep_last: ClassVar[int] = 0
    tensorboard: ClassVar[bool] = False

    @property
    def best_is_lower(self) -> bool:
        """Derived from the column: losses are minimised, everything else (accuracies) maximised."""
        return "loss" in self.save_best


# ------------------------------------------------------------------------------------------------ sampling


class _SamplingSection(_Section):
    """LLaDA's sampler settings of a run (`diffusion.options.SamplingOptions`), read by the sampled
    validation and `compare`; it samples in the training batch (derived, set by `RunConfig`)."""

    _batch_size: int = PrivateAttr(default=16)

    remasking: ClassVar[str] = "low_confidence"
    temperature: ClassVar[float] = 0.0
    cfg_scale: ClassVar[float] = 0.0
    seed: ClassVar[int] = 0
    logits_eos_inf: ClassVar[bool] = False
    confidence_eos_eot_inf: ClassVar[bool] = False

    @model_validator(mode="after")
    def _valid_options(self) -> _SamplingSection:
        self.options()  # SamplingOptions checks the combination (blocks divide gen_length, ...)
        return self

    def options(self) -> SamplingOptions:
        """The validated options object the sampler takes."""
        return SamplingOptions(**self.model_dump(), batch_size=self._batch_size)


# SamplingOptions' settings a run does not set (`llada-trm generate` still takes them as flags)
SAMPLING_FIXED = (
    "remasking", "cfg_scale", "seed", "logits_eos_inf", "confidence_eos_eot_inf", "temperature", "batch_size"
)


def _sampling_fields() -> dict[str, Any]:
    """SamplingOptions' recorded fields as pydantic fields: declared once, in the options dataclass."""
    hints = get_type_hints(SamplingOptions)
    return {
        f.name: (hints[f.name], f.default)
        for f in dataclasses.fields(SamplingOptions)
        if f.metadata.get("recorded", True) and f.name not in SAMPLING_FIXED
    }


SamplingConfig = create_model("SamplingConfig", __base__=_SamplingSection, **_sampling_fields())


# -------------------------------------------------------------------------------------------------- lora


class RunLoraConfig(_Section):
    """The run's `lora:` section (`model.lora.attach_run_lora`): `rank` > 0 trains adapters of that rank on
    the backbone in phases 2 and 3; 0 trains none."""

    rank: Annotated[int, BeforeValidator(to_int), Field(ge=0, le=4096)] = 0

    alpha: ClassVar[float] = 16.0
    dropout: ClassVar[float] = 0.0
    target_modules: ClassVar[tuple[str, ...]] = LORA_TARGETS

    @property
    def enabled(self) -> bool:
        """Derived: adapters train when `rank` > 0 (was the setting `lora.enabled`)."""
        return self.rank > 0


# ------------------------------------------------------------------------------------------------ the run


@command_schema("train")
class RunConfig(_Section):
    """A whole run. `RunConfig()` is a valid CPU run on the embedded backbone and the generated task."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    training_params: TrainingParamsConfig = Field(default_factory=TrainingParamsConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    lora: RunLoraConfig = Field(default_factory=RunLoraConfig)

    @model_validator(mode="after")
    def _lora_fits_the_run(self) -> RunConfig:
        self.sampling._batch_size = self.training.batch_size  # derived: sampled as it is trained
        if not self.lora.enabled:
            return self
        if self.training.phase == 1:
            raise ValueError(
                "lora.rank: LoRA adapters train the backbone in phases 2 and 3; set training.phase to 2 "
                "or 3, or lora.rank to 0 (phase 1 trains the refiner alone)"
            )
        return self

    def to_yaml(self) -> str:
        """Every setting, resolved; lists of plain values on one line (the task's word lists stay short)."""
        return dump_yaml(self.model_dump(mode="python"))


# ---------------------------------------------------------------------------------------- settings count

# Old settings now derived: old key -> its value now
RETIRED_DERIVED: dict[str, Any] = {
    "output.best_mode": "auto",  # derived from output.save_best: losses minimised, the rest maximised
}
# The health checks' thresholds (old `advanced.health.<name>`) are named constants of `training.health`.
RETIRED_SECTIONS = ("advanced.health",)

# Levers whose code left the tree (docs/levers.md): old key -> the value that meant "off"
REMOVED_LEVERS: dict[str, Any] = {
    "training.sampler_state_ratio": 0.0,
    "advanced.sampler_states_dir": None,
    "advanced.sampler_states_per_problem": 4,
    "advanced.sampler_states_problems": None,
    "advanced.sampler_states_seed": 0,
    "training_params.denoising_unroll_steps": 1,
    "training_params.denoising_unroll_fraction": 0.5,
    "training_params.confidence_calibration_weight": 0.0,
    "training_params.train_layer_norms": True,
    "training_params.train_refiner_blocks": True,
    "advanced.compile": False,
    "advanced.compile_refiner": False,
    "advanced.detect_anomaly": False,
    "advanced.feature_cache_dir": None,  # the cache lives in <output.dir>/feature_cache
    "advanced.cache_dtype": "bfloat16",  # training.feature_cache.CACHE_DTYPE
    "training.ema_decay": 0.0,  # the weights' EMA (commit e132646 has it)
}

# Settings replaced by another setting or derived from the run: old key -> what replaces it
REPLACED: dict[str, str] = {
    "data.synthetic.n_train": "data.n_train",
    "data.synthetic.n_eval": "data.n_eval",
    "data.arithmetic.n_train": "data.n_train",
    "data.arithmetic.n_eval": "data.n_eval",
    "data.train_split": "data.n_train (GSM8K: the first n_train problems of train)",
    "data.eval_split": "data.n_eval (GSM8K: the last n_eval problems of train)",
    "training.num_epochs": "training.max_steps (null: one epoch)",
    "training.eval_max_batches": "data.n_eval (validation reads every validation problem)",
    "sampling.batch_size": "training.batch_size (the run samples in its training batch)",
    "lora.enabled": "lora.rank (0: no adapters)",
    "model.slot.delta_scale": "model.delta_scale (one update scale for both refiners)",
    "model.mlp.delta_scale": "model.delta_scale (one update scale for both refiners)",
}

# Settings that became flags of the command: old key -> (the flag, its default). Each is a class constant
# the command sets for its own duration (`fixed_settings`); a run's config.yaml does not record them.
FLAGS: dict[str, tuple[str, Any]] = {
    "training.device": ("--device", DEFAULT_DEVICE),
    "training.log_every": ("--log-every", DEFAULT_LOG_EVERY),
    "output.tensorboard": ("--tensorboard", False),
}


def _sections(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, section type) of `schema` and of every section below it."""
    found = [(prefix, schema)]
    for name, field in schema.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _sections(annotation, f"{prefix}{name}.")
    return found


def settings_keys(schema: type[BaseModel] = RunConfig) -> list[str]:
    """The dotted keys a researcher can set: the leaf fields of `schema` (a section is not a setting)."""
    return [
        f"{path}{name}"
        for path, section in _sections(schema)
        for name, field in section.model_fields.items()
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    ]


def settings_count(schema: type[BaseModel] = RunConfig) -> int:
    """How many settings `schema` has (its leaf fields): the number the redesign keeps at about 50."""
    return len(settings_keys(schema))


def retired_settings() -> dict[str, Any]:
    """Old dotted key -> the value it is fixed at now: the class constants of RunConfig's sections,
    `RETIRED_DERIVED` and `RETIRED_MODEL`."""
    fixed = {
        f"{path}{name}": getattr(section, name)
        for path, section in _sections(RunConfig)
        for name in sorted(getattr(section, "__class_vars__", ()))
        if not name.startswith("_") and not name.isupper()
    }
    return {**fixed, **RETIRED_DERIVED, **RETIRED_MODEL}


@contextmanager
def fixed_settings(values: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, retired settings take other values (`{"output.keep_last": 2}`): the hook by
    which a test or an experiment reaches a retired lever's code, and a command applies its flags (`FLAGS`).
    Process-wide (class constants), restored on exit."""
    retired = retired_settings()
    owners = {path: section for path, section in _sections(RunConfig)}
    changed: list[tuple[type[BaseModel], str, Any]] = []
    try:
        for key, value in values.items():
            path, _, name = key.rpartition(".")
            section = owners.get(f"{path}." if path else "")
            if key not in retired or section is None or key in RETIRED_DERIVED or key in RETIRED_MODEL:
                raise ConfigError(f"fixed_settings: {key!r} is not a retired setting; set it in the config")
            changed.append((section, name, getattr(section, name)))
            setattr(section, name, value)
        yield
    finally:
        for section, name, value in reversed(changed):
            setattr(section, name, value)


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


# An old file that sets one of them fails with one line naming the converter (`schema.describe`).
register_retired([*retired_settings(), *RETIRED_SECTIONS])
register_retired(REMOVED_LEVERS, "a lever removed with its code (docs/levers.md)")
for _old, _new in REPLACED.items():
    register_retired([_old], f"replaced by {_new} (docs/settings.md)")
for _old, (_flag, _) in FLAGS.items():
    register_retired([_old], f"a flag of the command now, not a setting: {_flag} (docs/settings.md)")
