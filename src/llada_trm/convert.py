"""`llada-trm convert`: bring a run config, compare config, run directory or checkpoint written before the
settings redesign (issue 25) to the current schema.

The redesign fixed settings that no config varied and no study found useful (`config.retired_settings`,
the health thresholds of `training.health`; docs/settings.md lists each with its value). An old file still
names them, so the schema refuses it with one line that names this command. Converting:

- drops every retired key whose value equals the fixed one, silently (the run is the same run);
- drops a retired key set to another value with a `warning:` line (the converted run uses the fixed value);
- rewrites the legacy `model.halt_on_confidence: true|false` as `model.halting: confidence|none`;
- in a pretrain config (`llada-trm pretrain`'s, with its `evaluation:` section), drops the optimiser keys
  that pretraining no longer sets (`PRETRAIN_RETIRED`: it runs the one training loop, whose AdamW constants
  apply), with a `warning:` line where the value differed;
- drops a retired `model.*` key (`config.RETIRED_MODEL`) at its value now, or when the refiner or rule it
  configured is not built, and refuses one that set what the model no longer does (another slot width, the
  carry, learned halting), with one line: those change the model, not just a run's bookkeeping;
- checks that the result validates, and only then writes it.

A YAML file becomes a new YAML file; a directory (a run's `output.dir`, a checkpoint directory, a
comparison) is copied to a new directory with every `config.yaml` in it converted (weights and trainer
state copied as they are: no tensor was renamed). Writes go to a temporary name beside the destination and
are renamed into place; the input is never modified, an existing destination is refused, and on failure
only the temporary copy this command made is removed.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_trm.config import (
    FLAGS,
    REMOVED_LEVERS,
    RETIRED_MODEL,
    RETIRED_SECTIONS,
    RunConfig,
    SyntheticDataConfig,
    parse_config,
    retired_settings,
)
from llada_trm.config_files import dump_yaml
from llada_trm.errors import ConfigError, UserError
from llada_trm.io import write_text_atomic
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.refiners.config import DELTA_SCALE
from llada_trm.schema import read_yaml

__all__ = ["Conversion", "convert_config", "convert_path", "health_thresholds"]

CONFIG_NAME = "config.yaml"  # a run's and a checkpoint's resolved config (run_checkpoint.CONFIG_FILE)

# Legacy spellings rewritten to the current key: old dotted key -> (new dotted key, value map).
RENAMED: dict[str, tuple[str, dict[Any, Any]]] = {
    "model.halt_on_confidence": ("model.halting", {True: "confidence", False: "none"}),
}


def health_thresholds() -> dict[str, Any]:
    """The old `advanced.health.<name>` keys and the constants of `training.health` that replaced them."""
    from llada_trm.training.health import HealthThresholds

    return {f"advanced.health.{k}": v for k, v in vars(HealthThresholds()).items()}


@dataclass
class Conversion:
    """What converting one config did: the converted mapping and one line per change."""

    data: dict[str, Any]
    dropped: list[str] = field(default_factory=list)  # retired keys at their fixed value
    warnings: list[str] = field(default_factory=list)  # retired keys set to another value, now fixed
    renamed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.warnings or self.renamed)


PRETRAIN_RETIRED = ("training.weight_decay", "training.max_grad_norm")
"""Pretrain-config keys gone with pretraining's own loop; the one loop's `TrainingConfig` constants apply."""


def convert_config(raw: Mapping[str, Any], source: str = "<config>") -> Conversion:
    """Convert one old run config, compare config or pretrain config (a raw mapping as read from YAML); the
    result validates against the current schema (else a one-line `ConfigError` naming `source`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    fixed = {**retired_settings(), **health_thresholds()}
    data = _copy(raw)
    result = Conversion(data)
    if _is_pretrain(data):
        return _convert_pretrain(data, result, source)
    compare = "run" in data or "arms" in data or "refiners" in data
    runs: list[tuple[str, dict[str, Any]]] = []
    if compare:
        if isinstance(data.get("run"), dict):
            runs.append(("run.", data["run"]))
        for name, arm in (data.get("arms") or {}).items():
            if isinstance(arm, dict) and isinstance(arm.get("run"), dict):
                runs.append((f"arms.{name}.run.", arm["run"]))
    else:
        runs.append(("", data))
    base = data.get("run") if compare and isinstance(data.get("run"), dict) else {}
    for prefix, run in runs:
        built = _built(data, prefix, compare)
        convert_model_section(run, prefix, result, source, built=built)
        view = run if run is base or not compare else _merged(base, run)
        _convert_moved(run, view, prefix, source, result)  # before the retired keys: it reads some
        shared = _shared_kinds(data) if compare and prefix == "run." else built
        convert_second_cut(run, view, prefix, source, result, shared)
        _convert_run(run, prefix, fixed, result)
    _validate(data, compare, source)
    return result


def _convert_run(run: dict[str, Any], prefix: str, fixed: Mapping[str, Any], result: Conversion) -> None:
    for old, (new, values) in RENAMED.items():
        found, value = _pop(run, old)
        if not found:
            continue
        mapped = values.get(value, value) if isinstance(value, bool) else value
        if _get(run, new) is None:
            _set(run, new, mapped)
            result.renamed.append(f"{prefix}{old}: {value!r} -> {prefix}{new}: {mapped!r}")
        else:
            result.renamed.append(f"{prefix}{old}: dropped ({prefix}{new} is set)")
    for key, value in sorted(_leaves(run).items()):
        section = next((s for s in RETIRED_SECTIONS if key.startswith(s + ".")), None)
        if key not in fixed and section is None:
            continue
        if key == "output.best_mode":
            now = "min" if "loss" in str(_get(run, "output.save_best") or "loss") else "max"
            same = value in ("auto", now)
            shown = f"derived now: {now}"
        elif key in fixed:
            same, shown = _same(value, fixed[key]), f"fixed at {_show(fixed[key])}"
        else:  # a key of a retired section that no longer existed before either
            same, shown = False, "the section is gone"
        _pop(run, key, prune=True)
        if same:
            result.dropped.append(f"{prefix}{key}")
        else:
            result.warnings.append(
                f"{prefix}{key}={_show(value)} dropped: {shown} (docs/settings.md); the converted run uses it"
            )


def _is_pretrain(data: Mapping[str, Any]) -> bool:
    """Whether a config is `llada-trm pretrain`'s: its `evaluation:` section, or a key only it has."""
    # (data.n_train is not one: a run config has it too since issue 25)
    only = {"model": ("d_model", "n_layers", "init_from"), "data": ("vocab_size",),
            "training": ("steps", "object_weight", "stop_at")}  # fmt: skip
    if "run" in data or "arms" in data or "refiners" in data:  # a compare config has `evaluation:` too
        return False
    return "evaluation" in data or any(
        isinstance(data.get(section), Mapping) and any(key in data[section] for key in keys)
        for section, keys in only.items()
    )


def _convert_pretrain(data: dict[str, Any], result: Conversion, source: str) -> Conversion:
    from llada_trm.config import TrainingConfig
    from llada_trm.extras.pretraining.config import PretrainConfig

    for key in PRETRAIN_RETIRED:
        found, value = _pop(data, key, prune=True)
        if not found:
            continue
        now = getattr(TrainingConfig, key.split(".")[1])
        if _same(value, now):
            result.dropped.append(key)
        else:
            result.warnings.append(
                f"{key}={_show(value)} dropped: pretraining runs the one training loop, whose AdamW uses "
                f"{_show(now)}; the converted run uses it"
            )
    parse_config(data, source=f"{source} (converted)", schema=PretrainConfig)
    return result


# ------------------------------------------------------------------------------- the model section (issue 25)
# The `model.*` keys issue 25 retired (`config.RETIRED_MODEL`). Unlike a retired training setting, another
# value changed the model itself (its shapes, or a lever that left the tree), so a converted run could not be
# the same run: such a value is refused in one line, never warned about and replaced.

# Why each key's other value cannot convert, and what to do instead.
_MODEL_REFUSALS: dict[str, str] = {
    "active_refiner": "a 'hybrid' runs its slot refiner; choose the MLP at run time (`llada-trm evaluate "
    "--refiner mlp`, or `model.active_refiner = 'mlp'` in Python)",
    "cascade_mlp_steps": "a cascade gives the MLP the first K // 2 of the K steps; set max_recursive_steps",
    "return_step_logits": "step logits are computed while training (deep supervision) and not in eval",
    "denoising_carry": "the carry across denoising steps left the tree (docs/levers.md names the commit "
    "that has it)",
    "slot.mlp_ratio": "the slot refiner's block MLP is 4 x d_inner wide",
    "slot.delta_clamp": "updates are clamped at 0.5",
    "slot.use_gates": "the slot refiner always has its gates",
    "slot.dropout": "the refiners run without dropout",
    "slot.d_ctx": "the slot widths are d_inner/2, /4, /4, /8; set slot.d_inner",
    "slot.d_reason": "the slot widths are d_inner/2, /4, /4, /8; set slot.d_inner",
    "slot.d_refine": "the slot widths are d_inner/2, /4, /4, /8; set slot.d_inner",
    "slot.d_conf": "the slot widths are d_inner/2, /4, /4, /8; set slot.d_inner",
    "mlp.hidden_dim": "the MLP is min(2 d_model, 1024) wide; size it with mlp.param_budget",
    "mlp.hidden_mult": "the MLP is min(2 d_model, 1024) wide; size it with mlp.param_budget",
    "mlp.delta_clamp": "updates are clamped at 0.5",
    "mlp.dropout": "the refiners run without dropout",
}


def convert_model_section(
    run: dict[str, Any], prefix: str, result: Conversion, source: str, built: set[str]
) -> None:
    """Drop the retired `model.*` keys of one run (`prefix`: its place in the file) or refuse the file.

    `built`: the refiner kinds the run builds ({'mlp', 'slot'} when not known, e.g. a comparison's shared
    run). A key is dropped at its value now, or when what it configured is not built (a slot width of an
    MLP-only run, `active_refiner` outside 'hybrid', `halting_threshold` without learned halting).
    """
    model = run.get("model")
    if not isinstance(model, dict):
        return
    integration = model.get("integration", "replace")
    if model.get("halting") == "learned":
        raise ConfigError(
            f"{source}: {prefix}model.halting=learned: learned halting left the tree (docs/levers.md names "
            "the commit that has it); set model.halting to confidence or none"
        )
    k = model.get("max_recursive_steps", HybridConfig.model_fields["max_recursive_steps"].default)
    for key, now in sorted(RETIRED_MODEL.items()):
        found, value = _pop(run, key, prune=True)
        if not found:
            continue
        name = key.removeprefix("model.")
        kind = name.split(".", 1)[0] if "." in name else None
        unused = (
            (kind is not None and kind not in built)
            or (name == "active_refiner" and integration != "hybrid")
            or (name == "cascade_mlp_steps" and integration != "cascade")
            or name == "halting_threshold"  # read only by learned halting, refused above
        )
        same = _same(value, now)
        if name == "cascade_mlp_steps" and isinstance(value, int) and isinstance(k, int):
            same = value == k // 2  # the split a cascade uses now
        if same or unused:
            result.dropped.append(f"{prefix}{key}")
        elif name == "mlp.hidden_mult" and _same(value, 2.0):  # what every shipped config set
            result.warnings.append(
                f"{prefix}{key}=2.0 dropped: the MLP is min(2 d_model, 1024) wide, the same up to d_model "
                "512 (every shipped backbone but LLaDA-8B; docs/settings.md)"
            )
        else:
            raise ConfigError(
                f"{source}: {prefix}{key}={_show(value)}: no longer supported (issue 25, docs/settings.md): "
                f"{_MODEL_REFUSALS[name]}"
            )


def _built(data: Mapping[str, Any], prefix: str, compare: bool) -> set[str]:
    """The refiner kinds the run at `prefix` builds: its model's, or an arm's `refiner`; both in a
    comparison's shared run (each refiner is trained from it)."""
    both = {"mlp", "slot"}
    if compare and prefix == "run.":
        return both
    run = _get(data, prefix.rstrip(".")) if prefix else data
    model = run.get("model") if isinstance(run, Mapping) else None
    model = model if isinstance(model, Mapping) else {}
    if prefix.startswith("arms."):
        arm = _get(data, prefix.removesuffix("run.").rstrip("."))
        refiner = arm.get("refiner") if isinstance(arm, Mapping) else None
    else:
        refiner = model.get("refiner", "slot")
    if model.get("integration", "replace") != "replace":
        return both
    if refiner is None:
        return both
    return set() if refiner == "none" else {str(refiner)}


def _shared_kinds(data: Mapping[str, Any]) -> set[str]:
    """The refiner kinds a comparison builds from its shared `run:` update scale: those of every model it
    trains, less an arm that sets its own scale."""
    names = data.get("refiners")
    if not isinstance(names, list):
        return {"mlp", "slot"}
    base = data.get("run") if isinstance(data.get("run"), Mapping) else {}
    arms = data.get("arms") if isinstance(data.get("arms"), Mapping) else {}
    kinds: set[str] = set()
    for name in names:
        arm = arms.get(name) if isinstance(arms.get(name), Mapping) else {}
        own = arm.get("run") if isinstance(arm.get("run"), Mapping) else {}
        if _get(own, "model.delta_scale") is not None:
            continue
        refiner = str(arm.get("refiner", name))
        integration = _get(own, "model.integration") or _get(base, "model.integration") or "replace"
        built = {"mlp", "slot"} if integration != "replace" else ({refiner} - {"none"})
        kinds |= {kind for kind in built if _get(own, f"model.{kind}.delta_scale") is None}
    return kinds


def _validate(data: dict[str, Any], compare: bool, source: str) -> None:
    if compare:
        from llada_trm.study.config import CompareConfig

        parse_config(data, source=f"{source} (converted)", schema=CompareConfig)
    else:
        parse_config(data, source=f"{source} (converted)", schema=RunConfig)


# ------------------------------------------------- issue 25, training side: removed levers, moved settings
# (`config.REMOVED_LEVERS`, `config.REPLACED`; docs/settings.md)

GSM8K_TRAIN_SIZE = 7473  # problems in GSM8K's train split: `train[:-M]` holds 7473 - M of them
_OLD_DEFAULTS = {
    "data.dataset": "synthetic", "training.batch_size": 4, "training.gradient_accumulation_steps": 1,
    "data.n_train": 2000, "data.n_eval": 100,
}  # fmt: skip
_HEAD = re.compile(r"^\s*train\s*\[\s*:\s*(\d+)\s*\]\s*$")  # train[:N]
_ALL_BUT = re.compile(r"^\s*train\s*\[\s*:\s*-(\d+)\s*\]\s*$")  # train[:-M]
_TAIL = re.compile(r"^\s*train\s*\[\s*-(\d+)\s*:\s*\]\s*$")  # train[-M:]


def _convert_moved(
    run: dict[str, Any], view: Mapping[str, Any], prefix: str, source: str, result: Conversion
) -> None:
    """Drop removed levers at their off value (else one error line); move the settings issue 25 replaced.
    `view`: the run as resolved (a compare arm's run over the shared `run:`), for the values a rule reads."""

    def value(key: str) -> Any:
        found = _get(run, key)
        found = _get(view, key) if found is None else found
        return _OLD_DEFAULTS.get(key) if found is None else found

    def note(line: str) -> None:
        result.renamed.append(f"{prefix}{line}")

    _drop_removed(run, prefix, source, result)
    dataset = value("data.dataset")
    for task in ("synthetic", "arithmetic"):  # data.<task>.n_* -> data.n_* (the selected task's)
        for name in ("n_train", "n_eval"):
            found, old = _pop(run, f"data.{task}.{name}", prune=True)
            if found and task == dataset and _get(run, f"data.{name}") is None:
                _set(run, f"data.{name}", old)
                note(f"data.{task}.{name}: {old} -> {prefix}data.{name}: {old}")
            elif found:
                result.dropped.append(f"{prefix}data.{task}.{name}")
    _convert_splits(run, dataset, source, prefix, note, result)
    _convert_epochs(run, value, prefix, note, result)
    _convert_batches(run, value, prefix, note, result)


def _drop_removed(run: dict[str, Any], prefix: str, source: str, result: Conversion) -> None:
    for key, off in REMOVED_LEVERS.items():
        found, old = _pop(run, key, prune=True)
        if not found:
            continue
        if not _same(old, off) and not (old is None and off is None):
            raise ConfigError(
                f"{source}: {prefix}{key}={_show(old)}: this lever left the tree in issue 25 "
                f"(docs/levers.md; commit a36ffb7 has it); set it to {_show(off)} or remove it, then convert"
            )
        result.dropped.append(f"{prefix}{key}")


def _convert_batches(
    run: dict[str, Any],
    value: Callable[[str], Any],
    prefix: str,
    note: Callable[[str], None],
    result: Conversion,
) -> None:
    """eval_max_batches -> n_eval, sampling.batch_size -> the training batch, lora.enabled -> lora.rank."""
    dataset = value("data.dataset")
    found, old = _pop(run, "training.eval_max_batches", prune=True)
    if found and old is not None:
        batches, n_eval = int(old) * int(value("training.batch_size")), int(value("data.n_eval"))
        if batches < n_eval:
            _set(run, "data.n_eval", batches)
            line = f"training.eval_max_batches: {old} -> data.n_eval: {batches} (validation reads them all)"
            note(line + ("" if dataset != "gsm8k" else "; GSM8K: the last problems of train now"))
        else:
            result.dropped.append(f"{prefix}training.eval_max_batches")
    elif found:
        result.dropped.append(f"{prefix}training.eval_max_batches")
    found, old = _pop(run, "sampling.batch_size", prune=True)
    if found:
        batch = value("training.batch_size")
        if _same(old, batch):
            result.dropped.append(f"{prefix}sampling.batch_size")
        else:
            result.warnings.append(
                f"{prefix}sampling.batch_size={_show(old)} dropped: the run samples in its "
                f"training.batch_size ({batch}) now (docs/settings.md)"
            )
    found, old = _pop(run, "lora.enabled", prune=True)
    if found:
        if old is True:
            rank = _get(run, "lora.rank")
            _set(run, "lora.rank", 8 if rank is None else rank)  # 8: the old default rank
            note(f"lora.enabled: true -> {prefix}lora.rank: {_get(run, 'lora.rank')}")
        else:  # off: the rank it would have had is dropped with it
            result.dropped.append(f"{prefix}lora.enabled")
            if _pop(run, "lora.rank", prune=True)[0]:
                result.dropped.append(f"{prefix}lora.rank")


def _convert_splits(
    run: dict[str, Any],
    dataset: Any,
    source: str,
    prefix: str,
    note: Callable[[str], None],
    result: Conversion,
) -> None:
    """GSM8K's `train_split` / `eval_split` slices -> `data.n_train` / `data.n_eval` (unused by a generated
    task: dropped). Only slices the counts express convert: the head of train, and its tail for validation."""
    has_train, train = _pop(run, "data.train_split", prune=True)
    has_eval, evaluation = _pop(run, "data.eval_split", prune=True)
    counted = _get(run, "data.n_train") is not None or _get(run, "data.n_eval") is not None
    if not (has_train or has_eval) and counted:  # a current file: its counts say it (no slice defaults)
        return
    if dataset != "gsm8k":
        found = (("train_split", has_train), ("eval_split", has_eval))
        result.dropped += [f"{prefix}data.{key}" for key, has in found if has]
        return
    train = train if has_train else "train[:1000]"  # the old defaults
    evaluation = evaluation if has_eval else "test[:100]"
    tail = _TAIL.match(str(evaluation)) if evaluation is not None else None
    if evaluation is not None and tail is None:
        raise ConfigError(
            f"{source}: {prefix}data.eval_split={evaluation!r}: validation now reads the last data.n_eval "
            "problems of GSM8K's train split (never test); set data.n_eval and remove data.eval_split"
        )
    n_eval = int(tail.group(1)) if tail else 0
    head, all_but = _HEAD.match(str(train)), _ALL_BUT.match(str(train))
    if head:
        n_train = int(head.group(1))
    elif all_but:
        n_train = GSM8K_TRAIN_SIZE - int(all_but.group(1))
    else:
        raise ConfigError(
            f"{source}: {prefix}data.train_split={train!r}: training now reads the first data.n_train "
            "problems of GSM8K's train split; set data.n_train and remove data.train_split"
        )
    _set(run, "data.n_train", n_train)
    _set(run, "data.n_eval", n_eval)
    note(f"data.train_split: {train!r}, data.eval_split: {evaluation!r} -> data.n_train: {n_train}, "
         f"data.n_eval: {n_eval} (GSM8K's train split holds {GSM8K_TRAIN_SIZE})")  # fmt: skip


def _convert_epochs(
    run: dict[str, Any],
    value: Callable[[str], Any],
    prefix: str,
    note: Callable[[str], None],
    result: Conversion,
) -> None:
    """`training.num_epochs` -> `training.max_steps`: the run's length in optimizer steps (one process: the
    step count per epoch is ceil(ceil(n_train / batch) / accumulation), before over-long examples are
    skipped; `llada-trm train --dry-run` prints it)."""
    found, epochs = _pop(run, "training.num_epochs", prune=True)
    if not found:
        return
    micro = math.ceil(int(value("data.n_train")) / int(value("training.batch_size")))
    per_epoch = math.ceil(micro / int(value("training.gradient_accumulation_steps")))
    planned = int(epochs) * per_epoch
    steps = _get(run, "training.max_steps") or value("training.max_steps")
    total = min(int(steps), planned) if steps else planned
    if total == steps or (not steps and int(epochs) == 1):
        result.dropped.append(f"{prefix}training.num_epochs")
        return
    _set(run, "training.max_steps", total)
    note(f"training.num_epochs: {epochs} -> {prefix}training.max_steps: {total} ({epochs} x {per_epoch})")


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = _copy(base)
    for key, val in over.items():
        nested = isinstance(val, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], val) if nested else val
    return out


