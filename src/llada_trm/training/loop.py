"""The training recipe whole: setup (`Trainer._setup_*`), the loop (`train_step`: one optimizer step) and
the run's state (`state_dict`: the one list of what a checkpoint holds). `Trainer(config).train()`, or
`.resume(dir).train()` to continue exactly. An epoch's order depends only on (seed, epoch), so a resumed run
replays and skips nothing (docs/training.md). A training step runs code only here, in the objective and in
the model (tests/training/test_train_step.py counts the modules).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llada_trm.build import (
    backbone_dtype,
    build_datasets,
    build_model,
    overlap_warning,
    resolve_precision,
    sampled_validation_records,
)
from llada_trm.config import RunConfig, load_config, save_config
from llada_trm.data.collate import SFTDataset
from llada_trm.diffusion.forward_process import TokenText, draw_for_epoch
from llada_trm.dist_utils import (
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
    wrap_run,
)
from llada_trm.errors import CheckpointError, ConfigError
from llada_trm.io import copy_directory, resolve_device, write_text_atomic
from llada_trm.model.fingerprint import directory_fingerprint
from llada_trm.model.hybrid import PREFIX as REFINER_PREFIX
from llada_trm.model.lora import attach_run_lora
from llada_trm.progress import note, progress_bar, validation_line
from llada_trm.run_checkpoint import (
    CONFIG_FILE,
    INIT_FROM_KEY,
    TrainState,
    capture_rng_state,
    check_run_backbone,
    load_trainer_state,
    load_weights,
    prune_snapshots,
    refiner_names,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from llada_trm.training.feature_cache import (
    FeatureCache,
    cached_features,
    prepare_feature_cache,
)
from llada_trm.training.freezing import ParamGroupSpec, freeze_for_run, set_train_mode
from llada_trm.training.health import HealthMonitor, non_finite_error
from llada_trm.training.metrics import (
    TRAIN_COLUMNS,
    MetricsWriter,
    TensorBoardLog,
    forward_statistics,
    parameter_statistics,
    require_tensorboard,
)
from llada_trm.training.objective import (
    TrainStep,
    training_masks_for_run,
)
from llada_trm.training.resume_config import check_config_changes, retarget_optimizer, saved_settings
from llada_trm.training.run_dir import claim_run_dir, lock_for_run, repair_run_dir, restarts_from_scratch
from llada_trm.training.validation import (
    VALIDATION_SEED_OFFSET,
    check_save_best,
    format_reachability,
    improves,
    reachability_report,
    result_accuracy,
    sampled_accuracy,
    validate,
    validation_columns,
)

logger = logging.getLogger("llada_trm")


@dataclass(frozen=True)
class RunParts:
    """What a run other than refiner training brings to the loop (pretraining: `extras.pretraining.run`);
    each one left None keeps the loop's own, so a refiner run computes exactly what it did without them.

    `datasets(tokenizer)`: the (train, validation) sets instead of `build_datasets(config.data)`.
    `batch(batch, epoch, index)`: a micro-batch rewritten before its noise is drawn (e.g. padded, or given
    `token_weights` [B, L], which the objective's loss multiplies); a pure function of its arguments, so a
    resumed run rewrites the same batches. `validation(model, tokenizer)`: more columns for each validation
    row (named in `validation_columns`). `stop(row)`: whether a validation row ends the run early (recorded
    in the checkpoint: a resumed run that stopped trains no further). `forward_mix`: the share of rows that
    keep the forward process under targeted `training.masks` (a refiner run's is fixed at 0).
    """

    datasets: Callable[[PreTrainedTokenizerBase], tuple[SFTDataset, SFTDataset | None]] | None = None
    batch: Callable[[dict[str, Tensor], int, int], dict[str, Tensor]] | None = None
    validation: Callable[[nn.Module, PreTrainedTokenizerBase], dict[str, Any]] | None = None
    validation_columns: tuple[str, ...] = ()
    stop: Callable[[Mapping[str, Any]], bool] | None = None
    forward_mix: float | None = None


class Trainer:
    """Builds the model, data, freezing plan, optimizer and schedule of a run, then trains it."""

    def __init__(
        self, config: RunConfig, *, progress: bool = True, force: bool = False,
        allow_backbone_mismatch: bool = False, parts: RunParts | None = None,
    ):
        """`force`: a run already in `output.dir` is archived (`run_dir.claim_run_dir`); without it, a new
        run there refuses when `train()` starts (unless `resume()` continues that run).
        `allow_backbone_mismatch`: `training.init_from` and `resume` take a checkpoint trained on another
        backbone (with a warning) instead of refusing it. `parts`: see `RunParts`."""
        self.config = config
        self.parts = parts or RunParts()
        self.progress = progress
        self.force = force
        self.allow_backbone_mismatch = allow_backbone_mismatch
        self.resumed_from: Path | None = None
        self._claimed = False  # this Trainer has trained into output.dir: a second train() continues it
        check_save_best(config)  # a typo in output.save_best fails before any weights load
        if config.output.tensorboard:
            require_tensorboard()  # a missing package fails before any weights load too
        if force and is_main_process():  # first: a feature cache built below must not be archived
            claim_run_dir(config.output.dir, force=True)
        self._config_yaml = config.to_yaml()
        # First: under torchrun the rank picks its GPU, and every RNG is seeded before anything random exists.
        t = config.training
        self.device = init_distributed(resolve_device(t.device, setting="--device"))
        self.amp_dtype = resolve_precision(t.mixed_precision, self.device)
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        torch.manual_seed(t.seed)  # every device
        self._setup_model()  # the refiners' initial weights draw from the freshly seeded global RNG
        self._setup_data()  # needs the tokenizer, and the frozen backbone when it builds the feature cache
        self._setup_optimizer()  # needs FSDP's re-read groups and the epoch geometry (the schedule's length)
        self._setup_state()  # last: the health monitor and report read everything above

    def _setup_model(self) -> None:
        """Backbone + refiners, `training.init_from`, LoRA adapters, the phase's freezing and the objective
        wrapped for the distributed strategy; checkpoints record the backbone files' fingerprint."""
        config = self.config
        built = build_model(config, device=self.device, dtype=backbone_dtype(config, self.amp_dtype))
        self.model, self.tokenizer, self.backbone_dir = built.model, built.tokenizer, built.backbone_dir
        self.backbone_fingerprint = directory_fingerprint(self.backbone_dir)
        # init_from loads before any wrapping or sharding; the loaded names are saved by this run's
        # checkpoints too, trained or not (a phase-1 run from a phase-3 checkpoint keeps its backbone).
        self.init_names = self._init_from() if config.training.init_from is not None else []
        adapters = attach_run_lora(self.model, config)  # after init_from: it loads the base weights' names
        if adapters:
            targets = ", ".join(config.lora.target_modules)
            self._say(f"lora: {len(adapters)} adapter tensors of rank {config.lora.rank} on the backbone's "
                      f"{targets}")  # fmt: skip
        if config.advanced.gradient_checkpointing:
            self.model.backbone.gradient_checkpointing = True
        self.plan = freeze_for_run(self.model, config)
        self.mask_id = self.model.mask_token_id
        self.token_text = TokenText(self.tokenizer.decode)  # the answers' structure, for result_accuracy
        # Last: FSDP swaps every parameter for its shard, and the optimizer is built from what it leaves.
        self.strategy = resolve_strategy(config.advanced.distributed, phase=config.training.phase)
        p = config.training_params
        step = TrainStep(
            self.model, mask_id=self.mask_id, deep_supervision=p.deep_supervision_weight,
            orthogonality=p.orthogonality_weight, backbone_frozen=self.plan.backbone_frozen,
        )
        self.engine = wrap_run(step, self.plan, self.strategy, device=self.device, param_dtype=self.amp_dtype)

    def _init_from(self) -> list[str]:
        """Copy the weights `training.init_from` saved (no optimizer, schedule or step); returns their names.
        The checkpoint must have this run's refiner and backbone and hold every refiner tensor (one it lacked
        would start this run from noise)."""
        config = self.config
        try:
            directory = resolve_checkpoint_dir(Path(config.training.init_from).expanduser())
            saved = saved_settings(directory / CONFIG_FILE)  # the same refiner(s): else the tensors differ
            for key in ("refiner", "integration"):
                theirs, ours = saved.get(f"model.{key}"), getattr(config.model, key)
                if theirs is not None and theirs != ours:
                    raise CheckpointError(
                        f"{directory / CONFIG_FILE} was trained with model.{key}: {theirs}, this run has "
                        f"model.{key}: {ours}; set them alike or point {INIT_FROM_KEY} at a matching run"
                    )
            check_run_backbone(
                directory, self.backbone_fingerprint, self.backbone_dir,
                allow_mismatch=self.allow_backbone_mismatch,
            )
            names = load_weights(self.model, directory, require=refiner_names(self.model.state_dict()))
        except CheckpointError as exc:  # the same type (a BackboneMismatchError stays one), the key in front
            raise type(exc)(f"{INIT_FROM_KEY}: {exc}") from None
        # a feature cache fingerprints model.backbone's files: it would describe a backbone the run lacks
        if config.advanced.feature_cache and any(not name.startswith(REFINER_PREFIX) for name in names):
            raise ConfigError(
                f"advanced.feature_cache: {INIT_FROM_KEY} {directory} holds backbone tensors, "
                "which the cache's fingerprint of model.backbone does not see; train without the cache"
            )
        self._say(f"initialised {len(names)} tensors from {directory} ({INIT_FROM_KEY})")
        return names

    def _setup_data(self) -> None:
        """Datasets, the resumable sampler and the loaders; the epoch geometry follows from them."""
        t = self.config.training
        if self.parts.datasets is not None:
            self.train_set, self.eval_set = self.parts.datasets(self.tokenizer)
        else:
            self.train_set, self.eval_set = build_datasets(self.config.data, self.tokenizer)
        self.sampler = EpochSampler(len(self.train_set), seed=t.seed, rank=rank(), world_size=world_size())
        progress = self.progress and is_main_process()
        # the masks first: a feature cache stores the draws of them
        self.masks = training_masks_for_run(
            self.config, self.model, self.tokenizer, self.device, forward_mix=self.parts.forward_mix
        )
        self.feature_cache: FeatureCache | None = None
        train: Dataset = self.train_set
        order: Sampler = self.sampler
        if self.config.advanced.feature_cache:  # phase 1 reads the frozen backbone's outputs from disk
            if not self.plan.backbone_frozen:
                raise ConfigError(
                    "advanced.feature_cache: the cache holds a frozen backbone's outputs, but this run trains"
                    " backbone parameters; use training.phase 1 with trainable_modules inside refinement_head"
                )
            self.feature_cache = train = prepare_feature_cache(
                self.config, self.model, self.train_set.examples, backbone_dir=self.backbone_dir,
                pad_id=self.train_set.pad_id, device=self.device, autocast_dtype=self.amp_dtype,
                progress=progress, masks=self.masks,
            )
            order = DrawSampler(self.sampler, self.feature_cache.n_draws)
        self.train_loader = self._loader(train, order)
        self.eval_loader: DataLoader | None = None
        if self.eval_set is not None:  # in dataset order
            in_order = EpochSampler(len(self.eval_set), seed=t.seed, shuffle=False)
            self.eval_loader = self._loader(self.eval_set, in_order)
        n = t.val_sampled_problems  # sampled accuracy at each validation (0: off)
        self.sampled_records = sampled_validation_records(self.config.data, n) if n else []
        self.sampling = self.config.sampling.options() if n else None  # the sampler a comparison uses
        self.micro_per_epoch = math.ceil(self.sampler.num_samples / t.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / t.gradient_accumulation_steps)
        self.total_steps = t.max_steps or self.steps_per_epoch  # null: one epoch

    def _loader(self, dataset: Any, sampler: Sampler) -> DataLoader:
        """`dataset` read in `sampler`'s order with its own `collate`; the loader's seed draws use a private
        generator, never the global torch RNG (resumability)."""
        data, t = self.config.data, self.config.training
        return DataLoader(
            dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=dataset.collate,
            num_workers=data.num_workers, pin_memory=data.pin_memory and self.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed),
        )

    def _setup_optimizer(self) -> None:
        """AdamW over the plan's groups; linear warmup then cosine decay over `total_steps`."""
        t = self.config.training
        self.warmup_steps = resolve_warmup_steps(self.total_steps, t.warmup_steps, t.warmup_ratio)
        self.optimizer = build_optimizer(
            self.plan.groups, weight_decay=t.weight_decay, betas=t.adam_betas, eps=t.adam_eps
        )
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
            min_ratio=t.min_lr_ratio,
        )

    def _setup_state(self) -> None:
        """Position in the run, the logging window, health checks and output paths; then the run's report."""
        config = self.config
        self.state = TrainState()
        # metrics since the last logged row (checkpointed: rows survive a resume)
        self._window = LogWindow(config.model.chunk_size)
        self.health = HealthMonitor(
            enabled=config.advanced.health_checks,
            refiner=config.model.refiner != "none",
            # chunk_selection 'all' refines every chunk by choice, as a threshold above 1 does
            confidence_threshold=(
                config.model.confidence_threshold if config.model.chunk_selection == "confidence"
                else float("inf")
            ),
        )
        self.output_dir = Path(config.output.dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.last_train_row: dict[str, Any] = {}
        self.last_val_row: dict[str, Any] = {}
        self.tensorboard = TensorBoardLog()  # off; rank 0 opens it in train() with output.tensorboard
        self._say(self.plan.report())
        validation = f", {len(self.eval_set)} validation examples" if self.eval_set is not None else ""
        precision = f"autocast {self.amp_dtype}" if self.amp_dtype else "fp32"
        self._say(
            f"data: {len(self.train_set)} training examples{validation}; {self.steps_per_epoch} optimizer "
            f"steps per epoch, {self.total_steps} in all ({self.warmup_steps} warmup); device {self.device}, "
            f"{precision}" + (f"; {world_size()} processes, {self.strategy}" if world_size() > 1 else "")
        )

    # ---------------------------------------------------------------------------------------- resume

    def resume(self, path: str | Path) -> Trainer:
        """Restore trainable weights, optimizer, scheduler, RNG states and the data position.

        Settings outside `resume_config.RESUMABLE` must equal the checkpoint's; the others apply from here.
        """
        if self.force:
            raise ConfigError("this Trainer was built with force=True (a new run); it cannot also resume one")
        if restarts_from_scratch(path, self.output_dir):
            self._say(f"{path}: the run stopped before its first checkpoint; starting it again from step 0")
            self._claimed = True  # its own directory: train() may write over the killed run's first rows
            return self
        directory = resolve_checkpoint_dir(path)
        state = load_trainer_state(directory)
        names = self.plan.trainable_names
        saved_names = list(state.get("trainable_names", []))
        if sorted(saved_names) != sorted(names):
            raise CheckpointError(
                f"{directory}: it trained {len(saved_names)} tensors, this run trains {len(names)}; resume "
                "with the same training.phase and training_params.trainable_modules (or start a new run)"
            )
        changed = check_config_changes(directory, self.config)  # refuses before any weight is loaded
        check_run_backbone(
            directory, self.backbone_fingerprint, self.backbone_dir,
            allow_mismatch=self.allow_backbone_mismatch,
        )
        if is_sharded(self.model):  # FSDP: every rank reads the full tensors and keeps its shards
            load_sharded_weights(self.model, directory, require=names)
        else:
            load_weights(self.model, directory, require=names)
        self.load_state_dict(state, directory)
        if changed:
            lr = self.optimizer.param_groups[0]["lr"]
            logger.warning(
                "resuming at step %d with changed settings: %s; they apply from here on (next lr %.6g)",
                self.state.step, "; ".join(changed), lr,
            )
        self.resumed_from = directory
        self._say(f"resumed from {directory} at step {self.state.step} (epoch {self.state.epoch})")
        return self

    # ----------------------------------------------------------------------------------------- train

    def train(self, max_new_steps: int | None = None) -> dict[str, Any]:
        """Train until `total_steps` (or `max_new_steps` more optimizer steps); returns a summary dict.

        Raises `NonFiniteLossError` on a NaN/inf loss or gradient, leaving the last good checkpoint intact;
        `RunDirError` when `output.dir` holds another run or another process writes there. A resumed run
        that had already finished trains nothing and writes nothing.
        """
        lock = lock_for_run(self.output_dir, resumed=self.resumed_from, own=self._claimed)
        self._claimed = True  # held until the run ends, however it ends
        try:
            if lock is not None:  # rank 0, under the lock: what killed saves and writes left is repaired
                repair_run_dir(self.output_dir)
            return self._train(max_new_steps, is_main_process())
        finally:
            self.tensorboard.close()
            if lock is not None:
                lock.release()

    def _train(self, max_new_steps: int | None, main: bool) -> dict[str, Any]:
        cfg = self.config
        t = cfg.training
        if self.resumed_from is not None and self._finished():
            self._say(
                f"{self.output_dir}: the run finished at step {self.state.step} of {self.total_steps} "
                f"(epoch {self.state.epoch}); nothing to train. Raise training.max_steps to continue it"
            )
            if main and cfg.output.keep_last > 0:  # what a crash after the last save may have left
                prune_snapshots(self.checkpoint_dir, cfg.output.keep_last)
            return self.summary(0.0, finished=True)
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
            step = self.state.step  # a resumed run logs the rows after it again
            out = self.output_dir
            self.train_csv = MetricsWriter(out / "training_metrics.csv", TRAIN_COLUMNS, keep_until=step)
            columns = validation_columns(cfg) + list(self.parts.validation_columns)
            self.val_csv = MetricsWriter(out / "validation_metrics.csv", columns, keep_until=step)
            self.tensorboard = TensorBoardLog(  # on with `llada-trm train --tensorboard`
                self.output_dir if cfg.output.tensorboard else None, resumed_step=self.state.step
            )
        # What the budget can reach at all, recorded once. Every rank runs it (DDP replicas agree); not under
        # FSDP, where a direct forward before the first step would initialise the shards outside the root.
        if self.state.step == 0 and self.resumed_from is None and not is_sharded(self.model):
            report = self.reachability()
            if main and report:
                self._say(format_reachability(report))
                write_text_atomic(self.output_dir / "reachability.json", json.dumps(report, indent=2) + "\n")
        stop_at = self.total_steps
        if max_new_steps is not None:
            stop_at = min(stop_at, self.state.step + max_new_steps)
        started = time.perf_counter()
        bar = progress_bar(  # a bar on a terminal; in a log, one plain line every log_every steps
            self.total_steps, desc="train", unit="step", initial=self.state.step, every=t.log_every,
            enabled=self.progress and main,
        )
        self._window.started = time.perf_counter()  # the terms stay: a resumed window goes on
        set_train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self._evaluated_at = -1
        try:
            while self.state.step < stop_at and not self._stopped():
                self._run_epoch(stop_at, bar)
                if self.state.batches_in_epoch >= self.micro_per_epoch:
                    self.state.epoch += 1
                    self.state.batches_in_epoch = 0
        finally:
            bar.close()

        if self._finished() and self.eval_loader is not None and self._evaluated_at != self.state.step:
            self._validate_and_track_best()
        self._save("last")
        return self.summary(time.perf_counter() - started)

    def _finished(self) -> bool:
        return self.state.step >= self.total_steps or self._stopped()

    def _stopped(self) -> bool:
        """Whether `RunParts.stop` ended the run at a validation."""
        return bool(self.state.extra.get("stopped_early"))

    def _run_epoch(self, stop_at: int, bar: Any) -> None:
        """Consume the rest of the current epoch, or stop once `stop_at` optimizer steps are done."""
        t = self.config.training
        self.sampler.set_epoch(self.state.epoch, start=self.state.batches_in_epoch * t.batch_size)
        batches = iter(self.train_loader)
        while self.train_step(batches):
            bar.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            bar.update(1)
            step = self.state.step
            if step % t.log_every == 0 or step == self.total_steps:
                self._log_train_row()
            if self.eval_loader is not None and t.eval_every and step % t.eval_every == 0:
                self._validate_and_track_best()
                self._evaluated_at = step
                if self.parts.stop is not None and self.last_val_row and self.parts.stop(self.last_val_row):
                    self.state.extra["stopped_early"] = step
                    return
            if t.save_every and step % t.save_every == 0 and step < stop_at:  # `train` saves the end
                self._save("last")
            if step >= stop_at:
                return

    def train_step(self, batches: Iterator[Mapping[str, torch.Tensor]]) -> bool:
        """One optimizer step: the rest of the accumulation window's micro-batches from `batches` (forward +
        backward each), then clipping, AdamW and the schedule. False when `batches` ran out first
        (the epoch is over; the window's gradients stay accumulated, as a short window's would)."""
        accum = self.config.training.gradient_accumulation_steps
        while True:
            batch = next(batches, None)
            if batch is None:
                return False
            index = self.state.batches_in_epoch
            window_start = (index // accum) * accum
            window = min(accum, self.micro_per_epoch - window_start)  # an epoch's last window may be short
            self._micro_step(batch, scale=1.0 / window, sync=index + 1 - window_start >= window)
            self.state.batches_in_epoch += 1
            if self.state.batches_in_epoch - window_start >= window:
                break
        self._optimizer_step()
        return True

    def _micro_step(self, batch: Mapping[str, torch.Tensor], scale: float, sync: bool = True) -> None:
        """Forward + backward of one micro-batch; `sync`: it closes an accumulation window (DDP reduces).

        The loss is read back once (every rank must stop on a non-finite loss before the next all-reduce);
        every other term and statistic stays on the device until the logging step (`metrics.LogWindow`).
        """
        if self.parts.batch is not None:
            batch = self.parts.batch(dict(batch), self.state.epoch, self.state.batches_in_epoch)
        noise = None if self.feature_cache is not None else self._draw_noise(batch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # Collectives run only in a parallel run: one process steps with plain torch (and no dist_utils code).
        parallel = self.strategy != "none"
        with gradient_sync(self.engine, sync) if parallel else contextlib.nullcontext():
            with self._autocast():
                features = None
                if self.feature_cache is not None:  # the backbone's outputs and their noise, from disk
                    features, noise = cached_features(self.model, batch)
                else:
                    noise = tuple(x.to(self.device, non_blocking=True) for x in noise)
                result = self.engine(batch, noise=noise, features=features)
            loss = float(result.terms["loss"])
            if not (all_finite(loss) if parallel else math.isfinite(loss)):  # every rank stops together
                self.optimizer.zero_grad(set_to_none=True)
                terms = {name: float(value) for name, value in result.terms.items()}
                self._non_finite("the loss is not finite", terms)
            (result.loss * scale).backward()
        self._last_loss = loss
        self._window.add_forward(result.terms, result.output.stats, result.masked, tokens=result.tokens)

    def _draw_noise(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The run's phase-1 masks (`training.masks`) row by row, seeded by (seed, dataset index, epoch).

        A row's noise depends on nothing else (not the batch, the world size or a resume), so N processes
        with batch b train on exactly the draws of one process with batch N*b.
        """
        first = self.state.batches_in_epoch * self.config.training.batch_size
        examples = self.sampler.indices()[first : first + batch["input_ids"].shape[0]]
        return self.masks.draw(dict(batch), examples, self.state.epoch)

    def _optimizer_step(self) -> None:
        t = self.config.training
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.strategy != "none":  # FSDP's replicated gates, DTensor norms: collectives
            sync_ignored_gradients(self.engine)
            grad_norm = clip_grad_norm(params, t.max_grad_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
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
        raise non_finite_error(self.state.step + 1, what, terms, self.checkpoint_dir / "last")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------------------- logging

    def _log_train_row(self) -> None:
        row: dict[str, Any] = {"step": self.state.step, "epoch": self._epoch_progress()}
        row.update(self._window.row(self.optimizer))
        with unsharded(self.engine):
            row.update(parameter_statistics(self.model))
        self.last_train_row = row
        self._window.reset()
        if is_main_process():
            self.train_csv.log(row)
            self.tensorboard.log("train", row)
            self.health.observe(self.state.step, row)

    def _epoch_progress(self) -> float:
        return self.state.epoch + self.state.batches_in_epoch / self.micro_per_epoch

    # ---------------------------------------------------------------------------------- validation

    def evaluate(self) -> dict[str, Any]:
        """Validation loss and masked-token accuracies (`training.validation`), as a validation CSV row.

        Under torch.distributed every rank evaluates the whole validation set (same result everywhere).
        """
        if self.eval_loader is None:
            return {}
        with unsharded(self.engine):  # FSDP: gather the root's tensors for direct features/refine calls
            row = validate(
                self.model, self.eval_loader, mask_id=self.mask_id, chunk_size=self.config.model.chunk_size,
                seed=self.config.data.validation_seed, device=self.device, autocast=self._autocast,
            )
            if row:  # the results of the answer's lines, teacher-forced (the study's secondary endpoint)
                row.update(result_accuracy(
                    self.model, self.eval_loader, self.token_text, mask_id=self.mask_id, device=self.device,
                    autocast=self._autocast,
                ))  # fmt: skip
            if row and self.sampled_records:
                row.update(sampled_accuracy(self.model, self.tokenizer, self.sampled_records, self.sampling))
            if row and self.parts.validation is not None:
                row.update(self.parts.validation(self.model, self.tokenizer))
        return {"step": self.state.step, "epoch": self._epoch_progress(), **row} if row else {}

    def reachability(self, max_batches: int | None = None) -> dict[str, Any]:
        """Which of the backbone's wrong tokens on validation the run's update budget can flip
        (`validation.reachability_report`); {} without a refiner or a validation set."""
        if self.eval_loader is None or self.config.model.refiner == "none":
            return {}
        # the run's masks on the validation noise's seed (and without the run's probed margins)
        masks = replace(self.masks, seed=self.config.data.validation_seed + VALIDATION_SEED_OFFSET)
        with unsharded(self.engine), self._autocast():
            return reachability_report(
                self.model, self.eval_loader, masks, self.config, device=self.device, max_batches=max_batches
            )

    def _validate_and_track_best(self) -> None:
        row = broadcast_object(self.evaluate())  # rank 0's numbers: every rank takes the same save decision
        if not row:
            return
        self.last_val_row = row
        if is_main_process():
            if self.progress:
                note(validation_line(row, self.total_steps, refiner=self.config.model.refiner != "none",
                                     extra=self.parts.validation_columns))  # fmt: skip
            self.val_csv.log(row)
            self.tensorboard.log("validation", row)
        value = row.get(self.config.output.save_best)
        if improves(value, self.state.best_metric, lower=self.config.output.best_is_lower):
            self.state.best_metric = float(value)
            self.state.best_step = self.state.step
            self._save("best")

    # --------------------------------------------------------------------------------- the run's state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The run as a checkpoint holds it: `(weights, trainer_state)` on rank 0, None on the others.

        Every rank calls it (FSDP gathers the shards). The layout is the single-process one whatever the
        world size, with the epoch position also as a global example count (another world size resumes it).
        The weights are the trained tensors, those init_from loaded, and the whole refiner (frozen parts
        too: no other file holds them).
        """
        t = self.config.training
        refiner = refiner_names(dict(self.model.named_parameters()))
        names = list(dict.fromkeys([*self.plan.trainable_names, *self.init_names, *refiner]))
        weights = full_state_dict(self.model, names)
        optimizer = optimizer_state(self.model, self.optimizer)
        window = self._window.state_dict()
        if not is_main_process():
            return None
        train_state = asdict(self.state)
        consumed = min(self.state.batches_in_epoch * t.batch_size, self.sampler.num_samples) * world_size()
        train_state["extra"].update(
            world_size=world_size(), batch_size=t.batch_size, samples_in_epoch=consumed
        )
        trainer_state = {
            "train_state": train_state,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "health": self.health.state_dict(),
            "log_window": window,
            "trainable_names": list(self.plan.trainable_names),
            "phase": self.plan.phase,
            "total_steps": self.total_steps,
        }
        if self.masks.margins:
            trainer_state["probe_margins"] = self.masks.state_dict()
        return weights, trainer_state

    def load_state_dict(self, state: Mapping[str, Any], directory: Path) -> None:
        """Continue from a checkpoint's trainer state (its weights are already loaded): the optimizer,
        scheduler, RNG streams, position, health monitor and logging window (`directory`: for errors)."""
        self.masks.load_state_dict(state.get("probe_margins", {}))
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{directory}: optimizer/scheduler state does not fit this run ({exc})"
            ) from None
        restore_rng_state(state["rng"])
        self.state = TrainState(**state["train_state"])
        t, extra, world = self.config.training, self.state.extra, world_size()
        saved_world, saved_batch = int(extra.get("world_size", 1)), int(extra.get("batch_size", t.batch_size))
        if (saved_world, saved_batch) != (world, t.batch_size):  # the same global position, re-expressed
            consumed = self.state.batches_in_epoch * saved_batch * saved_world
            samples = int(extra.get("samples_in_epoch", consumed))
            if samples >= len(self.train_set):
                batches = self.micro_per_epoch  # the epoch was complete
            else:
                batches = min(samples // world // t.batch_size, self.micro_per_epoch)
                batches -= batches % t.gradient_accumulation_steps
            replayed = samples - min(batches * t.batch_size * world, samples)
            if replayed:
                logger.warning(
                    "resuming with %d processes x batch %d (saved: %d x %d): the epoch continues %d examples "
                    "before the saved position, at an optimizer-step boundary",
                    world, t.batch_size, saved_world, saved_batch, replayed,
                )
            self.state.batches_in_epoch = batches
        self.health.load_state_dict(state.get("health", {}))
        # only rank 0 takes the saved window: it already sums every rank's micro-batches
        self._window.load_state_dict(state.get("log_window") or {}, main=is_main_process())
        # The restored groups carry the saved run's lr, betas, weight decay: this run's config applies instead
        # (identical values when nothing changed, so an unchanged resume stays bit-identical).
        retarget_optimizer(self.optimizer, self.scheduler, fresh)
        if state.get("total_steps") not in (None, self.total_steps):
            logger.warning(
                "resuming a run planned for %s steps with a config planning %d; from here on the LR "
                "schedule decays towards the new total", state.get("total_steps"), self.total_steps,
            )

    def _save(self, name: str) -> Path | None:
        """Write checkpoints/<name> (rank 0; every rank calls it); `keep_last` also keeps numbered copies
        of `last`."""
        saved = self.state_dict()
        if saved is None:
            return None
        weights, trainer_state = saved
        keep = self.config.output.keep_last
        directory = self.checkpoint_dir / name
        snapshot = name == "last" and keep > 0
        if snapshot:  # the numbered copy first: a crash before `last` follows only repeats this step
            directory = self.checkpoint_dir / f"step_{self.state.step:07d}"
        save_checkpoint(
            directory, weights=weights, trainer_state=trainer_state, config_yaml=self._config_yaml,
            backbone_fingerprint=self.backbone_fingerprint,
        )
        if snapshot:
            directory = copy_directory(directory, self.checkpoint_dir / "last")
            prune_snapshots(self.checkpoint_dir, keep)
        return directory

    def summary(self, elapsed: float, *, finished: bool = False) -> dict[str, Any]:
        """What `train` returns: steps, last losses, best metric, where the run wrote, health warnings;
        `already_finished`: a resumed run that had nothing left to train."""
        return {
            "already_finished": finished,
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


# ------------------------------------------------------------------------------ the optimiser

def build_optimizer(
    groups: Sequence[ParamGroupSpec],
    *,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.AdamW:
    """AdamW with one decayed and one undecayed group per plan group.

    Matrices decay; biases, norm gains and other vectors do not (decaying a norm's gain towards zero only
    shrinks activations). Each optimizer group keeps the plan group's name and LR.
    """
    param_groups = []
    for group in groups:
        for decays, suffix in ((True, ""), (False, "/no_decay")):
            params = [p for p in group.params.values() if (p.ndim >= 2) == decays]
            if params:
                decay = weight_decay if decays else 0.0
                param_groups.append({"params": params, "lr": group.lr, "weight_decay": decay,
                                     "name": group.name + suffix})  # fmt: skip
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup up to 1 over `warmup_steps`, then cosine down to `min_ratio`.

    `step` counts optimizer steps already taken (LambdaLR's `last_epoch`), so the first update uses
    1/warmup rather than 0 and no step is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup_steps(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Explicit `warmup_steps` wins; otherwise `warmup_ratio` of the run (rounded)."""
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return int(round(warmup_ratio * total_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    """A LambdaLR applying `warmup_cosine` to every group's own base LR (head and backbone alike)."""

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

    return LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------ the logging window

class LogWindow:
    """Terms, forward statistics, token count and wall time since the last logged row.

    `add_forward` keeps a micro-batch's loss terms and statistics as device tensors (detached), and
    `settle` reduces them to floats once per logging step or checkpoint. The sums are the ones a per-step
    reduction would give: each column's values are added in micro-batch order either way.
    """

    def __init__(self, chunk_size: int | None = None) -> None:
        self.chunk_size = chunk_size
        self._pending: list[tuple[Mapping[str, Tensor], Mapping[str, Any], Tensor | None]] = []
        self.reset()

    def add(self, values: Mapping[str, float], tokens: int = 0) -> None:
        """Add to the running sums; NaN, inf and None values are left out of a column's mean."""
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1
        self.tokens += tokens

    def add_forward(
        self, terms: Mapping[str, Tensor], stats: Mapping[str, Any], masked: Tensor | None, tokens: int
    ) -> None:
        """One micro-batch's loss terms and `HybridOutput.stats`, reduced later by `settle`."""
        self.tokens += tokens
        self._pending.append((terms, _detached(stats), masked))

    def settle(self) -> None:
        """Reduce the pending micro-batches into the running sums (host synchronisations happen here)."""
        for terms, stats, masked in self._pending:
            self.add({name: float(value) for name, value in terms.items()})
            self.add(forward_statistics(stats, masked, self.chunk_size))
        self._pending.clear()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.tokens = 0
        self._pending.clear()
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, dict[str, float | int]]:
        """The window's sums over every rank (collective: every rank calls it)."""
        self.settle()
        sums, counts = reduce_sums(self.sums, self.counts)
        return {"sums": sums, "counts": counts}

    def load_state_dict(self, state: Mapping[str, Any], *, main: bool) -> None:
        """Continue a saved window; only rank 0 takes the sums (they already cover every rank)."""
        self.reset()
        if main:
            self.sums.update(state.get("sums", {}))
            self.counts.update(state.get("counts", {}))

    def row(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The mean terms, the learning rates and `tokens_per_s` (collective: every rank calls it)."""
        self.settle()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        sums, counts = reduce_sums({**self.sums, "__tokens": self.tokens}, self.counts)
        tokens = sums.pop("__tokens")
        backbone = [g["lr"] for g in optimizer.param_groups if g["name"].startswith("backbone")]
        return {
            **{key: sums[key] / counts[key] for key in sums},
            "lr": optimizer.param_groups[0]["lr"],
            "lr_backbone": backbone[0] if backbone else None,  # None when no backbone group trains
            "tokens_per_s": tokens / elapsed,
        }


def _detached(value: Any) -> Any:
    """`value` with every tensor detached: a window holds no autograd graph (the hybrid's statistics are
    freshly computed tensors, never views of a parameter or buffer a later step updates in place)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached(item) for item in value)
    return value


# -------------------------------------------------------------------------------------- data order

class EpochSampler(DistributedSampler):
    """torch's `DistributedSampler`, able to start an epoch part-way (for resuming): `set_epoch(epoch,
    start)` skips the first `start` indices of this rank's shard. W processes with batch b read the same
    examples per step as one process with batch W*b (docs/distributed.md, "Data")."""

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError("EpochSampler needs a non-empty dataset")
        super().__init__(
            range(size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.size = size
        self.start = 0
        self._order: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` indices of this rank's shard."""
        super().set_epoch(epoch)
        self.start = start

    def indices(self) -> list[int]:
        """This rank's whole shard of the current epoch, in order (dataset indices)."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, list(super().__iter__()))
        return self._order[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class DrawSampler(Sampler[tuple[int, int]]):
    """Wraps an `EpochSampler`: its example indices, each paired with the epoch's noise draw (the cache)."""

    def __init__(self, examples: EpochSampler, n_draws: int) -> None:
        self.examples = examples
        self.n_draws = n_draws

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = draw_for_epoch(self.examples.epoch, self.n_draws)
        return ((index, draw) for index in self.examples)

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------- the command

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


def run_train(config_path: str | Path, overrides: Sequence[str] = (), resume: str | Path | None = None,
              **options: bool) -> dict[str, Any]:  # fmt: skip
    """The `llada-trm train --config FILE [--set k=v ...] [--resume DIR | --force]` command (`options`: those
    of `trainer_from_cli`). Raises `ConfigError` / `CheckpointError` (bad input, one line) and
    `NonFiniteLossError` (divergence)."""
    return trainer_from_cli(config_path, overrides, resume, **options).train()
