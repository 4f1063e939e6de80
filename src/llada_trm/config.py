"""The schema of a training run: YAML in, a validated `RunConfig` out.

Every section forbids unknown keys, so a typo such as `training.learnig_rate` is an error (with a suggestion)
instead of a silently ignored setting. Errors are one line that names the file and the key's dotted path.

Numbers: PyYAML follows YAML 1.1, where `5e-4` (no dot) is a *string*; float fields therefore accept numeric
strings, so `lr: 5e-4` means what it says.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from llada_trm.errors import ConfigError

__all__ = [
    "AdvancedConfig",
    "DataConfig",
    "HealthThresholds",
    "MLPSettings",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "SlotSettings",
    "SyntheticTaskConfig",
    "TrainingConfig",
    "TrainingParamsConfig",
    "apply_overrides",
    "load_config",
    "load_schema",
    "parse_config",
    "parse_override",
    "save_config",
]


def _to_float(value: Any) -> Any:
    """Accept YAML 1.1's string spelling of floats (`5e-4`) and reject booleans posing as numbers."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


def _to_int(value: Any) -> Any:
    """Accept integral numbers written as `1e3` or `1000.0`; reject booleans and fractions."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
            if not number.is_integer():
                raise ValueError(f"expected an integer, got {value!r}") from None
            return int(number)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return value


Float = Annotated[float, BeforeValidator(_to_float)]
Int = Annotated[int, BeforeValidator(_to_int)]
PosInt = Annotated[int, BeforeValidator(_to_int), Field(ge=1)]
NonNegInt = Annotated[int, BeforeValidator(_to_int), Field(ge=0)]
NonNegFloat = Annotated[float, BeforeValidator(_to_float), Field(ge=0.0)]
Fraction = Annotated[float, BeforeValidator(_to_float), Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------------- model


class SlotSettings(_Section):
    """The slot refiner (TRM-style recursion over context / reasoning / refinement / confidence slots).

    Widths left null are derived from the backbone: d_inner = min(d_model, 512), then the slots take
    d_inner/2, /4, /4 and /8.
    """

    n_heads: PosInt = 8
    n_blocks: NonNegInt = 2
    mlp_ratio: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] = 4.0
    delta_scale: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] = 0.1
    delta_clamp: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] = 0.5
    use_gates: bool = True
    dropout: Annotated[float, BeforeValidator(_to_float), Field(ge=0.0, lt=1.0)] = 0.0
    d_inner: PosInt | None = None
    d_ctx: PosInt | None = None
    d_reason: PosInt | None = None
    d_refine: PosInt | None = None
    d_conf: PosInt | None = None


class MLPSettings(_Section):
    """The baseline refiner: a residual MLP applied K times.

    Width: `hidden_dim`, or `hidden_mult` x d_model; both null = min(2 * d_model, 1024).
    """

    hidden_dim: PosInt | None = None
    hidden_mult: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] | None = None
    delta_scale: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] = 0.1
    delta_clamp: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] = 0.5
    dropout: Annotated[float, BeforeValidator(_to_float), Field(ge=0.0, lt=1.0)] = 0.0


class ModelConfig(_Section):
    """What to build: the backbone to load and the refiner placed before its LM head.

    `confidence_threshold`: chunks whose backbone confidence (mean max-probability over their masked
    positions) is below it are refined; above 1 refines every chunk. `context_layers`: backbone layers whose
    attention contexts feed the slot refiner ([] = only the refiner's own blocks). `cascade_mlp_steps`: in a
    cascade, the MLP's share of the K steps (null = K // 2).
    """

    backbone: str = Field(
        default="embedded",
        description="a local HF-layout checkpoint directory, or 'embedded' for the package's tiny backbone",
    )
    refiner: Literal["none", "mlp", "slot"] = "slot"
    integration: Literal["replace", "hybrid", "cascade"] = "replace"
    active_refiner: Literal["mlp", "slot"] = "slot"
    max_recursive_steps: NonNegInt = 4
    cascade_mlp_steps: NonNegInt | None = None
    chunk_size: PosInt = 16
    confidence_threshold: NonNegFloat = 0.5
    halt_on_confidence: bool = True
    context_layers: list[Int] = Field(default_factory=lambda: [-1])
    slot: SlotSettings = Field(default_factory=SlotSettings)
    mlp: MLPSettings = Field(default_factory=MLPSettings)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.refiner == "none" and self.integration != "replace":
            raise ValueError(f"refiner 'none' builds no refiner; integration {self.integration!r} needs both")
        if self.mlp.hidden_dim is not None and self.mlp.hidden_mult is not None:
            raise ValueError("mlp sets both hidden_dim and hidden_mult; keep one")
        if self.cascade_mlp_steps is not None and self.cascade_mlp_steps > self.max_recursive_steps:
            raise ValueError(
                f"cascade_mlp_steps ({self.cascade_mlp_steps}) exceeds max_recursive_steps "
                f"({self.max_recursive_steps})"
            )
        if len(set(self.context_layers)) != len(self.context_layers):
            raise ValueError(f"context_layers lists a layer twice: {self.context_layers}")
        return self


# ---------------------------------------------------------------------------------------------------- data


class SyntheticTaskConfig(_Section):
    """The generated GSM8K-style word problems (answers in GSM8K's `<<a*b=c>>` / `#### n` format)."""

    n_train: PosInt = 2000
    n_eval: NonNegInt = 100
    min_steps: PosInt = 1
    max_steps: Annotated[int, BeforeValidator(_to_int), Field(ge=1, le=8)] = 4
    max_number: Annotated[int, BeforeValidator(_to_int), Field(ge=2)] = 20
    max_result: PosInt = 1000
    seed: Int = 0

    @model_validator(mode="after")
    def _steps_ordered(self) -> SyntheticTaskConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        return self


class DataConfig(_Section):
    """Which records to train on and how to batch them."""

    dataset: Literal["gsm8k", "synthetic"] = "synthetic"
    path: str | None = Field(
        default=None, description="GSM8K: a JSONL/parquet file or directory, or a Hugging Face dataset name"
    )
    train_split: str = "train[:1000]"
    eval_split: str | None = "test[:100]"
    max_length: PosInt = 256
    num_workers: NonNegInt = 0
    pin_memory: bool = False
    synthetic: SyntheticTaskConfig = Field(default_factory=SyntheticTaskConfig)

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
    batch_size: PosInt = 4
    gradient_accumulation_steps: PosInt = 1
    num_epochs: PosInt = 1
    max_steps: PosInt | None = None
    warmup_steps: NonNegInt | None = None
    warmup_ratio: Fraction = 0.05
    min_lr_ratio: Fraction = 0.0
    weight_decay: NonNegFloat = 0.01
    adam_eps: Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)] = 1e-8
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


