"""The training workflow: a `RunConfig` in; metrics CSVs, checkpoints and a summary out.

    Trainer(config).train()                       # a fresh run
    Trainer(config).resume(dir).train()           # continue exactly where a checkpoint left off
    run_train("configs/tiny_refiner.yaml", ["training.lr=3e-4"], resume=None)   # what the CLI calls

One optimizer step = `gradient_accumulation_steps` micro-batches. Logging, validation and checkpointing
happen on optimizer-step boundaries, so a checkpoint always sits between two steps and a resumed run
replays nothing and skips nothing: model, optimizer, scheduler, every RNG stream and the position in the
epoch's (seed, epoch)-determined order are restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from llada_trm.config import RunConfig, load_config, save_config
from llada_trm.data import load_tokenizer, mask_token_id
from llada_trm.diffusion import forward_process, masked_diffusion_loss
from llada_trm.errors import CheckpointError, ConfigError, NonFiniteLossError
from llada_trm.hybrid import HybridConfig, LLaDATRMHybrid
from llada_trm.hybrid.chunking import chunk_sum
from llada_trm.training.checkpoint import (
    TrainState,
    capture_rng_state,
    load_trainer_state,
    load_weights,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from llada_trm.training.data import EpochSampler, build_datasets, make_loader
from llada_trm.training.distributed import (
    TrainStep,
    all_finite,
    broadcast_object,
    clip_grad_norm,
    full_state_dict,
    gradient_sync,
    init_distributed,
    is_main_process,
    is_sharded,
    load_optimizer_state,
    load_sharded_weights,
    optimizer_state,
    rank,
    reduce_sums,
    resolve_strategy,
    sync_ignored_gradients,
    unsharded,
    world_size,
    wrap_for_training,
)
from llada_trm.training.feature_cache import (
    DrawSampler,
    FeatureCache,
    cached_features,
    draw_noise,
    prepare_feature_cache,
)
from llada_trm.training.freezing import apply_freezing, set_train_mode
from llada_trm.training.health import HealthMonitor
from llada_trm.training.init_from import init_from_checkpoint
from llada_trm.training.metrics import TRAIN_COLUMNS, VALIDATION_COLUMNS, MetricsWriter
from llada_trm.training.objective import LossWeights, diffusion_objective
from llada_trm.training.schedule import build_optimizer, build_scheduler, resolve_warmup_steps
from llada_trm.training.stats import forward_statistics, parameter_statistics

__all__ = [
    "Trainer",
    "resolve_backbone_dir",
    "resolve_device",
    "resolve_precision",
    "run_train",
    "seed_everything",
]

logger = logging.getLogger("llada_trm")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------ environment


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: 'cuda' asked for, but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' = bf16 on a bf16-capable GPU, fp32 on a CPU."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mixed_precision == "fp32":
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if device.type == "cuda" and not bf16_gpu:
        raise ConfigError("training.mixed_precision: this GPU has no bf16 support; use fp32 (or auto)")
    return torch.bfloat16


def resolve_backbone_dir(backbone: str) -> Path:
    """`model.backbone` as a directory: 'embedded' (the package's tiny backbone) or a local path."""
    if backbone == "embedded":
        try:
            from llada_trm.assets import embedded_backbone_dir
        except ImportError:
            raise ConfigError(
                "model.backbone: 'embedded' needs the packaged tiny backbone (llada_trm.assets), which this "
                "installation lacks; give the path of an HF-layout checkpoint directory instead"
            ) from None
        path = Path(embedded_backbone_dir())
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.backbone: the embedded backbone is missing from this installation ({path}); "
                "re-create it with `llada-trm pretrain --config configs/tiny_backbone.yaml`"
            )
        return path
    path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.backbone: {backbone!r} is not a checkpoint directory with config.json; download one, "
            "e.g. `huggingface-cli download GSAI-ML/LLaDA-8B-Instruct --local-dir "
            "checkpoints/LLaDA-8B-Instruct`, or use 'embedded'"
        )
    return path


