"""Load what `--checkpoint` names for evaluation or generation: a run's checkpoint (or run directory), an
export (`llada-trm export`; its layout is in docs/architecture.md), a Hugging Face-layout backbone directory,
or `embedded`, so that one command compares a trained refiner with its backbone.

A run's or export's refiners are refused on another backbone than the one they were trained on (the
fingerprint their weights file records) unless `allow_backbone_mismatch`. `refiner` picks what runs: None
the checkpoint's own choice, `"none"` the backbone alone (K = 0), `"mlp"` / `"slot"` one refiner it has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llada_trm.assets import EMBEDDED_NAME, embedded_backbone_dir
from llada_trm.build import build_model, inference_dtype, load_hybrid, resolve_backbone_dir
from llada_trm.config import RunConfig, SyntheticDataConfig, parse_config
from llada_trm.diffusion.options import SamplingOptions
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.evaluate.evaluator import Answers, answer_questions
from llada_trm.io import DTYPES, dtype_named, resolve_device
from llada_trm.model.fingerprint import directory_fingerprint
from llada_trm.model.hybrid import LLaDATRMHybrid
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.lora import attach_run_lora, merge_lora
from llada_trm.run_checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    check_run_backbone,
    load_weights,
    read_run_config,
    refiner_names,
    resolve_checkpoint_dir,
)

REFINER_CHOICES = ("none", "mlp", "slot")
OFF = "off"  # a sampler override that switches off what a run's `sampling:` section switched on
EXPORT_KEY = "llada_trm"  # an export's section of its config.json
EXPORT_FORMAT = 1
REFINER_FILE = "refiner.safetensors"


@dataclass
class LoadedModel:
    """A model ready for sampling, its tokenizer, and where it came from.

    `num_steps` is the refinement budget to sample with (None = the model's K, 0 = no refinement).
    `run_config` is the training run's config (None for a plain backbone); `backbone_config` holds the
    pretraining summary's config when the backbone directory has one (the embedded default does).
    """

    model: LLaDATRMHybrid
    tokenizer: PreTrainedTokenizerBase
    source: str
    kind: str  # "run", "export" or "backbone"
    refiner: str  # what runs: "none", "mlp", "slot" or "cascade"
    num_steps: int | None
    backbone_dir: Path
    checkpoint_dir: Path | None = None
    run_config: RunConfig | None = None
    backbone_config: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path | None:
        """The training run's output directory (the parent of `checkpoints/`), when there is one."""
        if self.checkpoint_dir is None:
            return None
        parent = self.checkpoint_dir.parent
        return parent.parent if parent.name == "checkpoints" else parent

    @property
    def sampling(self) -> SamplingOptions:
        """The sampler settings this model is sampled with by default: a trained run's `sampling:` section
        (what its validation and `compare` used), LLaDA's defaults for a bare backbone."""
        if self.run_config is not None:
            return self.run_config.sampling.options()
        return SamplingOptions()

    def sampling_with(self, **overrides: Any) -> SamplingOptions:
        """`sampling` with some settings replaced; None values keep the model's (unset command-line flags)."""
        return override_sampling(self.sampling, **overrides)

    def generate(self, questions: Sequence[str] | str, **sampling: Any) -> Answers:
        """Answer `questions` (a list, or one string) through the chat template; `sampling` overrides this
        model's sampler settings (`steps=`, `gen_length=`, `threshold=`, ..., see SamplingOptions)."""
        options = self.sampling_with(**sampling)
        return answer_questions(self.model, self.tokenizer, questions, options, num_steps=self.num_steps)

    def describe(self) -> dict[str, Any]:
        """The JSON-friendly identity of the model, for result files."""
        return {
            "checkpoint": self.source,
            "kind": self.kind,
            "refiner": self.refiner,
            "num_steps": self.num_steps,
            "backbone": str(self.backbone_dir),
            "checkpoint_dir": None if self.checkpoint_dir is None else str(self.checkpoint_dir),
        }


def override_sampling(base: SamplingOptions, **overrides: Any) -> SamplingOptions:
    """`base` with the given settings replaced (None keeps base's value), validated as one combination."""
    allowed = set(SamplingOptions().to_dict())
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"unknown sampling setting(s) {', '.join(unknown)}; choose from {', '.join(sorted(allowed))} "
            "(the [MASK], EOS and EoT ids come from the model's tokenizer)"
        )
    given = {key: value for key, value in overrides.items() if value is not None}
    return replace(base, **given)