# ------------------------------------------------------ issue 25, the cut to 50: shared, derived, flags
# `model.{slot,mlp}.delta_scale` -> `model.delta_scale`; `model.dtype` derived; the GSM8K-style task fixed at
# the embedded backbone's; `training.device` / `training.log_every` flags of the command (`config.FLAGS`).
# (`training.min_lr_ratio` is a retired constant: `_convert_run` drops or warns.)


def convert_second_cut(
    run: dict[str, Any], view: Mapping[str, Any], prefix: str, source: str, result: Conversion,
    kinds: set[str],
) -> None:
    """Convert one run section's keys of the second cut. `view`: the run as resolved (a comparison arm's
    over the shared `run:`); `kinds`: the refiner kinds that read this section's update scale."""
    _convert_delta_scale(run, view, prefix, source, result, kinds)
    _convert_dtype(run, view, prefix, result)
    _convert_synthetic(run, view, prefix, source, result)
    for key, (flag, default) in FLAGS.items():
        found, value = _pop(run, key, prune=True)
        if not found:
            continue
        if _same(value, default):
            result.dropped.append(f"{prefix}{key}")
        else:
            shown = flag if isinstance(value, bool) else f"{flag} {_show(value)}"
            result.renamed.append(f"{prefix}{key}: {_show(value)} -> the command's flag {shown}")