def hybrid_config(config: RunConfig) -> HybridConfig:
    """The `model` section as the hybrid model's own config (unset widths stay derived from the backbone)."""
    return config.model.hybrid()


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds the model, data, freezing plan, optimizer and schedule of a run, then trains it."""

    def __init__(self, config: RunConfig, *, progress: bool = True):
        self.config = config
        self.progress = progress
        self._check_save_best()
        self._config_yaml = config.to_yaml()
        self.device = init_distributed(resolve_device(config.training.device))  # per rank under torchrun
        self.amp_dtype = resolve_precision(config.training.mixed_precision, self.device)
        seed_everything(config.training.seed)

        self._build_model()
        self._build_data()
        self._build_optimization()

        self.state = TrainState()
        self._window = _Averager()  # metrics since the last logged row (checkpointed: rows survive a resume)
        self._window_tokens = 0
        self.health = HealthMonitor(
            config.advanced.health,
            enabled=config.advanced.health_checks,
            confidence_threshold=config.model.confidence_threshold,
        )
        self.output_dir = Path(config.output.dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.last_train_row: dict[str, Any] = {}
        self.last_val_row: dict[str, Any] = {}
        self._say(self.plan.report())
        validation = f", {len(self.eval_set)} validation examples" if self.eval_set is not None else ""
        precision = f"autocast {self.amp_dtype}" if self.amp_dtype else "fp32"
        self._say(
            f"data: {len(self.train_set)} training examples{validation}; {self.steps_per_epoch} optimizer "
            f"steps per epoch, {self.total_steps} in all ({self.warmup_steps} warmup); device {self.device}, "
            f"{precision}" + (f"; {world_size()} processes, {self.strategy}" if world_size() > 1 else "")
        )

    def _build_model(self) -> None:
        """Backbone + refiners from `model.backbone`, the tokenizer beside it, then the phase's freezing."""
        config = self.config
        backbone_dir = resolve_backbone_dir(config.model.backbone)
        try:
            self.tokenizer = load_tokenizer(backbone_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"model.backbone: cannot load its tokenizer ({exc})") from None
        try:
            self.model = LLaDATRMHybrid.from_pretrained(
                backbone_dir, hybrid_config(config), dtype=self._backbone_dtype(), device=self.device
            )
        except ConfigError as exc:
            raise ConfigError(f"model: {exc}") from None
        self.mask_id = self.model.mask_token_id
        if mask_token_id(self.tokenizer) != self.mask_id:
            raise ConfigError(
                f"model.backbone: the tokenizer's mask token id {mask_token_id(self.tokenizer)} differs from "
                f"the backbone's mask_token_id {self.mask_id}; they must come from the same checkpoint"
            )
        self._init_weights()
        if config.advanced.gradient_checkpointing:
            self.model.backbone.gradient_checkpointing = True
        if config.advanced.compile:
            self.model.backbone.compile()

        t, p = config.training, config.training_params
        self.plan = apply_freezing(
            self.model,
            phase=t.phase,
            trainable_modules=p.trainable_modules,
            lr=t.lr,
            backbone_lr=t.backbone_lr,
            unfreeze_last_n_layers=t.unfreeze_last_n_layers,
            train_layer_norms=p.train_layer_norms,
            train_refiner_blocks=p.train_refiner_blocks,
        )
        self.weights = LossWeights(
            deep_supervision=p.deep_supervision_weight,
            orthogonality=p.orthogonality_weight,
            calibration=p.confidence_calibration_weight,
        )
        self._wrap_for_distribution()

    def _init_weights(self) -> None:
        """`training.init_from`: another run's saved weights, loaded before any wrapping or sharding.

        The loaded names are kept so that this run's checkpoints save them too, trained or not: a phase-1 run
        started from a phase-3 checkpoint must not lose the backbone it was started from.
        """
        self.init_names: list[str] = []
        source = self.config.training.init_from
        if source is None:
            return
        result = init_from_checkpoint(self.model, Path(source).expanduser(), self.config)
        if self.config.advanced.feature_cache and result.backbone_names:
            raise ConfigError(
                f"advanced.feature_cache: training.init_from {result.directory} holds backbone tensors, "
                "which the cache's fingerprint of model.backbone does not see; train without the cache"
            )
        self.init_names = result.names
        self._say(f"initialised {len(result.names)} tensors from {result.directory} (training.init_from)")

    def _wrap_for_distribution(self) -> None:
        """`self.engine`: the objective as a module, alone, in DDP or sharded by FSDP (docs/distributed.md).

        FSDP swaps every parameter for its shard, so the plan's groups are re-read before the optimizer is
        built from them.
        """
        self.strategy = resolve_strategy(self.config.advanced.distributed, phase=self.config.training.phase)
        step = TrainStep(
            self.model,
            diffusion_objective,
            mask_id=self.mask_id,
            weights=self.weights,
            backbone_frozen=self.plan.backbone_frozen,
            chunk_size=self.config.model.chunk_size,
        )
        self.engine = wrap_for_training(
            step,
            self.strategy,
            device=self.device,
            blocks=list(self.model.backbone.blocks),
            param_dtype=self.amp_dtype,
        )
        if self.strategy == "fsdp":
            params = dict(self.model.named_parameters())
            for group in self.plan.groups:
                group.params = {name: params[name] for name in group.params}

    def _build_data(self) -> None:
        """Datasets, the resumable sampler and the loaders; the epoch geometry follows from them."""
        data, t = self.config.data, self.config.training
        self.train_set, self.eval_set = build_datasets(data, self.tokenizer)
        self.sampler = EpochSampler(len(self.train_set), seed=t.seed, rank=rank(), world_size=world_size())
        loader_args = {
            "batch_size": t.batch_size,
            "num_workers": data.num_workers,
            "pin_memory": data.pin_memory and self.device.type == "cuda",
            "seed": t.seed,
        }
        self.feature_cache: FeatureCache | None = None
        if self.config.advanced.feature_cache:  # phase 1 reads the backbone's outputs from disk
            self.feature_cache = self._open_feature_cache()
            draws = DrawSampler(self.sampler, self.feature_cache.n_draws)
            self.train_loader = make_loader(self.feature_cache, sampler=draws, **loader_args)
        else:
            self.train_loader = make_loader(self.train_set, sampler=self.sampler, **loader_args)
        self.eval_loader = None
        if self.eval_set is not None:
            in_order = EpochSampler(len(self.eval_set), seed=t.seed, shuffle=False)
            self.eval_loader = make_loader(self.eval_set, sampler=in_order, **loader_args)
        self.micro_per_epoch = math.ceil(self.sampler.shard_size / t.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / t.gradient_accumulation_steps)
        planned = self.steps_per_epoch * t.num_epochs
        self.total_steps = min(planned, t.max_steps) if t.max_steps else planned

    def _open_feature_cache(self) -> FeatureCache:
        if not self.plan.backbone_frozen:
            raise ConfigError(
                "advanced.feature_cache: the cache holds a frozen backbone's outputs, but this run trains "
                "backbone parameters; use training.phase 1 with trainable_modules inside refinement_head"
            )
        return prepare_feature_cache(
            self.config,
            self.model,
            self.train_set.examples,
            backbone_dir=resolve_backbone_dir(self.config.model.backbone),
            pad_id=self.train_set.pad_id,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            progress=self.progress and is_main_process(),
        )

    def _build_optimization(self) -> None:
        t = self.config.training
        self.warmup_steps = resolve_warmup_steps(self.total_steps, t.warmup_steps, t.warmup_ratio)
        self.optimizer = build_optimizer(
            self.plan.groups, weight_decay=t.weight_decay, betas=t.adam_betas, eps=t.adam_eps
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            min_ratio=t.min_lr_ratio,
        )

    # --------------------------------------------------------------------------------- construction

    @classmethod
    def from_cli(
        cls,
        config_path: str | Path,
        overrides: Sequence[str] = (),
        resume: str | Path | None = None,
        *,
        progress: bool = True,
    ) -> Trainer:
        """Load the YAML with `--set` overrides, build the trainer, and restore `--resume DIR` if given."""
        trainer = cls(load_config(config_path, overrides), progress=progress)
        if resume is not None:
            trainer.resume(resume)
        return trainer

    def _backbone_dtype(self) -> torch.dtype:
        """'auto': bf16 for a frozen backbone under bf16 autocast (half the memory), otherwise fp32."""
        name = self.config.model.dtype
        if name != "auto":
            return _DTYPES[name]
        frozen = self.config.training.phase == 1
        return torch.bfloat16 if (self.amp_dtype == torch.bfloat16 and frozen) else torch.float32

    def _check_save_best(self) -> None:
        k = self.config.model.max_recursive_steps if self.config.model.refiner != "none" else 0
        known = set(VALIDATION_COLUMNS) | {"chunk_accuracy", "chunk_accuracy_base"}
        known |= {f"{kind}_step_{i}" for kind in ("accuracy", "chunk_accuracy") for i in range(1, k + 1)}
        name = self.config.output.save_best
        if name not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(f"output.save_best: {name!r} is not a validation metric; choose from {choices}")

    # ---------------------------------------------------------------------------------------- resume

    def resume(self, path: str | Path) -> Trainer:
        """Restore trainable weights, optimizer, scheduler, RNG states and the data position."""
        directory = resolve_checkpoint_dir(path)
        state = load_trainer_state(directory)
        names = self.plan.trainable_names
        saved_names = list(state.get("trainable_names", []))
        if sorted(saved_names) != sorted(names):
            raise CheckpointError(
                f"{directory}: it trained {len(saved_names)} tensors, this run trains {len(names)}; resume "
                "with the same training.phase and training_params.trainable_modules (or start a new run)"
            )
        if is_sharded(self.model):  # FSDP: every rank reads the full tensors and keeps its shards
            load_sharded_weights(self.model, directory, require=names)
        else:
            load_weights(self.model, directory, require=names)
        try:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{directory}: optimizer/scheduler state does not fit this run ({exc})"
            ) from None
        restore_rng_state(state["rng"])
        self.state = TrainState.from_dict(state["train_state"])
        self._convert_data_position()
        self.health.load_state_dict(state.get("health", {}))
        window = state.get("log_window") or {}
        self._window = _Averager()
        if is_main_process():  # the saved window already sums every rank's micro-batches
            self._window.sums.update(window.get("sums", {}))
            self._window.counts.update(window.get("counts", {}))
        if state.get("total_steps") not in (None, self.total_steps):
            logger.warning(
                "resuming a run planned for %s steps with a config planning %d; from here on the LR "
                "schedule decays towards the new total",
                state.get("total_steps"),
                self.total_steps,
            )
            # The optimizer holds the old schedule's LR for the next step: take this schedule's instead.
            scheduler = self.scheduler
            for group, base, factor in zip(
                self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * factor(scheduler.last_epoch)
        self._warn_config_changes(directory)
        self._say(f"resumed from {directory} at step {self.state.step} (epoch {self.state.epoch})")
        return self

    def _convert_data_position(self) -> None:
        """Re-express the position in the epoch for another world size or batch size.

        A checkpoint records the global number of examples consumed in its epoch (`samples_in_epoch`); the
        order of an epoch does not depend on the world size, so a run with M processes continues at that
        global position: each rank skips samples / M of its own shard. When that is not a whole number of
        accumulation windows, the position is rounded down and the few examples in between are seen again.
        """
        t, extra = self.config.training, self.state.extra
        saved_world = int(extra.get("world_size", 1))
        saved_batch = int(extra.get("batch_size", t.batch_size))
        if (saved_world, saved_batch) == (world_size(), t.batch_size):
            return  # the same geometry: the micro-batch count is exact
        samples = int(extra.get("samples_in_epoch", self.state.batches_in_epoch * saved_batch * saved_world))
        if samples >= len(self.train_set):
            batches = self.micro_per_epoch  # the epoch was complete
        else:
            batches = min(samples // world_size() // t.batch_size, self.micro_per_epoch)
            batches -= batches % t.gradient_accumulation_steps
        replayed = samples - min(batches * t.batch_size * world_size(), samples)
        if replayed:
            logger.warning(
                "resuming with %d processes x batch %d (saved: %d x %d): the epoch continues %d examples "
                "before the saved position, at an optimizer-step boundary",
                world_size(),
                t.batch_size,
                saved_world,
                saved_batch,
                replayed,
            )
        self.state.batches_in_epoch = batches

    def _warn_config_changes(self, directory: Path) -> None:
        saved = _flatten(yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8")) or {})
        now = _flatten(yaml.safe_load(self._config_yaml))
        changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
        if changed:
            logger.warning("resuming with a changed config: %s", ", ".join(changed[:8]))

    # ----------------------------------------------------------------------------------------- train

    def train(self, max_new_steps: int | None = None) -> dict[str, Any]:
        """Train until `total_steps` (or `max_new_steps` more optimizer steps); returns a summary dict.

        Raises `NonFiniteLossError` on a NaN/inf loss or gradient, leaving the last good checkpoint intact.
        """
        cfg = self.config
        t = cfg.training
        main = is_main_process()
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
            self.train_csv = MetricsWriter(self.output_dir / "training_metrics.csv", TRAIN_COLUMNS)
            val_path = self.output_dir / "validation_metrics.csv"
            self.val_csv = MetricsWriter(val_path, self._validation_columns())
            self.train_csv.truncate_after(self.state.step)
            self.val_csv.truncate_after(self.state.step)
        stop_at = self.total_steps
        if max_new_steps is not None:
            stop_at = min(stop_at, self.state.step + max_new_steps)
        started = time.perf_counter()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (self.progress and main),
        )
        detect = cfg.advanced.detect_anomaly
        anomaly = torch.autograd.set_detect_anomaly(True) if detect else contextlib.nullcontext()
        self._window_started = time.perf_counter()
        set_train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self._evaluated_at = -1
        try:
            with anomaly:
                while self.state.step < stop_at and self.state.epoch < t.num_epochs:
                    self._run_epoch(stop_at, bar)
                    if self.state.batches_in_epoch >= self.micro_per_epoch:
                        self.state.epoch += 1
                        self.state.batches_in_epoch = 0
        finally:
            bar.close()

        completed = self.state.step >= self.total_steps or self.state.epoch >= t.num_epochs
        if completed and self.eval_loader is not None and self._evaluated_at != self.state.step:
            self._validate_and_track_best()
        self._save("last")
        return self._summary(time.perf_counter() - started)

    def _run_epoch(self, stop_at: int, bar: tqdm) -> None:
        """Consume the rest of the current epoch, or stop once `stop_at` optimizer steps are done."""
        t = self.config.training
        accum = t.gradient_accumulation_steps
        self.sampler.set_epoch(self.state.epoch, start=self.state.batches_in_epoch * t.batch_size)
        for batch in self.train_loader:
            index = self.state.batches_in_epoch
            window_start = (index // accum) * accum
            window = min(accum, self.micro_per_epoch - window_start)  # an epoch's last window may be short
            self._micro_step(batch, scale=1.0 / window, sync=index + 1 - window_start >= window)
            self.state.batches_in_epoch += 1
            if self.state.batches_in_epoch - window_start < window:
                continue
            self._optimizer_step()
            bar.update(1)
            bar.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            step = self.state.step
            if step % t.log_every == 0 or step == self.total_steps:
                self._log_train_row()
            if self.eval_loader is not None and t.eval_every and step % t.eval_every == 0:
                self._validate_and_track_best()
                self._evaluated_at = step
            if t.save_every and step % t.save_every == 0:
                self._save("last")
            if step >= stop_at:
                return

    def _micro_step(self, batch: Mapping[str, torch.Tensor], scale: float, sync: bool = True) -> None:
        """Forward + backward of one micro-batch; `sync`: it closes an accumulation window (DDP reduces)."""
        noise = None if self.feature_cache is not None else self._draw_noise(batch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(self.engine, sync):
            with self._autocast():
                features = None
                if self.feature_cache is not None:  # the backbone's outputs and their noise, from disk
                    features, noise = cached_features(self.model, batch)
                else:
                    noise = tuple(x.to(self.device, non_blocking=True) for x in noise)
                result = self.engine(batch, noise=noise, features=features)
            terms = {name: float(value) for name, value in result.terms.items()}
            if not all_finite(terms["loss"]):  # every rank stops, none waits in the next all-reduce
                self.optimizer.zero_grad(set_to_none=True)
                self._non_finite("the loss is not finite", terms)
            (result.loss * scale).backward()
        self._last_loss = terms["loss"]
        self._window.add(terms)
        self._window.add(forward_statistics(result.output.stats, result.masked, self.config.model.chunk_size))
        self._window_tokens += result.tokens

    def _draw_noise(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """LLaDA's forward process row by row, seeded by (seed, dataset index, epoch).

        A row's noise depends on nothing else (not the batch, the world size or a resume), so N processes
        with batch b train on exactly the draws of one process with batch N*b.
        """
        first = self.state.batches_in_epoch * self.config.training.batch_size
        examples = self.sampler.indices()[first : first + batch["input_ids"].shape[0]]
        return draw_noise(
            batch["input_ids"],
            batch["prompt_lengths"],
            self.mask_id,
            seed=self.config.training.seed,
            examples=examples,
            draws=self.state.epoch,
        )

    def _optimizer_step(self) -> None:
        t = self.config.training
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sync_ignored_gradients(self.engine)
        grad_norm = clip_grad_norm(params, t.max_grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            terms = {"grad_norm": grad_norm, "loss": self._last_loss}
            self._non_finite("the gradient norm is not finite", terms)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._window.add({"grad_norm": grad_norm})

    def _non_finite(self, what: str, terms: Mapping[str, float]) -> None:
        step = self.state.step + 1
        detail = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        last = self.checkpoint_dir / "last"
        kept = (
            f"the last good checkpoint is {last} (resume with --resume {last})"
            if (last / "trainer_state.pt").is_file()
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"step {step}: {what} ({detail}); the run stopped without applying this update and {kept}. "
            "Try a lower training.lr, a smaller model.slot.delta_scale, or training.mixed_precision: fp32."
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------- logging

    def _log_train_row(self) -> None:
        elapsed = max(time.perf_counter() - self._window_started, 1e-9)
        row: dict[str, Any] = {"step": self.state.step, "epoch": self._epoch_progress()}
        # Means over every rank's micro-batches; throughput of all ranks together.
        local = {**self._window.sums, "__tokens": self._window_tokens}
        sums, counts = reduce_sums(local, self._window.counts)
        tokens = sums.pop("__tokens")
        row.update({key: sums[key] / counts[key] for key in sums})
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        backbone = [g["lr"] for g in self.optimizer.param_groups if g["name"].startswith("backbone")]
        row["lr_backbone"] = backbone[0] if backbone else None
        row["tokens_per_s"] = tokens / elapsed
        with unsharded(self.engine):
            row.update(parameter_statistics(self.model))
        self.last_train_row = row
        self._window = _Averager()
        self._window_started = time.perf_counter()
        self._window_tokens = 0
        if is_main_process():
            self.train_csv.log(row)
            self.health.observe(self.state.step, row)

    def _epoch_progress(self) -> float:
        return self.state.epoch + self.state.batches_in_epoch / self.micro_per_epoch

    def _validation_columns(self) -> list[str]:
        k = self.config.model.max_recursive_steps if self.config.model.refiner != "none" else 0
        columns = list(VALIDATION_COLUMNS) + ["chunk_accuracy", "chunk_accuracy_base"]
        columns += [f"accuracy_step_{i}" for i in range(1, k + 1)]
        columns += [f"chunk_accuracy_step_{i}" for i in range(1, k + 1)]
        return columns

    # ---------------------------------------------------------------------------------- validation

    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        """Validation loss and masked-token accuracies (final, backbone, after each refinement step).

        The noise is drawn from a generator re-seeded for every evaluation: every validation sees the same
        masks, so rows are comparable, and training's RNG streams are untouched (resume stays exact).
        Under torch.distributed every rank evaluates the whole validation set (same result everywhere).
        """
        with unsharded(self.engine):  # FSDP: gather the root's tensors for direct features/refine calls
            return self._evaluate(max_batches)

    @torch.no_grad()
    def _evaluate(self, max_batches: int | None) -> dict[str, Any]:
        if self.eval_loader is None:
            return {}
        limit = max_batches if max_batches is not None else self.config.training.eval_max_batches
        chunk = self.config.model.chunk_size
        generator = torch.Generator(device=self.device).manual_seed(self.config.training.seed + 2_000_003)
        totals: dict[str, float] = defaultdict(float)
        batches = 0
        set_train_mode(self.model, False)
        try:
            for batch in self.eval_loader:
                if limit is not None and batches >= limit:
                    break
                batch = {k: v.to(self.device) for k, v in batch.items()}
                ids = batch["input_ids"]
                noisy, masked, p_mask = forward_process(
                    ids, batch["prompt_lengths"], self.mask_id, generator=generator
                )
                lengths = batch["answer_lengths"]
                with self._autocast():
                    out = self.model.refine(self.model.features(noisy), masked, return_step_logits=True)
                    loss = masked_diffusion_loss(out.logits, ids, masked, p_mask, lengths)
                    loss_base = masked_diffusion_loss(out.base_logits, ids, masked, p_mask, lengths)
                totals["loss"] += float(loss)
                totals["loss_base"] += float(loss_base)
                totals["masked"] += float(masked.sum())
                named = [("", out.logits), ("_base", out.base_logits)]
                named += [(f"_step_{i}", logits) for i, logits in enumerate(out.step_logits, start=1)]
                for suffix, logits in named:
                    correct, chunks_ok, chunks = _accuracy_counts(logits, ids, masked, chunk)
                    totals[f"correct{suffix}"] += correct
                    totals[f"chunks_ok{suffix}"] += chunks_ok
                totals["chunks"] += chunks  # the same for every logits tensor
                stats = forward_statistics(out.stats, masked, chunk)
                totals["refine_steps"] += stats.get("refine_steps", 0.0)
                totals["skipped_fraction"] += stats.get("skipped_fraction", 1.0)
                totals["skipped_fraction_masked"] += stats.get("skipped_fraction_masked", 1.0)
                batches += 1
        finally:
            set_train_mode(self.model, True)
        if not batches:
            return {}
        masked_total = max(totals["masked"], 1.0)
        chunk_total = max(totals["chunks"], 1.0)
        row: dict[str, Any] = {
            "step": self.state.step,
            "epoch": self._epoch_progress(),
            "loss": totals["loss"] / batches,
            "loss_base": totals["loss_base"] / batches,
            "refine_steps": totals["refine_steps"] / batches,
            "skipped_fraction": totals["skipped_fraction"] / batches,
            "skipped_fraction_masked": totals["skipped_fraction_masked"] / batches,
        }
        for key in sorted(totals):
            if key.startswith("correct"):
                row["accuracy" + key[len("correct"):]] = totals[key] / masked_total
            elif key.startswith("chunks_ok"):
                row["chunk_accuracy" + key[len("chunks_ok"):]] = totals[key] / chunk_total
        return row

    def _validate_and_track_best(self) -> None:
        row = broadcast_object(self.evaluate())  # rank 0's numbers: every rank takes the same save decision
        if not row:
            return
        self.last_val_row = row
        if is_main_process():
            self.val_csv.log(row)
        value = row.get(self.config.output.save_best)
        if value is None or not math.isfinite(value):
            return
        best = self.state.best_metric
        lower = self.config.output.best_is_lower
        if best is None or (value < best if lower else value > best):
            self.state.best_metric = float(value)
            self.state.best_step = self.state.step
            self._save("best")

    # ---------------------------------------------------------------------------------- checkpoints

    def _save(self, name: str) -> Path | None:
        """Write checkpoints/<name> (rank 0); `keep_last` also keeps numbered copies of `last`.

        Every rank calls it: under FSDP the full tensors are gathered from the shards first. The layout is
        the single-process one whatever the world size; the position in the epoch is also stored as a
        global example count, so that another world size can resume it.
        """
        t = self.config.training
        names = list(dict.fromkeys([*self.plan.trainable_names, *self.init_names]))
        weights = full_state_dict(self.model, names)
        optimizer = optimizer_state(self.model, self.optimizer)
        window_sums, window_counts = reduce_sums(self._window.sums, self._window.counts)
        if not is_main_process():
            return None
        train_state = self.state.to_dict()
        consumed = min(self.state.batches_in_epoch * t.batch_size, self.sampler.shard_size) * world_size()
        train_state["extra"].update(
            world_size=world_size(), batch_size=t.batch_size, samples_in_epoch=consumed
        )
        trainer_state = {
            "train_state": train_state,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "health": self.health.state_dict(),
            "log_window": {"sums": window_sums, "counts": window_counts},
            "trainable_names": list(self.plan.trainable_names),
            "phase": self.plan.phase,
            "total_steps": self.total_steps,
        }
        directory = save_checkpoint(
            self.checkpoint_dir / name,
            weights=weights,
            trainer_state=trainer_state,
            config_yaml=self._config_yaml,
        )
        keep = self.config.output.keep_last
        if name == "last" and keep > 0:
            snapshot = self.checkpoint_dir / f"step_{self.state.step:07d}"
            if snapshot.exists():
                shutil.rmtree(snapshot)
            shutil.copytree(directory, snapshot)
            for old in sorted(self.checkpoint_dir.glob("step_*"))[:-keep]:
                shutil.rmtree(old)
        return directory

    def _summary(self, elapsed: float) -> dict[str, Any]:
        return {
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "epoch": self.state.epoch,
            "train_loss": self.last_train_row.get("loss"),
            "val": dict(self.last_val_row),
            "best_metric": self.state.best_metric,
            "best_step": self.state.best_step,
            "output_dir": str(self.output_dir),
            "checkpoint": str(self.checkpoint_dir / "last"),
            "health_warnings": list(self.health.warned.values()),
            "elapsed_s": elapsed,
        }

    def _say(self, text: str) -> None:
        if is_main_process():
            tqdm.write(text)


def run_train(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """The `llada-trm train --config FILE [--set k=v ...] [--resume DIR]` command: build, train, summarise.

    Raises `ConfigError` / `CheckpointError` (bad input, one line) and `NonFiniteLossError` (divergence).
    """
    return Trainer.from_cli(config_path, overrides, resume, progress=progress).train()


# ------------------------------------------------------------------------------------------------ helpers


class _Averager:
    """Running means of named floats (NaN-free entries only), for one logging window."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}


def _accuracy_counts(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, chunk_size: int
) -> tuple[float, float, float]:
    """(correct masked tokens, chunks whose masked tokens are all correct, chunks with a masked token)."""
    correct = (logits.argmax(dim=-1) == targets) & masked
    wrong = chunk_sum((masked & ~correct).float(), chunk_size)
    has = chunk_sum(masked.float(), chunk_size) > 0
    chunks_ok = has & (wrong == 0)
    return float(correct.sum()), float(chunks_ok.sum()), float(has.sum())


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