def checkpoint_sampling(checkpoint: str | Path) -> SamplingOptions:
    """The sampler settings `load_checkpoint(checkpoint).sampling` will have, read without loading weights
    (so that bad sampling flags fail before a large model loads): a run's `sampling:` section, else LLaDA's
    defaults. A checkpoint that does not exist gets the defaults here and its error from `load_checkpoint`."""
    path = Path(checkpoint).expanduser()
    if str(checkpoint) == EMBEDDED_NAME or not path.exists():
        return SamplingOptions()
    section = read_export_section(path) if path.is_dir() else None
    if section is not None:
        return export_run_config(path, section).sampling.options()
    if _is_backbone_dir(path):
        return SamplingOptions()
    return read_run_config(resolve_checkpoint_dir(path)).sampling.options()


def resolve_sampling(checkpoint: Any, given: Mapping[str, Any]) -> Any:
    """`checkpoint`'s sampler settings with `given` in place of its values: None keeps the checkpoint's
    value, `off` switches a setting off (threshold, cache). The one rule for every entry point that takes
    a checkpoint and sampler overrides (`eval`, `generate`, the lm-eval backend)."""
    off = [name for name, value in given.items() if value == OFF]
    on = {name: value for name, value in given.items() if value != OFF}
    options = override_sampling(checkpoint_sampling(checkpoint), **on)
    return replace(options, **dict.fromkeys(off)) if off else options


def _is_backbone_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / STATE_FILE).is_file()


def resolve_eval_device(name: str = "auto") -> torch.device:
    """'auto' = CUDA when available, else CPU; asking for CUDA without one is a clear error."""
    return resolve_device(name, setting="--device")


def load_checkpoint(
    checkpoint: str | Path,
    *,
    refiner: str | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    allow_backbone_mismatch: bool = False,
) -> LoadedModel:
    """Load a run checkpoint, an export, a backbone directory or `embedded` (see the module docstring).

    `allow_backbone_mismatch`: load refiners recorded on another backbone (with a warning) instead of
    refusing them."""
    if refiner is not None and refiner not in REFINER_CHOICES:
        raise ValueError(f"--refiner {refiner!r}: choose one of {', '.join(REFINER_CHOICES)}")
    device = device if isinstance(device, torch.device) else resolve_eval_device(device)
    source = str(checkpoint)
    if source == EMBEDDED_NAME:
        directory = Path(embedded_backbone_dir())
        return _load_backbone(directory, source, refiner, device, inference_dtype(dtype, device, directory))
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such checkpoint (give a run's checkpoints/last or best, a run directory, a backbone "
            f"directory with config.json, or '{EMBEDDED_NAME}')"
        )
    section = read_export_section(path) if path.is_dir() else None
    if section is not None:
        torch_dtype = inference_dtype(dtype, device, path)
        return _load_export(path, section, source, refiner, device, torch_dtype, allow_backbone_mismatch)
    if _is_backbone_dir(path):
        return _load_backbone(path, source, refiner, device, inference_dtype(dtype, device, path))
    directory = resolve_checkpoint_dir(path)
    return _load_run(directory, source, refiner, device, dtype, allow_backbone_mismatch)


def _load_backbone(
    directory: Path, source: str, refiner: str | None, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    if refiner not in (None, "none"):
        raise CheckpointError(
            f"{source}: a plain backbone has no trained refiner, so --refiner {refiner} cannot run; train "
            "one (llada-trm train --config FILE) and pass its checkpoint, or use --refiner none"
        )
    plain = HybridConfig(refiner="none")
    model, tokenizer = load_hybrid(
        directory, plain, dtype=dtype, device=device, where=str(directory), error=CheckpointError
    )
    summary = directory / "pretrain_summary.json"
    backbone_config = None
    if summary.is_file():
        try:
            backbone_config = json.loads(summary.read_text(encoding="utf-8")).get("config")
        except (json.JSONDecodeError, AttributeError):
            backbone_config = None  # a damaged model card only loses the task defaults, not the model
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        source=source,
        kind="backbone",
        refiner="none",
        num_steps=0,
        backbone_dir=directory,
        backbone_config=backbone_config,
    )


