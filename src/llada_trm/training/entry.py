"""The `llada-trm train` command: a config file and overrides in, a trained (or resumed) run out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llada_trm.build import overlap_warning
from llada_trm.config import load_config
from llada_trm.dist_utils import is_main_process
from llada_trm.errors import ConfigError
from llada_trm.training.run_dir import claim_run_dir
from llada_trm.training.trainer import Trainer

__all__ = ["run_train", "trainer_from_cli"]

logger = logging.getLogger("llada_trm")


def trainer_from_cli(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    allow_backbone_mismatch: bool = False,
) -> Trainer:
    """Load the YAML with `--set` overrides, build the trainer, and restore `--resume DIR` if given.

    A new run into a directory holding another run refuses here, before the model loads (or, with
    `force`, archives the old run).
    """
    config = load_config(config_path, overrides)
    warning = overlap_warning(config) if is_main_process() else None
    if warning:
        logger.warning("warning: data: %s", warning)
    if resume is not None and force:
        raise ConfigError("--force starts a new run and --resume continues one; give only one of them")
    if resume is None and not force and is_main_process():
        claim_run_dir(config.output.dir)
    trainer = Trainer(
        config, progress=progress, force=force, allow_backbone_mismatch=allow_backbone_mismatch
    )
    if resume is not None:
        trainer.resume(resume)
    return trainer


def run_train(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
    *,
    progress: bool = True,
    force: bool = False,
    allow_backbone_mismatch: bool = False,
) -> dict[str, Any]:
    """The `llada-trm train --config FILE [--set k=v ...] [--resume DIR | --force]` command.

    Raises `ConfigError` / `CheckpointError` (bad input, one line) and `NonFiniteLossError` (divergence).
    """
    return trainer_from_cli(
        config_path, overrides, resume, progress=progress, force=force,
        allow_backbone_mismatch=allow_backbone_mismatch,
    ).train()