def _convert_delta_scale(
    run: dict[str, Any], view: Mapping[str, Any], prefix: str, source: str, result: Conversion,
    kinds: set[str],
) -> None:
    """The slot's and the MLP's `delta_scale` -> the one `model.delta_scale` of the refiners this section
    configures; refused when those refiners ran at different scales (no one value is the same run)."""
    # read before popping: `view` may be `run` itself
    scales = {kind: _get(view, f"model.{kind}.delta_scale") for kind in sorted(kinds)}
    scales = {kind: DELTA_SCALE if value is None else value for kind, value in scales.items()}
    old = {kind: _pop(run, f"model.{kind}.delta_scale", prune=True) for kind in ("slot", "mlp")}
    present = {kind for kind, (found, _) in old.items() if found}
    if not present:
        return
    if len({float(value) for value in scales.values()}) > 1:
        shown = " and ".join(f"{prefix}model.{kind}.delta_scale={_show(v)}" for kind, v in scales.items())
        raise ConfigError(
            f"{source}: {shown}: both refiners share model.delta_scale now (issue 25, docs/settings.md); set "
            "them equal (a comparison: each arm its own run.model.delta_scale), then convert"
        )
    used = present & kinds
    if not used:  # it configured a refiner this run does not build
        result.dropped += [f"{prefix}model.{kind}.delta_scale" for kind in sorted(present)]
        return
    value = scales[min(used)]
    if _get(run, "model.delta_scale") is not None and not _same(value, _get(run, "model.delta_scale")):
        raise ConfigError(
            f"{source}: {prefix}model.delta_scale={_show(_get(run, 'model.delta_scale'))} and the old "
            f"{prefix}model.{min(used)}.delta_scale={_show(value)} differ; keep one"
        )
    _set(run, "model.delta_scale", value)
    for kind in sorted(present):
        if kind in used:
            result.renamed.append(f"{prefix}model.{kind}.delta_scale: {_show(value)} -> model.delta_scale")
        else:
            result.dropped.append(f"{prefix}model.{kind}.delta_scale")