def _load_run(
    directory: Path,
    source: str,
    refiner: str | None,
    device: torch.device,
    dtype_name: str,
    allow_backbone_mismatch: bool,
) -> LoadedModel:
    config_path = directory / CONFIG_FILE
    config = read_run_config(directory)
    if config.model.dtype != "auto":
        dtype = DTYPES[config.model.dtype]
    else:  # the run's backbone decides 'auto' (its dtype on disk), where a missing one fails below
        backbone = Path(config.model.backbone).expanduser()
        dtype = (
            inference_dtype(dtype_name, device, resolve_backbone_dir(config.model.backbone))
            if config.model.backbone == EMBEDDED_NAME or (backbone / "config.json").is_file()
            else dtype_named("float32" if dtype_name == "auto" else dtype_name)
        )
    where = f"{config_path}: model.backbone"
    built = build_model(config, device=device, dtype=dtype, error=CheckpointError, where=where)
    model, tokenizer, backbone_dir = built.model, built.tokenizer, built.backbone_dir
    lora = bool(attach_run_lora(model, config))  # so that the checkpoint's adapter tensors load
    check_run_backbone(
        directory, directory_fingerprint(backbone_dir), backbone_dir, allow_mismatch=allow_backbone_mismatch
    )
    # the refiner's every tensor (no other file has them: a missing one would run at its random
    # initialisation); the backbone tensors the run trained are those the checkpoint records
    load_weights(model, directory, require=refiner_names(model.state_dict()))
    if lora:  # sampling runs on the merged weights: the adapted model's logits, without the adapters' cost
        model.backbone = merge_lora(model.backbone)
    running, num_steps = _select_refiner(model, config, refiner, source)
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        source=source,
        kind="run",
        refiner=running,
        num_steps=num_steps,
        backbone_dir=backbone_dir,
        checkpoint_dir=directory,
        run_config=config,
    )


def _load_export(
    directory: Path,
    section: dict[str, Any],
    source: str,
    refiner: str | None,
    device: torch.device,
    dtype: torch.dtype,
    allow_backbone_mismatch: bool,
) -> LoadedModel:
    """An exported model: its run config from config.json, its backbone and refiners from its own files."""
    config = export_run_config(directory, section)
    if config.model.dtype != "auto":
        dtype = DTYPES[config.model.dtype]
    where = f"{directory / 'config.json'}"
    built = build_model(config, device=device, dtype=dtype, error=CheckpointError, where=where)
    model = built.model
    if section.get("refiner_file"):
        refiner_path = _inside(directory, section["refiner_file"], where)
        model.load_refiner(refiner_path, allow_backbone_mismatch=allow_backbone_mismatch)
    elif model.refiner_state_dict():
        raise CheckpointError(f"{where}: names no {REFINER_FILE} for its {config.model.refiner} refiner")
    running, num_steps = _select_refiner(model, config, refiner, source)
    return LoadedModel(
        model=model.eval(),
        tokenizer=built.tokenizer,
        source=source,
        kind="export",
        refiner=running,
        num_steps=num_steps,
        backbone_dir=directory,
        run_config=config,
    )