class TrainingParamsConfig(_Section):
    """What is trained and the weights of the objective's terms."""

    trainable_modules: list[str] = Field(default_factory=lambda: ["refinement_head"])
    train_layer_norms: bool = True
    train_refiner_blocks: bool = True
    deep_supervision_weight: NonNegFloat = 0.3
    orthogonality_weight: NonNegFloat = 0.01
    confidence_calibration_weight: NonNegFloat = 0.0


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
    """

    window: PosInt = 20
    slot_collapse_spread: NonNegFloat = 0.05
    slot_collapse_overlap: Fraction = 0.5
    slot_collapse_gate_band: NonNegFloat = 0.05
    dead_gate: Fraction = 0.05
    delta_norm_max: NonNegFloat = 100.0
    delta_growth: Annotated[float, BeforeValidator(_to_float), Field(gt=1.0)] = 10.0
    loss_rel_std: NonNegFloat = 0.5
    context_ratio: NonNegFloat = 0.05


class AdvancedConfig(_Section):
    """Speed/memory switches and the health checks.

    feature_cache: phase 1 trains on the frozen backbone's outputs computed once and stored
        (docs/feature_cache.md); `feature_cache_dir` (null = <output.dir>/feature_cache) holds them,
        `cache_noise_draws` noise draws per example (epoch e trains on draw e % draws), hidden states and
        contexts stored as `cache_dtype`.
    distributed: under torchrun, how the processes share the work (docs/distributed.md): `ddp` replicates
        the model and averages the trainable parameters' gradients, `fsdp` shards a trainable backbone
        block by block; `auto` is ddp in phases 1 and 2, fsdp in phase 3. One process ignores it.
    """

    gradient_checkpointing: bool = False
    compile: bool = False
    feature_cache: bool = False
    feature_cache_dir: str | None = None
    cache_noise_draws: PosInt = 1
    cache_dtype: Literal["bfloat16", "float32"] = "bfloat16"
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
    """Where the run writes metrics, checkpoints and its resolved config."""

    dir: str = "outputs/run"
    save_best: str = Field(default="loss", description="a validation_metrics.csv column")
    best_mode: Literal["auto", "min", "max"] = "auto"
    keep_last: NonNegInt = 0

    @property
    def best_is_lower(self) -> bool:
        """'auto' minimises losses and maximises everything else (accuracies)."""
        if self.best_mode == "auto":
            return "loss" in self.save_best
        return self.best_mode == "min"


# ------------------------------------------------------------------------------------------------ the run


class RunConfig(_Section):
    """A whole run. `RunConfig()` is a valid CPU run on the embedded backbone and the generated task."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    training_params: TrainingParamsConfig = Field(default_factory=TrainingParamsConfig)
    advanced: AdvancedConfig = Field(default_factory=AdvancedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.model_dump(mode="python")), sort_keys=False)


# ----------------------------------------------------------------------------------------- loading, errors

SchemaT = TypeVar("SchemaT", bound=BaseModel)