def _convert_dtype(run: dict[str, Any], view: Mapping[str, Any], prefix: str, result: Conversion) -> None:
    """`model.dtype`: derived now (`build.choose_backbone_dtype`); dropped at 'auto', or at float32 where the
    backbone trains (phases 2-3 without LoRA: what 'auto' gives there), else dropped with a warning."""
    found, value = _pop(run, "model.dtype", prune=True)
    if not found:
        return
    phase = _get(view, "training.phase") or 1
    enabled = _get(view, "lora.enabled")  # before issue 25; since, lora.rank > 0
    lora = enabled is True or (enabled is None and bool(_get(view, "lora.rank")))
    if value == "auto" or (value == "float32" and phase != 1 and not lora):
        result.dropped.append(f"{prefix}model.dtype")
        return
    result.warnings.append(
        f"{prefix}model.dtype={_show(value)} dropped: derived now (fp32 when the backbone trains, bf16 under "
        "bf16 compute, else as its checkpoint stores it or fp32; docs/settings.md); the converted run uses it"
    )


_SYNTHETIC_FIXED = ("min_steps", "max_steps", "max_number", "max_result")


def _convert_synthetic(
    run: dict[str, Any], view: Mapping[str, Any], prefix: str, source: str, result: Conversion
) -> None:
    """The GSM8K-style task's knobs: dropped at the fixed task's values or when another dataset is used;
    another task is refused (the run would train and be tested on other problems)."""
    dataset = _get(view, "data.dataset") or "synthetic"
    for name in _SYNTHETIC_FIXED:
        found, value = _pop(run, f"data.synthetic.{name}", prune=True)
        if not found:
            continue
        fixed = getattr(SyntheticDataConfig, name)
        if dataset == "synthetic" and not _same(value, fixed):
            raise ConfigError(
                f"{source}: {prefix}data.synthetic.{name}={_show(value)}: the GSM8K-style task is fixed now "
                "at the embedded backbone's (1-2 steps, numbers up to 12, results up to 100; issue 25, "
                "docs/settings.md); a study that varies the task uses data.dataset: arithmetic"
            )
        result.dropped.append(f"{prefix}data.synthetic.{name}")


