"""A run's LoRA adapters (`lora:` in the run config): which blocks get them, attached before freezing.

The mechanism (peft, names, merging) is `llada_trm.backbone.lora`; this module only maps a run's settings
onto it. The blocks follow the phase, as full fine-tuning's do (`training.freezing`): phase 2 adapts the last
`training.unfreeze_last_n_layers` blocks, phase 3 every block. Once attached, `freezing.apply_freezing` sees
the adapters and trains them (at `backbone_lr`) instead of the base weights, which stay frozen; the adapters
are then trainable tensors like any other, so checkpoints save them (and only them) in `model.safetensors`,
and resume, DDP and evaluation need nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llada_trm.backbone.lora import add_lora
from llada_trm.training.freezing import last_block_indices

if TYPE_CHECKING:
    from llada_trm.config import RunConfig
    from llada_trm.hybrid import LLaDATRMHybrid

__all__ = ["attach_run_lora", "lora_layers"]


def lora_layers(config: RunConfig, n_blocks: int) -> list[int]:
    """The block indices a run adapts: the phase-2 blocks (the last `unfreeze_last_n_layers`) or all."""
    if config.training.phase == 3:
        return list(range(n_blocks))
    return last_block_indices(n_blocks, config.training.unfreeze_last_n_layers)


def attach_run_lora(model: LLaDATRMHybrid, config: RunConfig) -> list[str]:
    """Attach the run's adapters to `model.backbone` when `lora.enabled`; their names in `model` (or [])."""
    settings = config.lora
    if not settings.enabled:
        return []
    names = add_lora(
        model.backbone,
        lora_layers(config, len(model.backbone.blocks)),
        rank=settings.rank,
        alpha=settings.alpha,
        dropout=settings.dropout,
        targets=settings.target_modules,
    )
    return [f"backbone.{name}" for name in names]
