"""`training.init_from`: start a run from another run's trained weights (e.g. phase 2/3 from phase 1).

Unlike `--resume`, which continues a run (optimizer, scheduler, RNG streams, step), this only copies the
weights a checkpoint saved into the freshly built model before training starts: the refiner's tensors, and the
backbone's when the checkpoint trained some (phases 2/3). Everything else starts anew from the run's own
config. The checkpoint must have been trained with the same refiner (`model.refiner` / `model.integration`)
and on the same backbone (its recorded fingerprint, `backbone.fingerprint`; `allow_backbone_mismatch`
overrides), and hold every refiner tensor; tensor names, shapes and values are checked by `load_weights`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
import yaml

from llada_trm.backbone.fingerprint import directory_fingerprint
from llada_trm.config import RunConfig
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.hybrid.model import PREFIX as REFINER_PREFIX
from llada_trm.run_checkpoint import (
    CONFIG_FILE,
    check_run_backbone,
    load_weights,
    refiner_names,
    resolve_checkpoint_dir,
)

__all__ = ["INIT_FROM_KEY", "REFINER_PREFIX", "InitResult", "init_from_checkpoint", "init_from_config"]

INIT_FROM_KEY = "training.init_from"
_KIND_KEYS = ("refiner", "integration")

logger = logging.getLogger("llada_trm")


@dataclass(frozen=True)
class InitResult:
    """Which checkpoint was read and the tensors copied from it (so later checkpoints can keep them)."""

    directory: Path
    names: list[str]

    @property
    def backbone_names(self) -> list[str]:
        """Loaded tensors outside the refiner: a frozen backbone no longer equals `model.backbone`'s files."""
        return [name for name in self.names if not name.startswith(REFINER_PREFIX)]


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    config: RunConfig,
    *,
    backbone_dir: Path,
    allow_backbone_mismatch: bool = False,
) -> InitResult:
    """Copy a checkpoint's saved weights into `model` (built on `backbone_dir`); one-line
    `CheckpointError`s name the key and file."""
    try:
        directory = resolve_checkpoint_dir(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{INIT_FROM_KEY}: {exc}") from None
    _check_refiner_kind(directory / CONFIG_FILE, config)
    try:  # the refiner's every tensor: one the checkpoint lacked would start this run from noise
        fingerprint = directory_fingerprint(backbone_dir)
        check_run_backbone(directory, fingerprint, backbone_dir, allow_mismatch=allow_backbone_mismatch)
        names = load_weights(model, directory, require=refiner_names(model.state_dict()))
    except CheckpointError as exc:  # the same type (a BackboneMismatchError stays one), the key in front
        raise type(exc)(f"{INIT_FROM_KEY}: {exc}") from None
    return InitResult(directory=directory, names=names)


def init_from_config(
    model: nn.Module, config: RunConfig, *, backbone_dir: Path, allow_backbone_mismatch: bool = False
) -> InitResult | None:
    """`training.init_from` of a run (built on `backbone_dir`), loaded before any wrapping or sharding;
    None when unset.

    A feature cache fingerprints `model.backbone`'s files, so a run that caches may take refiner tensors
    from another run but not backbone tensors (its cache would describe a backbone it no longer has).
    """
    source = config.training.init_from
    if source is None:
        return None
    result = init_from_checkpoint(
        model, Path(source).expanduser(), config, backbone_dir=backbone_dir,
        allow_backbone_mismatch=allow_backbone_mismatch,
    )
    if config.advanced.feature_cache and result.backbone_names:
        raise ConfigError(
            f"advanced.feature_cache: training.init_from {result.directory} holds backbone tensors, "
            "which the cache's fingerprint of model.backbone does not see; train without the cache"
        )
    return result


def _check_refiner_kind(config_path: Path, config: RunConfig) -> None:
    """The saved run must have built the same refiner(s), or its tensors would not mean the same thing."""
    try:
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{INIT_FROM_KEY}: {config_path}: unreadable ({detail})") from None
    model = saved.get("model") if isinstance(saved, dict) else None
    model = model if isinstance(model, dict) else {}
    for key in _KIND_KEYS:
        theirs, ours = model.get(key), getattr(config.model, key)
        if theirs is not None and theirs != ours:
            raise CheckpointError(
                f"{INIT_FROM_KEY}: {config_path} was trained with model.{key}: {theirs}, this run has "
                f"model.{key}: {ours}; set them alike or point {INIT_FROM_KEY} at a matching run"
            )