# ------------------------------------------------------------------------------------------------ files


def convert_path(source: str | Path, out: str | Path, echo: Callable[[str], None] = print) -> Path:
    """Convert a YAML file or a directory holding config.yaml files into the new path `out`."""
    src, dest = Path(source), Path(out)
    if not src.exists():
        raise UserError(f"{src}: not found; give an old config file, run directory or checkpoint directory")
    if dest.exists() or dest.is_symlink():
        raise UserError(f"--out {dest}: already exists; convert never overwrites, name a new path")
    if _inside(dest, src) or _inside(src, dest):
        raise UserError(f"--out {dest}: must lie outside {src} (the input is never modified)")
    if not dest.parent.is_dir():
        raise UserError(f"--out {dest}: its folder {dest.parent} does not exist")
    if src.is_file():
        conversion = convert_config(read_yaml(src), str(src))
        _report(str(src), conversion, echo)
        write_text_atomic(dest, dump_yaml(conversion.data))
        echo(f"wrote {dest}")
        return dest
    configs = sorted(p.relative_to(src) for p in src.rglob(CONFIG_NAME) if p.is_file())
    if not configs:
        raise UserError(f"{src}: no {CONFIG_NAME} inside; give a run directory, checkpoint or config file")
    converted = {rel: convert_config(read_yaml(src / rel), str(src / rel)) for rel in configs}
    staging = dest.with_name(f".{dest.name}.converting-{os.getpid()}")
    if staging.exists():
        raise UserError(f"{staging}: left by an earlier convert that was cut short; remove it and retry")
    try:
        shutil.copytree(src, staging, symlinks=True)
        for rel, conversion in converted.items():
            _report(str(src / rel), conversion, echo)
            write_text_atomic(staging / rel, dump_yaml(conversion.data))
        if dest.exists() or dest.is_symlink():  # appeared while copying: renaming could replace it
            raise UserError(f"--out {dest}: appeared while converting; nothing written, name a new path")
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only the copy this command made
        raise
    echo(f"wrote {dest} ({len(configs)} config file(s) converted)")
    return dest


