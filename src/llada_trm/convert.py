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
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llada_trm.config import RETIRED_MODEL, RETIRED_SECTIONS, RunConfig, parse_config, retired_settings
from llada_trm.config_files import dump_yaml
from llada_trm.errors import ConfigError, UserError
from llada_trm.hybrid.config import HybridConfig
from llada_trm.io import write_text_atomic
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
    for prefix, run in runs:
        convert_model_section(run, prefix, result, source, built=_built(data, prefix, compare))
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
    only = {"model": ("d_model", "n_layers", "init_from"), "data": ("n_train", "vocab_size"),
            "training": ("steps", "object_weight", "stop_at")}  # fmt: skip
    return "evaluation" in data or any(
        isinstance(data.get(section), Mapping) and any(key in data[section] for key in keys)
        for section, keys in only.items()
    )


def _convert_pretrain(data: dict[str, Any], result: Conversion, source: str) -> Conversion:
    from llada_trm.config import TrainingConfig
    from llada_trm.pretraining.config import PretrainConfig

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


def _validate(data: dict[str, Any], compare: bool, source: str) -> None:
    if compare:
        from llada_trm.compare_config import CompareConfig

        parse_config(data, source=f"{source} (converted)", schema=CompareConfig)
    else:
        parse_config(data, source=f"{source} (converted)", schema=RunConfig)


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
