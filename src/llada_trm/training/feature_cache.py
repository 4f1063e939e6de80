"""Frozen-backbone feature cache: phase 1 pays for the backbone once, then every epoch costs only the refiner.

With the backbone frozen, its outputs for a fixed noise draw are a pure function of the data:

    x_t^(i,d) = forward_process(x_0^(i), generator seeded by (seed, i, d))     example i, draw d
    h, ctx, logits_0 = backbone(x_t^(i,d))

so they are computed once (`n_draws` draws per example; epoch e uses draw e % n_draws) and stored. The
noise is `diffusion.forward_process.draw_noise`, the same per-row seeding the live step uses.
Training then runs `hybrid.refine(features)` and the same objective. `logits_0` is not stored (LLaDA-8B's
V = 126k would take 250 KB a token): the LM head recomputes it from the cached h at the masked positions, the
only ones the objective reads. With an fp32 cache this reproduces the live step to rounding; with bf16 (the
default) the hidden states carry bf16's 8-bit mantissa, as they already do when the backbone runs in bf16.

Every example is padded to the longest training example (the backbone attends to the padding, so a row's
features would otherwise depend on the batch it was drawn with).

Layout of a cache directory:

    manifest.json            what the cache was built from (see `expected_manifest`), `complete` once done
    shard_00000.safetensors  examples [k*E, (k+1)*E): hidden_states [n, D_draws, L, D] (cache dtype),
    ...                      contexts [n, D_draws, L, Dc] (when the slot refiner reads backbone layers),
                             masked [n, D_draws, L] bool, p_mask [n, D_draws] f32, input_ids [n, L] i32,
                             prompt_lengths [n] i64

Shards are written to a temporary name and renamed, so a present shard is complete and an interrupted build
resumes after the last one. A cache whose manifest disagrees with the run (other backbone weights, data,
noise or feature settings) is refused with a one-line `StaleFeatureCacheError` saying how to rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from llada_trm.build import apply_backbone_options, backbone_dtype, build_datasets, build_model, start_run
from llada_trm.config import RunConfig
from llada_trm.data import EncodedExample, collate_batch
from llada_trm.diffusion.forward_process import draw_noise
from llada_trm.diffusion.targeted_masks import TrainingMasks
from llada_trm.dist_utils import is_distributed, is_main_process
from llada_trm.errors import ConfigError
from llada_trm.hybrid import BackboneFeatures, LLaDATRMHybrid
from llada_trm.io import DTYPES, atomic_path
from llada_trm.progress import Bar, progress_bar
from llada_trm.run_checkpoint import init_from_config
from llada_trm.training.cache_manifest import (
    CACHE_FORMAT_VERSION,
    MANIFEST_FILE,
    FeatureSpec,
    NoiseSpec,
    StaleFeatureCacheError,
    backbone_fingerprint,
    check_manifest,
    data_fingerprint,
    expected_manifest,
    read_manifest,
    remove_store,
    shard_layout,
    shard_name,
    store_directory,
    sweep_temporaries,
    write_manifest,
)
from llada_trm.training.cached_batches import FeatureCache, cached_features, open_feature_cache
from llada_trm.training.freezing import FreezePlan, freeze_for_run
from llada_trm.training.masks import training_masks_for_run

__all__ = [  # the cache's manifest (`cache_manifest`) and reading side (`cached_batches`) are re-exported
    "CACHE_FORMAT_VERSION",
    "MANIFEST_FILE",
    "FeatureCache",
    "FeatureSpec",
    "NoiseSpec",
    "StaleFeatureCacheError",
    "backbone_fingerprint",
    "build_feature_cache",
    "cache_directory",
    "cached_features",
    "data_fingerprint",
    "expected_manifest",
    "open_feature_cache",
    "prepare_feature_cache",
    "require_frozen_backbone",
    "write_feature_cache",
]


# ------------------------------------------------------------------------------------------------ build


def _shard_complete(path: Path, first: int, count: int) -> bool:
    """A renamed-into-place shard is complete; its metadata must still say which examples it holds."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError):
        return False
    return meta.get("first_example") == str(first) and meta.get("count") == str(count)