def _report(name: str, conversion: Conversion, echo: Callable[[str], None]) -> None:
    for line in conversion.renamed:
        echo(f"{name}: renamed {line}")
    for line in conversion.warnings:
        echo(f"warning: {name}: {line}")
    if conversion.dropped:
        echo(f"{name}: {len(conversion.dropped)} retired settings dropped at their fixed values")
    if not conversion.changed:
        echo(f"{name}: already current")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ helpers


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def _leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf; a retired section's keys are leaves below it."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _pop(data: dict[str, Any], dotted: str, prune: bool = False) -> tuple[bool, Any]:
    """Remove a dotted key; with `prune`, also the sections the
    removal left empty (a section the file itself left empty is kept)."""
    *parents, last = dotted.split(".")
    chain: list[tuple[dict[str, Any], str]] = []
    node: Any = data
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            return False, None
        chain.append((node, part))
        node = node[part]
    found = isinstance(node, dict) and last in node
    value = node.pop(last) if found else None
    if prune and found:
        for parent, part in reversed(chain):
            if parent[part] == {}:
                del parent[part]
    return found, value


def _same(old: Any, now: Any) -> bool:
    """Whether an old YAML value means the fixed value (lists vs tuples, `1e-8` as a YAML 1.1 string)."""
    if isinstance(now, tuple | list):
        return isinstance(old, list | tuple) and len(old) == len(now) and all(map(_same, old, now))
    if isinstance(now, bool) or now is None or isinstance(now, str):
        return old == now and type(old) is type(now)
    if isinstance(now, int | float):
        if isinstance(old, str):
            try:
                old = float(old)
            except ValueError:
                return False
        return isinstance(old, int | float) and not isinstance(old, bool) and math.isclose(old, now)
    return bool(old == now)


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(_show, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