def read_export_section(directory: Path) -> dict[str, Any] | None:
    """The `llada_trm` entry of `directory/config.json`, or None for a plain backbone (or no config.json:
    the backbone loader reports that)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # JSON or UTF-8 errors
        return None  # the backbone loader names the problem with the file
    section = raw.get(EXPORT_KEY) if isinstance(raw, dict) else None
    if section is None:
        return None
    if not isinstance(section, dict) or section.get("format_version") != EXPORT_FORMAT:
        version = section.get("format_version") if isinstance(section, dict) else None
        raise CheckpointError(
            f"{path}: '{EXPORT_KEY}' is not a llada-trm export of format {EXPORT_FORMAT} (format "
            f"{version!r}); re-export the run with this llada-trm (llada-trm export RUN OUT --force)"
        )
    return section


def export_run_config(directory: Path, section: dict[str, Any]) -> RunConfig:
    """The run config an export stands for, its backbone being the export directory itself."""
    sampling = dict(section.get("sampling", {}))
    batch = sampling.pop("batch_size", None)  # the sampler's batch: the run's training batch (issue 25)
    if sampling.get("temperature") == 0.0:  # an export written before issue 25 records the fixed value
        del sampling["temperature"]
    raw = {
        "model": {**section.get("model", {}), "backbone": str(directory)},
        "data": _export_data(section.get("data", {})),
        "sampling": sampling,
        **({"training": {"batch_size": batch}} if batch is not None else {}),
    }
    source = f"{directory / 'config.json'}: {EXPORT_KEY}"
    _export_second_cut(raw, source)
    return parse_config(raw, source=source)


def _export_second_cut(raw: dict[str, Any], source: str) -> None:
    """An export written before the settings' third cut (issue 25) records the refiners' two update scales,
    the backbone dtype and the GSM8K-style task's knobs: read as `llada-trm convert` reads them (the scale of
    the refiners it builds; the dtype derived; the task fixed, another one refused in one line)."""
    model, data = raw["model"], raw["data"]
    built = HybridConfig(**{key: model[key] for key in ("refiner", "integration") if key in model})
    scales = {kind: (model.get(kind) or {}).pop("delta_scale", None) for kind in ("slot", "mlp")}
    used = {scales[kind] for kind in built.refiner_kinds if scales[kind] is not None}
    if len(used) > 1:
        raise ConfigError(f"{source}: its refiners ran at different delta_scales {sorted(used)}, which one "
                          "model.delta_scale cannot express; re-export it from a converted run")  # fmt: skip
    if used and "delta_scale" not in model:
        model["delta_scale"] = used.pop()
    model.pop("dtype", None)  # derived now
    task = data.get("synthetic") if isinstance(data.get("synthetic"), dict) else {}
    for name in ("min_steps", "max_steps", "max_number", "max_result"):
        value = task.pop(name, None)
        fixed = getattr(SyntheticDataConfig, name)
        if value is not None and value != fixed and data.get("dataset", "synthetic") == "synthetic":
            raise ConfigError(
                f"{source}: data.synthetic.{name}={value}: the GSM8K-style task is fixed now at the embedded "
                "backbone's (docs/settings.md); this export was trained on another one"
            )
    if "synthetic" in data and not task:
        del data["synthetic"]


def _export_data(data: dict[str, Any]) -> dict[str, Any]:
    """An export's `data` section in the current schema: one written before issue 25 holds the task's
    counts under its task and the GSM8K slices, which the counts at `data.` now replace."""
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    task = data.get("dataset", "synthetic")
    for name in ("synthetic", "arithmetic"):
        section = data.get(name) if isinstance(data.get(name), dict) else {}
        for count in ("n_train", "n_eval"):
            if count in section:
                value = section.pop(count)
                if name == task:
                    data.setdefault(count, value)
    for old in ("train_split", "eval_split"):
        data.pop(old, None)
    return data


def _inside(directory: Path, name: object, where: str) -> Path:
    """`directory / name` for a file an export names, refused unless it is a plain file name of the export
    itself: `../..`, an absolute path or a link out of the folder would load a file the export lacks."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "\\" not in name
    if not plain or Path(str(name)).name != name:
        raise CheckpointError(
            f"{where}: {EXPORT_KEY}.refiner_file {name!r} must be a file name inside the export "
            f"(e.g. {REFINER_FILE}); re-export the run (llada-trm export RUN OUT)"
        )
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(
            f"{where}: {EXPORT_KEY}.refiner_file {name!r} links outside the export; re-export the run"
        )
    return path


def _select_refiner(
    model: LLaDATRMHybrid, config: RunConfig, refiner: str | None, source: str
) -> tuple[str, int | None]:
    """(what runs, num_steps) for `--refiner`; sets the active refiner of a `hybrid` integration."""
    integration = config.model.integration
    own = config.model.refiner if integration == "replace" else integration
    if refiner == "none":
        return "none", 0
    if refiner is None:
        if integration == "hybrid":
            return model.active_refiner, None
        return own, (0 if own == "none" else None)
    if integration == "replace":
        if refiner != config.model.refiner:
            raise CheckpointError(
                f"{source}: this run trained the {config.model.refiner!r} refiner only, so --refiner "
                f"{refiner} cannot run; use --refiner {config.model.refiner} or none"
            )
        return refiner, None
    if integration == "hybrid":
        model.active_refiner = refiner
        return refiner, None
    raise CheckpointError(
        f"{source}: a cascade runs the MLP and slot refiners together; omit --refiner, or use --refiner none "
        "for the backbone alone"
    )
