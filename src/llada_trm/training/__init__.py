"""Training the refiner: freezing and phases, objective, schedules, checkpoints, metrics, health checks, and
the phase-1 feature cache (docs/feature_cache.md). The run's parts are built by `llada_trm.build`.

The CLI's `llada-trm train --config FILE [--set k=v ...] [--resume DIR]` is `run_train(FILE, overrides, DIR)`;
`llada-trm cache --config FILE` is `build_feature_cache(config)`.
"""

from llada_trm.diffusion.forward_process import draw_for_epoch, draw_noise, noise_seed
from llada_trm.dist_utils import is_distributed, is_main_process, rank, world_size
from llada_trm.run_checkpoint import (
    InitResult,
    TrainState,
    capture_rng_state,
    init_from_checkpoint,
    init_from_config,
    load_trainer_state,
    load_weights,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from llada_trm.training.entry import run_train, trainer_from_cli
from llada_trm.training.feature_cache import (
    CACHE_FORMAT_VERSION,
    MANIFEST_FILE,
    FeatureCache,
    FeatureSpec,
    NoiseSpec,
    StaleFeatureCacheError,
    backbone_fingerprint,
    build_feature_cache,
    cache_directory,
    cached_features,
    data_fingerprint,
    expected_manifest,
    open_feature_cache,
    prepare_feature_cache,
    require_frozen_backbone,
    write_feature_cache,
)
from llada_trm.training.freezing import (
    FreezePlan,
    ParamGroupSpec,
    apply_freezing,
    freeze_report,
    match_pattern,
    matching_parameters,
    set_train_mode,
)
from llada_trm.training.health import CHECKS, HealthMonitor
from llada_trm.training.metrics import TRAIN_COLUMNS, VALIDATION_COLUMNS, MetricsWriter
from llada_trm.training.objective import LossWeights, ObjectiveResult, diffusion_objective
from llada_trm.training.schedule import (
    build_optimizer,
    build_scheduler,
    resolve_warmup_steps,
    warmup_cosine,
)
from llada_trm.training.stats import forward_statistics, gate_values, parameter_statistics
from llada_trm.training.trainer import (
    Trainer,
    hybrid_config,
    resolve_backbone_dir,
    resolve_device,
    resolve_precision,
    seed_everything,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CHECKS",
    "MANIFEST_FILE",
    "TRAIN_COLUMNS",
    "VALIDATION_COLUMNS",
    "FeatureCache",
    "FeatureSpec",
    "FreezePlan",
    "HealthMonitor",
    "InitResult",
    "LossWeights",
    "NoiseSpec",
    "MetricsWriter",
    "ObjectiveResult",
    "ParamGroupSpec",
    "StaleFeatureCacheError",
    "TrainState",
    "Trainer",
    "apply_freezing",
    "backbone_fingerprint",
    "build_feature_cache",
    "build_optimizer",
    "build_scheduler",
    "cache_directory",
    "cached_features",
    "capture_rng_state",
    "data_fingerprint",
    "diffusion_objective",
    "draw_for_epoch",
    "draw_noise",
    "expected_manifest",
    "forward_statistics",
    "freeze_report",
    "gate_values",
    "hybrid_config",
    "init_from_checkpoint",
    "init_from_config",
    "is_distributed",
    "is_main_process",
    "load_trainer_state",
    "load_weights",
    "match_pattern",
    "matching_parameters",
    "noise_seed",
    "open_feature_cache",
    "parameter_statistics",
    "prepare_feature_cache",
    "rank",
    "require_frozen_backbone",
    "resolve_backbone_dir",
    "resolve_checkpoint_dir",
    "resolve_device",
    "resolve_precision",
    "resolve_warmup_steps",
    "restore_rng_state",
    "run_train",
    "trainer_from_cli",
    "save_checkpoint",
    "seed_everything",
    "set_train_mode",
    "warmup_cosine",
    "world_size",
    "write_feature_cache",
]
