"""The training workflow: a `RunConfig` in; metrics CSVs, checkpoints and a summary out.

    Trainer(config).train()                       # a fresh run
    Trainer(config).resume(dir).train()           # continue exactly where a checkpoint left off
    # what the CLI calls: training.entry.run_train("configs/tiny_refiner.yaml", ["training.lr=3e-4"])

One optimizer step = `gradient_accumulation_steps` micro-batches. Logging, validation and checkpointing
happen on optimizer-step boundaries, so a checkpoint always sits between two steps and a resumed run
replays nothing and skips nothing: model, optimizer, scheduler, every RNG stream and the position in the
epoch's (seed, epoch)-determined order are restored.

The run's parts are assembled by `llada_trm.build` (the path every command shares); validation is
`training.validation`, checkpoint files `training.checkpoint`, the noise `diffusion.forward_process`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from llada_trm.build import (
    build_datasets,
    hybrid_config,
    resolve_backbone_dir,
    resolve_device,
    resolve_precision,
    seed_everything,
    start_run,
)
from llada_trm.config import RunConfig, save_config
from llada_trm.diffusion.targeted_masks import TokenText, TrainingMasks
from llada_trm.errors import ConfigError
from llada_trm.io import write_text_atomic
from llada_trm.progress import note, progress_bar, validation_line
from llada_trm.run_checkpoint import TrainState, prune_snapshots
from llada_trm.training.data import DrawSampler, EpochSampler, run_loaders
from llada_trm.training.distributed import (
    all_finite,
    broadcast_object,
    clip_grad_norm,
    gradient_sync,
    is_main_process,
    is_sharded,
    rank,
    sync_ignored_gradients,
    unsharded,
    world_size,
)
from llada_trm.training.ema import WeightEMA
from llada_trm.training.feature_cache import cached_features
from llada_trm.training.freezing import set_train_mode
from llada_trm.training.health import HealthMonitor, non_finite_error
from llada_trm.training.log_window import LogWindow, learning_rates
from llada_trm.training.masks import training_masks_for_run
from llada_trm.training.metrics import TRAIN_COLUMNS, MetricsWriter
from llada_trm.training.run_dir import (
    claim_run_dir,
    lock_for_run,
    repair_run_dir,
    restarts_from_scratch,
)
from llada_trm.training.run_setup import (
    build_run_optimizer,
    build_training_model,
    feature_cache_for_run,
    sampler_state_mix_for_run,
)
from llada_trm.training.run_state import restore_run, run_summary, save_run
from llada_trm.training.sampler_state_batches import state_noise
from llada_trm.training.stats import forward_statistics, parameter_statistics
from llada_trm.training.tensorboard import TensorBoardLog, require_tensorboard
from llada_trm.training.validation import (
    VALIDATION_SEED_OFFSET,
    SampledValidation,
    check_save_best,
    format_reachability,
    improves,
    reachability_report,
    result_accuracy,
    validate,
    validation_columns,
)

__all__ = [
    "Trainer",
    "hybrid_config",
    "resolve_backbone_dir",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
]

logger = logging.getLogger("llada_trm")


class Trainer:
    """Builds the model, data, freezing plan, optimizer and schedule of a run, then trains it."""

    def __init__(
        self, config: RunConfig, *, progress: bool = True, force: bool = False,
        allow_backbone_mismatch: bool = False,
    ):
        """`force`: a run already in `output.dir` is archived (`run_dir.claim_run_dir`); without it, a new
        run there refuses when `train()` starts (unless `resume()` continues that run).
        `allow_backbone_mismatch`: `training.init_from` and `resume` take a checkpoint trained on another
        backbone (with a warning) instead of refusing it."""
        self.config = config
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
        self.device, self.amp_dtype = start_run(config)
        self._setup_model()  # the refiners' initial weights draw from the freshly seeded global RNG
        self._setup_data()  # needs the tokenizer, and the frozen backbone when it builds the feature cache
        self._setup_optimizer()  # needs FSDP's re-read groups and the epoch geometry (the schedule's length)
        self._setup_state()  # last: the health monitor and report read everything above

    def _setup_model(self) -> None:
        """Backbone + refiners, `training.init_from`, the phase's freezing and the wrapped objective."""
        built = build_training_model(
            self.config, self.device, self.amp_dtype, say=self._say,
            allow_backbone_mismatch=self.allow_backbone_mismatch,
        )
        self.tokenizer, self.model, self.backbone_dir = built.tokenizer, built.model, built.backbone_dir
        self.backbone_fingerprint = built.backbone_fingerprint
        self.init_names, self.plan, self.weights = built.init_names, built.plan, built.weights
        self.strategy, self.engine = built.strategy, built.engine
        self.mask_id = self.model.mask_token_id
        self.token_text = TokenText(self.tokenizer.decode)  # the answers' structure, for result_accuracy

    def _setup_data(self) -> None:
        """Datasets, the resumable sampler and the loaders; the epoch geometry follows from them."""
        t = self.config.training
        self.train_set, self.eval_set = build_datasets(self.config.data, self.tokenizer)
        self.sampler = EpochSampler(len(self.train_set), seed=t.seed, rank=rank(), world_size=world_size())
        progress = self.progress and is_main_process()
        # the masks first: a feature cache stores the draws of them
        self.masks = training_masks_for_run(self.config, self.model, self.tokenizer, self.device)
        self.feature_cache = feature_cache_for_run(
            self.config, self.model, self.plan, self.backbone_dir, self.train_set, self.device,
            self.amp_dtype, progress=progress, masks=self.masks,
        )
        self.state_mix = sampler_state_mix_for_run(  # None unless training.sampler_state_ratio > 0
            self.config, self.model, self.plan, self.backbone_dir, self.train_set, self.tokenizer,
            self.device, progress=progress,
        )
        train: Dataset = self.train_set if self.feature_cache is None else self.feature_cache
        order: Sampler = self.sampler
        if self.feature_cache is not None:  # phase 1 reads the backbone's outputs from disk
            order = DrawSampler(self.sampler, self.feature_cache.n_draws)
        loaders = run_loaders(self.config, train, order, self.eval_set, self.device)
        self.train_loader, self.eval_loader = loaders
        self.sampled_validation = SampledValidation.for_run(self.config)  # None unless val_sampled_problems
        self.micro_per_epoch = math.ceil(self.sampler.shard_size / t.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / t.gradient_accumulation_steps)
        planned = self.steps_per_epoch * t.num_epochs
        self.total_steps = min(planned, t.max_steps) if t.max_steps else planned

    def _setup_optimizer(self) -> None:
        built = build_run_optimizer(self.plan, self.config.training, self.total_steps)
        self.optimizer, self.scheduler = built.optimizer, built.scheduler
        self.warmup_steps = built.warmup_steps
        decay = self.config.training.ema_decay
        if decay > 0 and self.strategy == "fsdp":
            raise ConfigError(
                "training.ema_decay averages full tensors; use advanced.distributed: ddp with it"
            )
        self.ema = WeightEMA(self.model, self.plan.trainable_names, decay) if decay > 0 else None

    def _setup_state(self) -> None:
        """Position in the run, the logging window, health checks and output paths; then the run's report."""
        config = self.config
        self.state = TrainState()
        self._window = LogWindow()  # metrics since the last logged row (checkpointed: rows survive a resume)
        self.health = HealthMonitor(
            enabled=config.advanced.health_checks,
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
        directory = restore_run(self, path)
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
                f"(epoch {self.state.epoch} of {t.num_epochs}); nothing to train. Raise training.max_steps "
                "or training.num_epochs to continue it"
            )
            if main and cfg.output.keep_last > 0:  # what a crash after the last save may have left
                prune_snapshots(self.checkpoint_dir, cfg.output.keep_last)
            return run_summary(self, 0.0, finished=True)
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
            self.train_csv = MetricsWriter(self.output_dir / "training_metrics.csv", TRAIN_COLUMNS)
            val_path = self.output_dir / "validation_metrics.csv"
            self.val_csv = MetricsWriter(val_path, validation_columns(cfg))
            self.train_csv.truncate_after(self.state.step)
            self.val_csv.truncate_after(self.state.step)
            self.tensorboard = TensorBoardLog.for_run(
                cfg.output.tensorboard, self.output_dir, self.state.step
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
        detect = cfg.advanced.detect_anomaly
        anomaly = torch.autograd.set_detect_anomaly(True) if detect else contextlib.nullcontext()
        self._window.restart()
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

        if self._finished() and self.eval_loader is not None and self._evaluated_at != self.state.step:
            self._validate_and_track_best()
        self._save("last")
        return run_summary(self, time.perf_counter() - started)

    def _finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.epoch >= self.config.training.num_epochs

    def _run_epoch(self, stop_at: int, bar: Any) -> None:
        """Consume the rest of the current epoch, or stop once `stop_at` optimizer steps are done."""
        t = self.config.training
        accum = t.gradient_accumulation_steps
        self.sampler.set_epoch(self.state.epoch, start=self.state.batches_in_epoch * t.batch_size)
        for batch in self.train_loader:
            index = self.state.batches_in_epoch
            window_start = (index // accum) * accum
            window = min(accum, self.micro_per_epoch - window_start)  # an epoch's last window may be short
            if self.state_mix is not None:  # this micro-batch may read sampler states instead
                batch = self.state_mix.batch_for(self.state.epoch, index, self.micro_per_epoch) or batch
            self._micro_step(batch, scale=1.0 / window, sync=index + 1 - window_start >= window)
            self.state.batches_in_epoch += 1
            if self.state.batches_in_epoch - window_start < window:
                continue
            self._optimizer_step()
            bar.set_postfix(loss=f"{self._last_loss:.4f}", lr=f"{learning_rates(self.optimizer)['lr']:.2e}")
            bar.update(1)
            step = self.state.step
            if step % t.log_every == 0 or step == self.total_steps:
                self._log_train_row()
            if self.eval_loader is not None and t.eval_every and step % t.eval_every == 0:
                self._validate_and_track_best()
                self._evaluated_at = step
            if t.save_every and step % t.save_every == 0 and step < stop_at:  # `train` saves the end
                self._save("last")
            if step >= stop_at:
                return

    def _micro_step(self, batch: Mapping[str, torch.Tensor], scale: float, sync: bool = True) -> None:
        """Forward + backward of one micro-batch; `sync`: it closes an accumulation window (DDP reduces)."""
        from_states = state_noise(batch) is not None  # a sampler-state batch brings its own noise
        noise = None if self.feature_cache is not None or from_states else self._draw_noise(batch)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(self.engine, sync):
            with self._autocast():
                features = None
                if from_states:  # the frozen backbone runs live on the recorded state
                    noise = state_noise(batch)
                elif self.feature_cache is not None:  # the backbone's outputs and their noise, from disk
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
        self._window.add(terms, tokens=result.tokens)
        self._window.add(forward_statistics(result.output.stats, result.masked, self.config.model.chunk_size))

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
        sync_ignored_gradients(self.engine)
        grad_norm = clip_grad_norm(params, t.max_grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            terms = {"grad_norm": grad_norm, "loss": self._last_loss}
            self._non_finite("the gradient norm is not finite", terms)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
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

    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        """Validation loss and masked-token accuracies (`training.validation`), as a validation CSV row.

        Under torch.distributed every rank evaluates the whole validation set (same result everywhere).
        """
        if self.eval_loader is None:
            return {}
        with unsharded(self.engine):  # FSDP: gather the root's tensors for direct features/refine calls
            row = validate(
                self.model,
                self.eval_loader,
                mask_id=self.mask_id,
                chunk_size=self.config.model.chunk_size,
                seed=self.config.data.validation_seed,
                device=self.device,
                autocast=self._autocast,
                max_batches=max_batches if max_batches is not None else self.config.training.eval_max_batches,
            )
            if row:  # the results of the answer's lines, teacher-forced (the study's secondary endpoint)
                row.update(result_accuracy(
                    self.model, self.eval_loader, self.token_text, mask_id=self.mask_id, device=self.device,
                    autocast=self._autocast, max_batches=max_batches or self.config.training.eval_max_batches,
                ))  # fmt: skip
            if row and self.sampled_validation is not None:
                row.update(self.sampled_validation(self.model, self.tokenizer))
        return {"step": self.state.step, "epoch": self._epoch_progress(), **row} if row else {}

    def reachability(self, max_batches: int | None = None) -> dict[str, Any]:
        """Which of the backbone's wrong tokens on validation the run's update budget can flip
        (`validation.reachability_report`); {} without a refiner or a validation set."""
        if self.eval_loader is None or self.config.model.refiner == "none":
            return {}
        masks = TrainingMasks(
            self.masks.distribution,
            self.mask_id,
            self.config.data.validation_seed + VALIDATION_SEED_OFFSET,
            token_text=self.masks.token_text,
            probe=self.masks.probe,
        )
        batches = max_batches if max_batches is not None else self.config.training.eval_max_batches
        with unsharded(self.engine), self._autocast():
            return reachability_report(
                self.model, self.eval_loader, masks, self.config, device=self.device, max_batches=batches
            )

    def _validate_and_track_best(self) -> None:
        row = broadcast_object(self.evaluate())  # rank 0's numbers: every rank takes the same save decision
        if not row:
            return
        self.last_val_row = row
        if is_main_process():
            if self.progress:
                note(validation_line(row, self.total_steps))
            self.val_csv.log(row)
            self.tensorboard.log("validation", row)
        value = row.get(self.config.output.save_best)
        if improves(value, self.state.best_metric, lower=self.config.output.best_is_lower):
            self.state.best_metric = float(value)
            self.state.best_step = self.state.step
            self._save("best")

    # ---------------------------------------------------------------------------------- checkpoints

    def _save(self, name: str) -> Path | None:
        """Write checkpoints/<name> (rank 0; every rank calls it, see `run_state.save_run`)."""
        return save_run(self, name)

    def _say(self, text: str) -> None:
        if is_main_process():
            tqdm.write(text)