# public builder (tests, bench, docs/architecture.md): each keyword is a build knob callers pass by name
def write_feature_cache(  # noqa: PLR0913
    model: LLaDATRMHybrid,
    examples: Sequence[EncodedExample],
    directory: str | Path,
    manifest: Mapping[str, Any],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    examples_per_shard: int | None = None,
    progress: bool = True,
    masks: TrainingMasks | None = None,
) -> FeatureCache:
    """Build (or resume building) the cache described by `manifest` and return it opened.

    `masks`: the run's phase-1 masks (`training.masks`); None draws LLaDA's forward process.

    An existing manifest must match `manifest` (else `StaleFeatureCacheError`); its shard layout is kept,
    and shards already on disk are skipped. `examples_per_shard` defaults to ~256 MiB shards.
    """
    directory = Path(directory)
    device = torch.device(device)
    stored = read_manifest(directory)
    if stored is not None:
        check_manifest(stored, manifest, directory)
        if stored.get("complete"):
            return FeatureCache(directory, stored)
        manifest = stored
        sweep_temporaries(directory)  # shards a killed build was writing
    elif directory.is_dir() and any(directory.iterdir()):
        raise ConfigError(
            f"{directory}: not empty and not a feature cache (no {MANIFEST_FILE}); set "
            "advanced.feature_cache_dir to an empty or new directory"
        )
    else:
        layout = shard_layout(manifest, examples_per_shard)
        manifest = {**manifest, "layout": layout}
        directory.mkdir(parents=True, exist_ok=True)
        write_manifest(directory, manifest)

    writer = _ShardWriter(model, examples, manifest, pad_id, batch_size, device, autocast_dtype, masks)
    n_shards = int(manifest["layout"]["shards"])
    todo = [k for k in range(n_shards) if not _shard_complete(directory / shard_name(k), *writer.span(k))]
    total = sum(writer.span(k)[1] for k in todo) * writer.n_draws
    every = max(1, total // 20)  # in a log: about 20 plain lines
    with progress_bar(total, desc="feature cache", unit="item", every=every, enabled=progress) as bar:
        for k in todo:
            writer.write(k, directory / shard_name(k), bar)
    manifest = {**manifest, "complete": True}
    write_manifest(directory, manifest)
    return FeatureCache(directory, manifest)



class _ShardWriter:
    """Runs the frozen backbone over one shard's examples (every draw) and writes the shard atomically."""

    def __init__(
        self,
        model: LLaDATRMHybrid,
        examples: Sequence[EncodedExample],
        manifest: Mapping[str, Any],
        pad_id: int,
        batch_size: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        masks: TrainingMasks | None = None,
    ) -> None:
        self.model = model
        self.masks = masks
        self.examples = examples
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.seq_len = int(manifest["data"]["seq_len"])
        noise = manifest["noise"]
        self.seed, self.n_draws = int(noise["seed"]), int(noise["draws"])
        self.eps, self.mask_id = float(noise["eps"]), int(noise["mask_id"])
        self.dtype = DTYPES[manifest["features"]["dtype"]]
        self.per_shard = int(manifest["layout"]["examples_per_shard"])

    def span(self, shard: int) -> tuple[int, int]:
        first = shard * self.per_shard
        return first, min(self.per_shard, len(self.examples) - first)

    def write(self, shard: int, path: Path, bar: Bar) -> None:
        first, count = self.span(shard)
        batch = collate_batch(self.examples[first : first + count], self.pad_id, pad_to=self.seq_len)
        tensors: dict[str, list[Tensor]] = {"hidden_states": [], "contexts": [], "masked": [], "p_mask": []}
        for draw in range(self.n_draws):
            per_draw: dict[str, list[Tensor]] = {key: [] for key in tensors}
            for start in range(0, count, self.batch_size):
                rows = slice(start, min(start + self.batch_size, count))
                ids = batch["input_ids"][rows]
                examples = range(first + rows.start, first + rows.stop)
                if self.masks is None:
                    noisy, masked, p_mask = draw_noise(
                        ids, batch["prompt_lengths"][rows], self.mask_id, seed=self.seed, examples=examples,
                        draws=draw, eps=self.eps,
                    )
                else:
                    part = {key: value[rows] for key, value in batch.items()}
                    noisy, masked, p_mask = self.masks.draw(part, examples, draw)
                features = self._features(noisy)
                per_draw["hidden_states"].append(features.hidden_states.to("cpu", self.dtype))
                if features.contexts is not None:
                    per_draw["contexts"].append(features.contexts.to("cpu", self.dtype))
                per_draw["masked"].append(masked)
                per_draw["p_mask"].append(p_mask[:, 0].float())
                bar.update(ids.shape[0])
            for key, parts in per_draw.items():
                if parts:
                    tensors[key].append(torch.cat(parts))
        out = {key: torch.stack(parts, dim=1).contiguous() for key, parts in tensors.items() if parts}
        out["input_ids"] = batch["input_ids"].to(torch.int32)
        out["prompt_lengths"] = batch["prompt_lengths"].to(torch.int64)
        with atomic_path(path) as tmp:
            save_file(out, str(tmp), metadata={"first_example": str(first), "count": str(count)})

    @torch.no_grad()
    def _features(self, noisy: Tensor) -> BackboneFeatures:
        noisy = noisy.to(self.device)
        if self.autocast_dtype is None:
            return self.model.features(noisy)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            return self.model.features(noisy)


# ----------------------------------------------------------------------------------------- run configs


def cache_directory(config: RunConfig) -> Path:
    """`advanced.feature_cache_dir`, or `<output.dir>/feature_cache` when unset."""
    return store_directory(config.advanced.feature_cache_dir, config.output.dir, "feature_cache")


def prepare_feature_cache(  # noqa: PLR0913 - the run, its model and data, where and how to compute
    config: RunConfig,
    model: LLaDATRMHybrid,
    examples: Sequence[EncodedExample],
    *,
    backbone_dir: str | Path,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    progress: bool = True,
    masks: TrainingMasks | None = None,
) -> FeatureCache:
    """The run's cache, opened; built first if absent, resumed if unfinished, refused if stale.

    Under torch.distributed only rank 0 builds; the others wait at a barrier and then open it.
    """
    directory = cache_directory(config)
    adv = config.advanced
    compute = str(model.backbone.dtype).removeprefix("torch.")
    if autocast_dtype is not None:
        compute += f" autocast {str(autocast_dtype).removeprefix('torch.')}"
    manifest = expected_manifest(
        backbone=backbone_fingerprint(backbone_dir),
        backbone_path=str(backbone_dir),
        examples=examples,
        pad_id=pad_id,
        noise=NoiseSpec(
            seed=config.training.seed, n_draws=adv.cache_noise_draws, mask_id=model.mask_token_id,
            masks=config.training.masks, forward_mix=config.training.forward_mix,
        ),
        features=FeatureSpec.for_model(model, DTYPES[adv.cache_dtype], compute),
    )
    if is_main_process():
        cache = write_feature_cache(
            model,
            examples,
            directory,
            manifest,
            pad_id=pad_id,
            batch_size=config.training.batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            progress=progress,
            masks=masks,
        )
    if is_distributed():
        torch.distributed.barrier()
    if not is_main_process():
        cache = open_feature_cache(directory, manifest)
    return cache


def require_frozen_backbone(plan: FreezePlan, setting: str = "advanced.feature_cache") -> None:
    """The cache holds a frozen backbone's outputs (so do the sampler states, `setting` names which): a run
    that trains backbone parameters cannot use one."""
    if not plan.backbone_frozen:
        raise ConfigError(
            f"{setting}: the cache holds a frozen backbone's outputs, but this run trains "
            "backbone parameters; use training.phase 1 with trainable_modules inside refinement_head"
        )


def build_feature_cache(config: RunConfig, *, progress: bool = True, rebuild: bool = False) -> Path:
    """`llada-trm cache --config FILE`: build (or resume, or confirm) the run's feature cache; its directory.

    The run is assembled by `llada_trm.build` in the trainer's order (device, precision and seed, backbone,
    `training.init_from`, freezing plan, data), so the cache is the one training will accept; no optimizer
    is built. `rebuild=True` deletes an existing cache first: only a feature cache (`remove_store`).
    """
    if rebuild:
        remove_store(cache_directory(config))
    config = config.model_copy(deep=True)
    config.advanced.feature_cache = True
    device, amp_dtype = start_run(config)
    built = build_model(config, device=device, dtype=backbone_dtype(config, amp_dtype))
    init_from_config(built.model, config, backbone_dir=built.backbone_dir)
    apply_backbone_options(built.model, config)
    require_frozen_backbone(freeze_for_run(built.model, config))
    train_set, _ = build_datasets(config.data, built.tokenizer)
    cache = prepare_feature_cache(
        config,
        built.model,
        train_set.examples,
        backbone_dir=built.backbone_dir,
        pad_id=train_set.pad_id,
        device=device,
        autocast_dtype=amp_dtype,
        progress=progress and is_main_process(),
        masks=training_masks_for_run(config, built.model, built.tokenizer, device),
    )
    return cache.directory