def parse_override(text: str) -> tuple[list[str], Any]:
    """`"training.lr=3e-4"` -> (["training", "lr"], 3e-4).

    The value is read as YAML (`[1, 2]`, `true`, `null`); numeric strings are coerced by the schema.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. training.lr=3e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: {key!r} is not a dotted key (e.g. training.lr)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_first_line(str(exc))})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each `a.b=c` override into a copy of the raw config dict (validation happens afterwards)."""
    result = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                path = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {text!r}: {path} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def parse_config(
    data: Mapping[str, Any] | None,
    source: str = "<config>",
    overrides: Sequence[str] = (),
    schema: type[SchemaT] = RunConfig,
) -> SchemaT:
    """Validate a raw dict (as read from YAML) into `schema`; errors name `source` and the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {kind}")
    raw = apply_overrides(dict(data), overrides)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        override_keys = {".".join(parse_override(o)[0]) for o in overrides}
        raise ConfigError(_describe(exc, source, override_keys, schema)) from None


def load_config(path: str | Path, overrides: Sequence[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `--set a.b=c` overrides, validate. Raises `ConfigError` (one line)."""
    return load_schema(RunConfig, path, overrides)


def load_schema(
    schema: type[SchemaT], path: str | Path | None, overrides: Sequence[str] | None = None
) -> SchemaT:
    """Any sectioned config (run, pretrain, ...) from YAML; `path=None` validates the defaults + overrides."""
    if path is None:
        return parse_config({}, source="<defaults>", overrides=list(overrides or ()), schema=schema)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(str(exc))})") from None
    return parse_config(data, source=str(path), overrides=list(overrides or ()), schema=schema)


def save_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (it loads back to an equal `RunConfig`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml(), encoding="utf-8")
    return path


def _describe(exc: ValidationError, source: str, override_keys: set[str], schema: type[BaseModel]) -> str:
    messages = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        where = f"--set {dotted}" if dotted in override_keys else source
        messages.append(f"{where}: {dotted}: {_explain(err, loc, schema)}")
    extra = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
    return messages[0] + extra


def _explain(err: Mapping[str, Any], loc: list[str], schema: type[BaseModel]) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        known = _section_fields(loc[:-1], schema)
        suggestion = _suggest(loc[-1], known)
        hint = f"did you mean {suggestion!r}?" if suggestion else f"known keys: {', '.join(known)}"
        return f"unknown key; {hint}"
    if kind == "missing":
        return "required key is missing"
    if kind in {"float_parsing", "float_type"}:
        return f"expected a number, got {value!r}"
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return f"expected an integer, got {value!r}"
    if kind in {"bool_parsing", "bool_type"}:
        return f"expected true or false, got {value!r}"
    if kind in {"string_type"}:
        return f"expected a string, got {value!r}"
    if kind in {"list_type", "tuple_type"}:
        return f"expected a list, got {value!r}"
    if kind in {"model_type", "dict_type", "model_attributes_type"}:
        return f"expected a section (a mapping of keys), got {value!r}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {value!r}"
    if kind == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"]))
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {value!r}"


# Names other tools (and the original SonarRecursiveModel configs) use for our keys, so that a typo of a
# familiar spelling still finds the right field: `learnig_rate` -> `learning_rate` -> `lr`.
_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "adam_lr": "lr",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "adam_epsilon": "adam_eps",
    "epochs": "num_epochs",
    "eval_interval": "eval_every",
    "eval_steps": "eval_max_batches",
    "log_interval": "log_every",
    "checkpoint_interval": "save_every",
    "save_interval": "save_every",
    "output_dir": "dir",
    "save_total_limit": "keep_last",
    "name": "dataset",
    "val_split": "eval_split",
    "validation_split": "eval_split",
    "llada_model_name": "backbone",
    "model_name_or_path": "backbone",
    "refiner_type": "refiner",
    "use_gating": "use_gates",
    "min_confidence": "confidence_threshold",
    "forward_dtype": "dtype",
    "calibration_weight": "confidence_calibration_weight",
    "warmup": "warmup_steps",
    "accumulation_steps": "gradient_accumulation_steps",
    "init_checkpoint": "init_from",
    "pretrained_refiner": "init_from",
}


def _suggest(key: str, known: list[str]) -> str | None:
    """The field a mistyped key most likely meant, via difflib over field names and familiar aliases."""
    candidates = {name: name for name in known}
    candidates.update({alias: field for alias, field in _ALIASES.items() if field in known})
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return candidates[match[0]] if match else None


def _section_fields(loc: list[str], schema: type[BaseModel]) -> list[str]:
    """The field names of the section at `loc` (for typo suggestions)."""
    model: type[BaseModel] = schema
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _plain(value: Any) -> Any:
    """Tuples become lists so that `yaml.safe_dump` writes plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _first_line(text: str) -> str:
    return " ".join(text.split())
