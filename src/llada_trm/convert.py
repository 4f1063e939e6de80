"""`llada-trm convert`: bring a run, compare or pretrain config, a run directory or a checkpoint written
before the settings redesign (issue 25) to the current schema.

docs/settings.md states every rule: a retired key is dropped at its fixed value and warned about at another,
a moved key is moved, and a value the model or the tree no longer has is refused in one line. The result is
validated before anything is written; the input is never modified (a directory is copied under a temporary
name with each config.yaml converted, weights and trainer state as they are, then renamed into place).
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
    TrainingConfig,
    parse_config,
    retired_settings,
)
from llada_trm.errors import ConfigError, UserError
from llada_trm.io import write_text_atomic
from llada_trm.model.hybrid_config import HybridConfig
from llada_trm.model.refiners.config import DELTA_SCALE
from llada_trm.schema import dump_yaml, plain, read_yaml

CONFIG_NAME = "config.yaml"  # a run's and a checkpoint's resolved config (run_checkpoint.CONFIG_FILE)
BOTH = frozenset({"mlp", "slot"})
# Legacy spellings rewritten to the current key: old dotted key -> (new dotted key, value map).
RENAMED: dict[str, tuple[str, dict[Any, Any]]] = {
    "model.halt_on_confidence": ("model.halting", {True: "confidence", False: "none"}),
}
# Pretrain-config keys gone with pretraining's own loop; the one loop's `TrainingConfig` constants apply.
PRETRAIN_RETIRED = ("training.weight_decay", "training.max_grad_norm")
GSM8K_TRAIN_SIZE = 7473  # problems in GSM8K's train split: `train[:-M]` holds 7473 - M of them
_OLD_DEFAULTS = {
    "data.dataset": "synthetic", "training.batch_size": 4, "training.gradient_accumulation_steps": 1,
    "data.n_train": 2000, "data.n_eval": 100,
}  # fmt: skip
_HEAD = re.compile(r"^\s*train\s*\[\s*:\s*(\d+)\s*\]\s*$")  # train[:N]
_ALL_BUT = re.compile(r"^\s*train\s*\[\s*:\s*-(\d+)\s*\]\s*$")  # train[:-M]
_TAIL = re.compile(r"^\s*train\s*\[\s*-(\d+)\s*:\s*\]\s*$")  # train[-M:]
_SYNTHETIC_FIXED = ("min_steps", "max_steps", "max_number", "max_result")
_WIDTHS = "the slot widths are d_inner/2, /4, /4, /8; set slot.d_inner"
# Why another value of a retired `model.*` key cannot convert (it changed the model, not the bookkeeping).
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
    **{f"slot.{width}": _WIDTHS for width in ("d_ctx", "d_reason", "d_refine", "d_conf")},
    "mlp.hidden_dim": "the MLP is min(2 d_model, 1024) wide; size it with mlp.param_budget",
    "mlp.hidden_mult": "the MLP is min(2 d_model, 1024) wide; size it with mlp.param_budget",
    "mlp.delta_clamp": "updates are clamped at 0.5",
    "mlp.dropout": "the refiners run without dropout",
}
_GONE = object()  # `_Run.retire`: the key was absent, or dropped at its value


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


@dataclass
class _Run:
    """One run section of a file (`prefix`: its place, e.g. `arms.mix.run.`) and what converting it needs:
    `view`, the run as resolved (a comparison arm's over the shared `run:`); the refiner kinds it builds."""

    run: dict[str, Any]
    view: Mapping[str, Any]
    prefix: str
    source: str
    result: Conversion
    built: set[str]

    def value(self, key: str) -> Any:
        """`key` as the run resolves it: set here, in the shared run, or the old schema's default."""
        found = _get(self.run, key)
        found = _get(self.view, key) if found is None else found
        return _OLD_DEFAULTS.get(key) if found is None else found

    def pop(self, key: str) -> tuple[bool, Any]:
        return _pop(self.run, key, prune=True)

    def drop(self, key: str) -> None:
        self.result.dropped.append(f"{self.prefix}{key}")

    def note(self, line: str) -> None:
        self.result.renamed.append(f"{self.prefix}{line}")

    def warn(self, key: str, value: Any, why: str) -> None:
        self.result.warnings.append(f"{self.prefix}{key}={_show(value)} dropped: {why}")

    def refuse(self, key: str, value: Any, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}={_show(value)}: {why}")

    def retire(self, key: str, same: Callable[[Any], bool]) -> Any:
        """Pop `key`; dropped when `same(value)`; else its value for the caller to warn about or refuse."""
        found, value = self.pop(key)
        if not found:
            return _GONE
        if same(value):
            self.drop(key)
            return _GONE
        return value


def convert_config(raw: Mapping[str, Any], source: str = "<config>") -> Conversion:
    """Convert one old run config, compare config or pretrain config (a raw mapping as read from YAML); the
    result validates against the current schema (else a one-line `ConfigError` naming `source`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    data = plain(raw)
    result = Conversion(data)
    if _is_pretrain(data):
        return _convert_pretrain(data, result, source)
    compare = "run" in data or "arms" in data or "refiners" in data
    base = data["run"] if compare and isinstance(data.get("run"), dict) else {}
    if not compare:
        runs = [("", data)]
    else:
        runs = [("run.", base)] if base is data.get("run") else []
    for name, arm in (data.get("arms") or {}).items():
        if isinstance(arm, dict) and isinstance(arm.get("run"), dict):
            runs.append((f"arms.{name}.run.", arm["run"]))
    for prefix, run in runs:
        built = _built(data, prefix, compare)
        _convert_model(_Run(run, run, prefix, source, result, built))
        view = run if run is base or not compare else _merged(base, run)
        shared = _shared_kinds(data) if compare and prefix == "run." else built
        section = _Run(run, view, prefix, source, result, shared)
        _convert_moved(section)  # before the retired keys: it reads some
        _convert_delta_scale(section)
        _convert_dtype(section)
        _convert_synthetic(section)
        for key, (flag, default) in FLAGS.items():
            value = section.retire(key, lambda v, default=default: _same(v, default))
            if value is not _GONE:
                shown = flag if isinstance(value, bool) else f"{flag} {_show(value)}"
                section.note(f"{key}: {_show(value)} -> the command's flag {shown}")
        _convert_retired(section)
    if compare:
        from llada_trm.study.config import CompareConfig

        parse_config(data, source=f"{source} (converted)", schema=CompareConfig)
    else:
        parse_config(data, source=f"{source} (converted)", schema=RunConfig)
    return result


def _convert_retired(section: _Run) -> None:
    """The legacy spellings (`RENAMED`), then every retired key: dropped at its value, else with a warning."""
    run, prefix, result = section.run, section.prefix, section.result
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
    fixed = {**retired_settings(), **health_thresholds()}
    for key in sorted(_leaves(run)):
        if key == "output.best_mode":
            now = "min" if "loss" in str(_get(run, "output.save_best") or "loss") else "max"
            same, why = (lambda v, now=now: v in ("auto", now)), f"derived now: {now}"
        elif key in fixed:
            same, why = (lambda v, key=key: _same(v, fixed[key])), f"fixed at {_show(fixed[key])}"
        elif key.startswith(tuple(s + "." for s in RETIRED_SECTIONS)):  # no longer existed before either
            same, why = (lambda v: False), "the section is gone"
        else:
            continue
        value = section.retire(key, same)
        if value is not _GONE:
            section.warn(key, value, f"{why} (docs/settings.md); the converted run uses it")


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
    from llada_trm.extras.pretraining.config import PretrainConfig

    section = _Run(data, data, "", source, result, set())
    for key in PRETRAIN_RETIRED:
        now = getattr(TrainingConfig, key.split(".")[1])
        value = section.retire(key, lambda v, now=now: _same(v, now))
        if value is not _GONE:
            why = f"pretraining runs the one training loop, whose AdamW uses {_show(now)}"
            section.warn(key, value, f"{why}; the converted run uses it")
    parse_config(data, source=f"{source} (converted)", schema=PretrainConfig)
    return result


def _convert_model(section: _Run) -> None:
    """Drop the retired `model.*` keys (`config.RETIRED_MODEL`) at their value now, or when what they
    configured is not built (a slot width of an MLP-only run, `active_refiner` outside 'hybrid',
    `halting_threshold` without learned halting); refuse another value."""
    model = section.run.get("model")
    if not isinstance(model, dict):
        return
    integration = model.get("integration", "replace")
    if model.get("halting") == "learned":
        why = "learned halting left the tree (docs/levers.md names the commit that has it)"
        raise section.refuse("model.halting", "learned", f"{why}; set model.halting to confidence or none")
    k = model.get("max_recursive_steps", HybridConfig.model_fields["max_recursive_steps"].default)
    for key, now in sorted(RETIRED_MODEL.items()):
        name = key.removeprefix("model.")
        kind = name.split(".", 1)[0] if "." in name else None
        unused = (
            (kind is not None and kind not in section.built)
            or (name == "active_refiner" and integration != "hybrid")
            or (name == "cascade_mlp_steps" and integration != "cascade")
            or name == "halting_threshold"  # read only by learned halting, refused above
        )
        split = name == "cascade_mlp_steps" and isinstance(k, int)  # the split a cascade uses now: K // 2

        def same(value: Any, now: Any = now, unused: bool = unused, split: bool = split) -> bool:
            return unused or (value == k // 2 if split and isinstance(value, int) else _same(value, now))

        value = section.retire(key, same)
        if value is _GONE:
            continue
        if name == "mlp.hidden_mult" and _same(value, 2.0):  # what every shipped config set
            section.warn(key, 2.0, "the MLP is min(2 d_model, 1024) wide, the same up to d_model 512 (every "
                         "shipped backbone but LLaDA-8B; docs/settings.md)")  # fmt: skip
        else:
            why = f"no longer supported (issue 25, docs/settings.md): {_MODEL_REFUSALS[name]}"
            raise section.refuse(key, value, why)


def _refiners(model: Mapping[str, Any], refiner: Any) -> set[str]:
    """The refiner kinds a model builds: both unless it only replaces the backbone's output with one."""
    if model.get("integration", "replace") != "replace" or refiner is None:
        return set(BOTH)
    return {str(refiner)} - {"none"}


def _built(data: Mapping[str, Any], prefix: str, compare: bool) -> set[str]:
    """The refiner kinds the run at `prefix` builds: its model's, or an arm's `refiner`; both in a
    comparison's shared run (each refiner is trained from it)."""
    if compare and prefix == "run.":
        return set(BOTH)
    run = _get(data, prefix.rstrip(".")) if prefix else data
    model = run.get("model") if isinstance(run, Mapping) else None
    model = model if isinstance(model, Mapping) else {}
    if prefix.startswith("arms."):
        arm = _get(data, prefix.removesuffix("run.").rstrip("."))
        return _refiners(model, arm.get("refiner") if isinstance(arm, Mapping) else None)
    return _refiners(model, model.get("refiner", "slot"))


def _shared_kinds(data: Mapping[str, Any]) -> set[str]:
    """The refiner kinds a comparison builds from its shared `run:` update scale: those of every model it
    trains, less an arm that sets its own scale."""
    names = data.get("refiners")
    if not isinstance(names, list):
        return set(BOTH)
    base = data.get("run") if isinstance(data.get("run"), Mapping) else {}
    arms = data.get("arms") if isinstance(data.get("arms"), Mapping) else {}
    kinds: set[str] = set()
    for name in names:
        arm = arms.get(name) if isinstance(arms.get(name), Mapping) else {}
        own = arm.get("run") if isinstance(arm.get("run"), Mapping) else {}
        if _get(own, "model.delta_scale") is not None:
            continue
        integration = _get(own, "model.integration") or _get(base, "model.integration") or "replace"
        built = _refiners({"integration": integration}, str(arm.get("refiner", name)))
        kinds |= {kind for kind in built if _get(own, f"model.{kind}.delta_scale") is None}
    return kinds


# ------------------------------------------------- issue 25, training side: removed levers, moved settings


def _convert_moved(section: _Run) -> None:
    """Drop removed levers at their off value (else one error line); move the settings issue 25 replaced
    (`config.REPLACED`)."""
    for key, off in REMOVED_LEVERS.items():
        value = section.retire(key, lambda v, off=off: _same(v, off))
        if value is not _GONE:
            why = "this lever left the tree in issue 25 (docs/levers.md; commit a36ffb7 has it)"
            raise section.refuse(key, value, f"{why}; set it to {_show(off)} or remove it, then convert")
    dataset = section.value("data.dataset")
    for task in ("synthetic", "arithmetic"):  # data.<task>.n_* -> data.n_* (the selected task's)
        for name in ("n_train", "n_eval"):
            found, old = section.pop(f"data.{task}.{name}")
            if found and task == dataset and _get(section.run, f"data.{name}") is None:
                _set(section.run, f"data.{name}", old)
                section.note(f"data.{task}.{name}: {old} -> {section.prefix}data.{name}: {old}")
            elif found:
                section.drop(f"data.{task}.{name}")
    _convert_splits(section, dataset)
    _convert_epochs(section)
    _convert_batches(section, dataset)


def _convert_batches(section: _Run, dataset: Any) -> None:
    """eval_max_batches -> n_eval, sampling.batch_size -> the training batch, lora.enabled -> lora.rank."""
    run, prefix = section.run, section.prefix
    found, old = section.pop("training.eval_max_batches")
    batches = int(old) * int(section.value("training.batch_size")) if found and old is not None else None
    if batches is not None and batches < int(section.value("data.n_eval")):
        _set(run, "data.n_eval", batches)
        line = f"training.eval_max_batches: {old} -> data.n_eval: {batches} (validation reads them all)"
        section.note(line + ("" if dataset != "gsm8k" else "; GSM8K: the last problems of train now"))
    elif found:
        section.drop("training.eval_max_batches")
    batch = section.value("training.batch_size")
    old = section.retire("sampling.batch_size", lambda v: _same(v, batch))
    if old is not _GONE:
        section.warn("sampling.batch_size", old, f"the run samples in its training.batch_size ({batch}) now "
                     "(docs/settings.md)")  # fmt: skip
    found, old = section.pop("lora.enabled")
    if found and old is True:
        rank = _get(run, "lora.rank")
        _set(run, "lora.rank", 8 if rank is None else rank)  # 8: the old default rank
        section.note(f"lora.enabled: true -> {prefix}lora.rank: {_get(run, 'lora.rank')}")
    elif found:  # off: the rank it would have had is dropped with it
        section.drop("lora.enabled")
        if section.pop("lora.rank")[0]:
            section.drop("lora.rank")


def _convert_splits(section: _Run, dataset: Any) -> None:
    """GSM8K's `train_split` / `eval_split` slices -> `data.n_train` / `data.n_eval` (unused by a generated
    task: dropped). Only slices the counts express convert: the head of train, and its tail for validation."""
    run = section.run
    has_train, train = section.pop("data.train_split")
    has_eval, evaluation = section.pop("data.eval_split")
    counted = _get(run, "data.n_train") is not None or _get(run, "data.n_eval") is not None
    if not (has_train or has_eval) and counted:  # a current file: its counts say it (no slice defaults)
        return
    if dataset != "gsm8k":
        for key, has in (("train_split", has_train), ("eval_split", has_eval)):
            if has:
                section.drop(f"data.{key}")
        return
    train = train if has_train else "train[:1000]"  # the old defaults
    evaluation = evaluation if has_eval else "test[:100]"
    tail = _TAIL.match(str(evaluation)) if evaluation is not None else None
    if evaluation is not None and tail is None:
        raise ConfigError(
            f"{section.source}: {section.prefix}data.eval_split={evaluation!r}: validation now reads the "
            "last data.n_eval problems of GSM8K's train split (never test); set data.n_eval and remove "
            "data.eval_split"
        )
    n_eval = int(tail.group(1)) if tail else 0
    head, all_but = _HEAD.match(str(train)), _ALL_BUT.match(str(train))
    if head is None and all_but is None:
        raise ConfigError(
            f"{section.source}: {section.prefix}data.train_split={train!r}: training now reads the first "
            "data.n_train problems of GSM8K's train split; set data.n_train and remove data.train_split"
        )
    n_train = int(head.group(1)) if head else GSM8K_TRAIN_SIZE - int(all_but.group(1))
    _set(run, "data.n_train", n_train)
    _set(run, "data.n_eval", n_eval)
    section.note(f"data.train_split: {train!r}, data.eval_split: {evaluation!r} -> data.n_train: {n_train}, "
                 f"data.n_eval: {n_eval} (GSM8K's train split holds {GSM8K_TRAIN_SIZE})")  # fmt: skip


def _convert_epochs(section: _Run) -> None:
    """`training.num_epochs` -> `training.max_steps`: the run's length in optimizer steps (one process: the
    step count per epoch is ceil(ceil(n_train / batch) / accumulation), before over-long examples are
    skipped; `llada-trm train --dry-run` prints it)."""
    found, epochs = section.pop("training.num_epochs")
    if not found:
        return
    value = section.value
    micro = math.ceil(int(value("data.n_train")) / int(value("training.batch_size")))
    per_epoch = math.ceil(micro / int(value("training.gradient_accumulation_steps")))
    planned = int(epochs) * per_epoch
    steps = _get(section.run, "training.max_steps") or value("training.max_steps")
    total = min(int(steps), planned) if steps else planned
    if total == steps or (not steps and int(epochs) == 1):
        section.drop("training.num_epochs")
        return
    _set(section.run, "training.max_steps", total)
    section.note(f"training.num_epochs: {epochs} -> {section.prefix}training.max_steps: {total} "
                 f"({epochs} x {per_epoch})")  # fmt: skip


# ------------------------------------------------------ issue 25, the cut to 50: shared, derived, fixed


def _convert_delta_scale(section: _Run) -> None:
    """The slot's and the MLP's `delta_scale` -> the one `model.delta_scale` of the refiners this section
    configures (`section.built`); refused when those refiners ran at different scales."""
    run, prefix, kinds = section.run, section.prefix, section.built
    # read before popping: `view` may be `run` itself
    scales = {kind: _get(section.view, f"model.{kind}.delta_scale") for kind in sorted(kinds)}
    scales = {kind: DELTA_SCALE if value is None else value for kind, value in scales.items()}
    present = {kind for kind in ("slot", "mlp") if section.pop(f"model.{kind}.delta_scale")[0]}
    if not present:
        return
    if len({float(value) for value in scales.values()}) > 1:
        shown = " and ".join(f"{prefix}model.{kind}.delta_scale={_show(v)}" for kind, v in scales.items())
        raise ConfigError(
            f"{section.source}: {shown}: both refiners share model.delta_scale now (issue 25, "
            "docs/settings.md); set them equal (a comparison: each arm its own run.model.delta_scale), then "
            "convert"
        )
    used = present & kinds
    if not used:  # it configured a refiner this run does not build
        for kind in sorted(present):
            section.drop(f"model.{kind}.delta_scale")
        return
    value, current = scales[min(used)], _get(run, "model.delta_scale")
    if current is not None and not _same(value, current):
        raise ConfigError(
            f"{section.source}: {prefix}model.delta_scale={_show(current)} and the old "
            f"{prefix}model.{min(used)}.delta_scale={_show(value)} differ; keep one"
        )
    _set(run, "model.delta_scale", value)
    for kind in sorted(present):
        if kind in used:
            section.note(f"model.{kind}.delta_scale: {_show(value)} -> model.delta_scale")
        else:
            section.drop(f"model.{kind}.delta_scale")


def _convert_dtype(section: _Run) -> None:
    """`model.dtype`: derived now (`build.choose_backbone_dtype`); dropped at 'auto', or at float32 where the
    backbone trains (phases 2-3 without LoRA: what 'auto' gives there), else dropped with a warning."""
    phase = _get(section.view, "training.phase") or 1
    enabled = _get(section.view, "lora.enabled")  # before issue 25; since, lora.rank > 0
    lora = enabled is True or (enabled is None and bool(_get(section.view, "lora.rank")))
    trained = phase != 1 and not lora
    value = section.retire("model.dtype", lambda v: v == "auto" or (v == "float32" and trained))
    if value is not _GONE:
        why = (
            "derived now (fp32 when the backbone trains, bf16 under bf16 compute, else as its checkpoint "
            "stores it or fp32; docs/settings.md); the converted run uses it"
        )
        section.warn("model.dtype", value, why)


def _convert_synthetic(section: _Run) -> None:
    """The GSM8K-style task's knobs: dropped at the fixed task's values or when another dataset is used;
    another task is refused (the run would train and be tested on other problems)."""
    other = (_get(section.view, "data.dataset") or "synthetic") != "synthetic"
    for name in _SYNTHETIC_FIXED:
        fixed = getattr(SyntheticDataConfig, name)
        value = section.retire(f"data.synthetic.{name}", lambda v, fixed=fixed: other or _same(v, fixed))
        if value is not _GONE:
            why = (
                "the GSM8K-style task is fixed now at the embedded backbone's (1-2 steps, numbers up to 12, "
                "results up to 100; issue 25, docs/settings.md); a study that varies the task uses "
                "data.dataset: arithmetic"
            )
            raise section.refuse(f"data.synthetic.{name}", value, why)


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
    if not (conversion.dropped or conversion.warnings or conversion.renamed):
        echo(f"{name}: already current")


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


# ------------------------------------------------------------------------------------------------ helpers


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = plain(base)
    for key, val in over.items():
        nested = isinstance(val, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], val) if nested else val
    return out


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
