"""What a resume may change: a resumed run restores the checkpoint's run exactly, applies a changed setting
in `RESUMABLE` exactly from the resumed step on (`retarget_optimizer` for the optimiser and its schedule), or
refuses in one line: never a silent mix (docs/training.md, "Resuming").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.optim.lr_scheduler import LambdaLR

from llada_trm.config import RunConfig, parse_config
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.run_checkpoint import CONFIG_FILE
from llada_trm.schema import CONVERT_HINT

RESUMABLE: tuple[str, ...] = (
    # the optimiser and its schedule: re-targeted on the restored optimizer and scheduler
    "training.lr",
    "training.backbone_lr",
    "training.warmup_steps",
    # the run's length: the schedule decays towards the new total
    "training.max_steps",
    # the batch geometry: the epoch continues at the same global example position
    "training.batch_size",
    "training.gradient_accumulation_steps",
    # bookkeeping and where it runs (the retired constants and the command's flags are no settings a
    # checkpoint's config.yaml records, so they never differ)
    "training.eval_every",
    "training.save_every",
    "training.mixed_precision",
    "output.dir",
)
"""Dotted settings a resume may change; an entry ending in '.' covers a whole section."""


def resumable(key: str, allowed: Sequence[str] = RESUMABLE) -> bool:
    return any(key == entry or (entry.endswith(".") and key.startswith(entry)) for entry in allowed)


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every dotted setting that differs between two flat configs."""
    differ = [k for k in sorted({*saved, *now}) if (k in saved, saved.get(k)) != (k in now, now.get(k))]
    return [(k, saved.get(k), now.get(k)) for k in differ]


def check_config_changes(directory: Path, config: RunConfig) -> list[str]:
    """Compare this run's config with the checkpoint's: refuse a change outside `RESUMABLE` (one line
    listing them all and the fix), return the allowed changes as 'key: old -> new'."""
    saved = saved_settings(directory / CONFIG_FILE)
    fix = (
        "start a new run (another output.dir, or --force without --resume) initialised from it with "
        "training.init_from"
    )
    return refuse_changes(directory, saved, flatten_settings(_plain(config)), RESUMABLE, fix)


def refuse_changes(
    directory: Path, saved: Mapping[str, Any], now: Mapping[str, Any], allowed: Sequence[str], fix: str
) -> list[str]:
    """The changes between two flat configs as 'key (old -> new)'; a `CheckpointError` (one line, every
    refused key, `fix`) when one is not in `allowed`. Shared by every command that resumes."""
    changes = changed_settings(saved, now)
    refused = [_show(change) for change in changes if not resumable(change[0], allowed)]
    if refused:
        shown = ", ".join(refused[:8]) + (f" (+{len(refused) - 8} more)" if len(refused) > 8 else "")
        raise CheckpointError(
            f"{directory}: {len(refused)} settings cannot change on resume: {shown}; --set them back to the "
            f"checkpoint's values, or {fix}"
        )
    return [_show(change) for change in changes]


def retarget_optimizer(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, fresh: Sequence[Mapping[str, Any]]
) -> None:
    """Put this run's hyperparameters back into a restored optimizer, and its base LRs into the scheduler.

    `fresh` is every group's settings as this run's config built them, read before the checkpoint's state
    was loaded over them. The next step's LR is recomputed from the new base LR and the restored schedule
    position, exactly as `LambdaLR` computes it, so that an unchanged config resumes bit-identically and a
    changed `training.lr` trains at the new LR from the resumed step on.
    """
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update({key: value for key, value in settings.items() if key != "lr"})
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    step = scheduler.last_epoch
    groups = optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ------------------------------------------------------------------------------------------------ helpers


def saved_settings(path: Path) -> dict[str, Any]:
    """The checkpoint's config, flat, with this version's defaults filled in where it validates."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(exc).split())})") from None
    try:
        return flatten_settings(_plain(parse_config(raw, source=str(path))))
    except ConfigError as exc:
        if CONVERT_HINT in str(exc):  # written before settings were retired (issue 25): convert it first
            raise CheckpointError(str(exc)) from None
        return flatten_settings(raw)  # an older schema: compare what it says


def _plain(config: RunConfig) -> dict[str, Any]:
    return yaml.safe_load(config.to_yaml())


def flatten_settings(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _show(change: tuple[str, Any, Any]) -> str:
    key, old, new = change
    return f"{key} ({old!r} -> {new!r})"
