"""The trainable side of a run, assembled in the order the trainer needs it (the loop lives in `trainer`).

`build_training_model`: backbone + refiners (`llada_trm.build`), `training.init_from`, the backbone options,
the phase's freezing plan, the loss weights, and the objective wrapped for DDP/FSDP. `feature_cache_for_run`:
the phase-1 feature cache when `advanced.feature_cache` (built, resumed or opened). `build_run_optimizer`:
AdamW over the plan's groups (as FSDP re-read them) and the warmup-cosine schedule over the run's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llada_trm.backbone.fingerprint import directory_fingerprint
from llada_trm.backbone.lora import attach_run_lora
from llada_trm.build import apply_backbone_options, backbone_dtype, build_model
from llada_trm.config import RunConfig, TrainingConfig
from llada_trm.data import SFTDataset
from llada_trm.diffusion.targeted_masks import TrainingMasks
from llada_trm.dist_utils import rank, world_size
from llada_trm.hybrid import LLaDATRMHybrid
from llada_trm.run_checkpoint import init_from_config
from llada_trm.training.distributed import TrainStep, resolve_strategy, wrap_run
from llada_trm.training.feature_cache import FeatureCache, prepare_feature_cache, require_frozen_backbone
from llada_trm.training.freezing import FreezePlan, freeze_for_run
from llada_trm.training.objective import LossWeights, diffusion_objective
from llada_trm.training.sampler_state_batches import StateMix
from llada_trm.training.sampler_states import prepare_sampler_states
from llada_trm.training.schedule import build_optimizer, build_scheduler, resolve_warmup_steps
from llada_trm.training.unroll import DenoisingUnroll

__all__ = [
    "RunOptimizer",
    "TrainingModel",
    "build_run_optimizer",
    "build_training_model",
    "feature_cache_for_run",
    "sampler_state_mix_for_run",
]


@dataclass
class TrainingModel:
    """The model side of a run. `init_names`: the tensors `training.init_from` loaded (this run's
    checkpoints save them too); `engine`: the objective step, wrapped for the distributed `strategy`."""

    model: LLaDATRMHybrid
    tokenizer: PreTrainedTokenizerBase
    backbone_dir: Path
    backbone_fingerprint: str
    init_names: list[str]
    plan: FreezePlan
    weights: LossWeights
    strategy: str
    engine: nn.Module


def build_training_model(
    config: RunConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    say: Callable[[str], None],
    *,
    allow_backbone_mismatch: bool = False,
) -> TrainingModel:
    """Backbone + refiners from `model.backbone`, `training.init_from`, LoRA adapters (`lora:`), then the
    phase's freezing.

    The backbone's fingerprint (of its files, `backbone.fingerprint`) is what the run's checkpoints record.
    """
    built = build_model(config, device=device, dtype=backbone_dtype(config, amp_dtype))
    model = built.model
    # init_from loads before any wrapping or sharding; the loaded names are saved by this run's
    # checkpoints too, trained or not (a phase-1 run from a phase-3 checkpoint keeps its backbone).
    loaded = init_from_config(
        model, config, backbone_dir=built.backbone_dir, allow_backbone_mismatch=allow_backbone_mismatch
    )
    if loaded is not None:
        say(f"initialised {len(loaded.names)} tensors from {loaded.directory} (training.init_from)")
    adapters = attach_run_lora(model, config)  # after init_from: it loads the base weights' own names
    if adapters:
        targets = ", ".join(config.lora.target_modules)
        say(f"lora: {len(adapters)} adapter tensors of rank {config.lora.rank} on the backbone's {targets}")
    apply_backbone_options(model, config)
    plan = freeze_for_run(model, config)
    weights = LossWeights.from_params(config.training_params)
    # Last: FSDP swaps every parameter for its shard, and the optimizer is built from what it leaves.
    strategy = resolve_strategy(config.advanced.distributed, phase=config.training.phase)
    step = TrainStep(
        model,
        diffusion_objective,
        mask_id=model.mask_token_id,
        weights=weights,
        backbone_frozen=plan.backbone_frozen,
        chunk_size=config.model.chunk_size,
        unroll=DenoisingUnroll.for_run(config),
    )
    return TrainingModel(
        model=model,
        tokenizer=built.tokenizer,
        backbone_dir=built.backbone_dir,
        backbone_fingerprint=directory_fingerprint(built.backbone_dir),
        init_names=loaded.names if loaded is not None else [],
        plan=plan,
        weights=weights,
        strategy=strategy,
        engine=wrap_run(step, plan, strategy, device=device, param_dtype=amp_dtype),
    )


def feature_cache_for_run(  # noqa: PLR0913 - the run, its model, data and masks
    config: RunConfig,
    model: LLaDATRMHybrid,
    plan: FreezePlan,
    backbone_dir: Path,
    train_set: SFTDataset,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    progress: bool,
    masks: TrainingMasks | None = None,
) -> FeatureCache | None:
    """The run's feature cache when `advanced.feature_cache` (phase 1 reads the backbone's outputs from
    disk), else None; a plan that trains backbone parameters is refused."""
    if not config.advanced.feature_cache:
        return None
    require_frozen_backbone(plan)
    return prepare_feature_cache(
        config,
        model,
        train_set.examples,
        backbone_dir=backbone_dir,
        pad_id=train_set.pad_id,
        device=device,
        autocast_dtype=amp_dtype,
        progress=progress,
        masks=masks,
    )


def sampler_state_mix_for_run(
    config: RunConfig,
    model: LLaDATRMHybrid,
    plan: FreezePlan,
    backbone_dir: Path,
    train_set: SFTDataset,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    *,
    progress: bool,
) -> StateMix | None:
    """The run's mix of sampler states into its epochs when `training.sampler_state_ratio` > 0 (the store
    built, resumed or opened first), else None; a plan that trains backbone parameters is refused."""
    t = config.training
    if t.sampler_state_ratio <= 0:
        return None
    require_frozen_backbone(plan, "training.sampler_state_ratio")
    states = prepare_sampler_states(
        config,
        model,
        train_set.examples,
        tokenizer=tokenizer,
        backbone_dir=backbone_dir,
        pad_id=train_set.pad_id,
        device=device,
        progress=progress,
    )
    shard = {"rank": rank(), "world_size": world_size()}
    return StateMix(states, t.sampler_state_ratio, seed=t.seed, batch_size=t.batch_size, **shard)


@dataclass
class RunOptimizer:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    warmup_steps: int


def build_run_optimizer(plan: FreezePlan, training: TrainingConfig, total_steps: int) -> RunOptimizer:
    """AdamW over `plan`'s groups; linear warmup then cosine decay over `total_steps`."""
    t = training
    warmup_steps = resolve_warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio)
    optimizer = build_optimizer(plan.groups, weight_decay=t.weight_decay, betas=t.adam_betas, eps=t.adam_eps)
    scheduler = build_scheduler(
        optimizer, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=t.min_lr_ratio
    )
    return RunOptimizer(optimizer, scheduler, warmup_steps)
