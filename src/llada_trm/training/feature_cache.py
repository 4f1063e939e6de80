"""Frozen-backbone feature cache: phase 1 pays for the backbone once, then every epoch costs only the refiner.

Shards of the backbone's outputs for fixed noise draws beside a `manifest.json` of what they were built from
(a cache that disagrees with the run is refused in one line); logits are not stored (LLaDA-8B's vocabulary:
250 KB a token), the LM head rebuilds them at the masked positions. Layout: docs/feature_cache.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from llada_trm.config import RunConfig
from llada_trm.data.collate import EncodedExample, collate_batch
from llada_trm.diffusion.forward_process import TrainingMasks, draw_noise
from llada_trm.dist_utils import is_distributed, is_main_process
from llada_trm.errors import ConfigError
from llada_trm.io import DTYPES, atomic_path, remove_directory, sweep_temporaries, write_text_atomic
from llada_trm.model.hybrid import BackboneFeatures, LLaDATRMHybrid
from llada_trm.progress import progress_bar

CACHE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CACHE_DTYPE = torch.bfloat16  # stored features: half of float32's disk and reads; LLaDA-8B's own precision
SHARD_BYTES = 256 * 2**20  # target shard size: big enough for few files, small enough to redo after a crash
_FULL_HASH_BYTES = 64 * 2**20  # weight files up to this size are hashed whole, larger ones by samples
_SAMPLE_BYTES = 4 * 2**20


class StaleFeatureCacheError(ConfigError):
    """A feature cache on disk was built from another backbone, data, noise or feature settings."""


# ------------------------------------------------------------------------------------------ fingerprints


def backbone_fingerprint(directory: str | Path) -> str:
    """A content hash of a checkpoint: config.json, every safetensors file's header and its bytes.

    Files up to 64 MiB are hashed whole; larger ones (LLaDA-8B's 5 GB shards) by size, header and three
    4 MiB samples (start, middle, end), which any re-training or fine-tuning changes. Modification times are
    deliberately left out, so a copied checkpoint keeps its caches.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    digest.update((directory / "config.json").read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= _FULL_HASH_BYTES:
                for block in iter(lambda: handle.read(2**20), b""):
                    digest.update(block)
                continue
            header = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header))
            for offset in (0, size // 2, max(size - _SAMPLE_BYTES, 0)):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def data_fingerprint(examples: Sequence[EncodedExample], seq_len: int, pad_id: int) -> str:
    """A hash of the encoded training examples (ids and prompt lengths, in order) and their padding."""
    digest = hashlib.sha256(f"{seq_len}/{pad_id}/{len(examples)}".encode())
    for example in examples:
        digest.update(int(example["prompt_length"]).to_bytes(4, "little"))
        ids = np.asarray(example["input_ids"], dtype=np.int64)
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(ids.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- manifest


def expected_manifest(  # noqa: PLR0913 - what a cache is built from, each by name
    model: LLaDATRMHybrid,
    *,
    backbone: str,
    examples: Sequence[EncodedExample],
    pad_id: int,
    seed: int,
    draws: int,
    cache_dtype: torch.dtype,
    compute: str,
    masks: str = "forward",
    forward_mix: float = 0.0,
    backbone_path: str = "",
) -> dict[str, Any]:
    """What a cache of `model`'s features for this run must have been built from: `draws` noise draws per
    example from the forward process or the run's `training.masks`, stored as `cache_dtype` (`compute`
    names the backbone's precision).

    `backbone` is `backbone_fingerprint(dir)`. The sections other than `layout` and `complete` must match a
    cache on disk exactly (`check_manifest`); `backbone.path` is informational.
    """
    seq_len = max(len(example["input_ids"]) for example in examples)
    layers = list(model.context_layers)
    bb = model.backbone.config
    # the forward process is recorded as before (so caches built then stay valid); other masks add names
    noise: dict[str, Any] = {"seed": seed, "draws": draws, "eps": 1e-3, "mask_id": model.mask_token_id}
    if masks != "forward":
        noise.update(masks=masks, forward_mix=forward_mix)
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "complete": False,
        "backbone": {"fingerprint": backbone, "path": backbone_path},
        "data": {
            "fingerprint": data_fingerprint(examples, seq_len, pad_id),
            "examples": len(examples),
            "seq_len": seq_len,
        },
        "noise": noise,
        "features": {
            "dtype": str(cache_dtype).removeprefix("torch."),
            "compute": compute,
            "context_layers": layers,
            "d_model": bb.d_model,
            "context_dim": bb.n_heads * bb.head_dim if layers else None,
        },
    }


_CHECKED = {  # manifest section -> what a mismatch means to the user
    "format_version": "another cache format version",
    "backbone": "other backbone weights or config (model.backbone)",
    "data": "other training data (data.* settings, data.max_length or the tokenizer)",
    "noise": "other noise draws (training.seed or training.masks)",
    "features": "other feature settings (model.context_layers or the backbone's precision)",
}


def check_manifest(stored: Mapping[str, Any], expected: Mapping[str, Any], directory: Path) -> None:
    """Refuse a cache whose manifest disagrees with `expected` in any checked section."""
    for section, meaning in _CHECKED.items():
        have, want = stored.get(section), expected[section]
        if section == "backbone":
            have, want = (have or {}).get("fingerprint"), want["fingerprint"]
        if have != want:
            raise StaleFeatureCacheError(
                f"{directory}: stale feature cache, built from {meaning}; rebuild it with `llada-trm cache "
                f"--config <config> --rebuild` (or `rm -r {directory}`), or set output.dir to a new directory"
            )


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest stored in `directory`, or None when there is none."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StaleFeatureCacheError(
            f"{path}: unreadable feature-cache manifest ({exc}); remove {directory} and rebuild the cache"
        ) from None


_STORE_FILES = re.compile(rf"{re.escape(MANIFEST_FILE)}|shard_\d{{5}}\.safetensors")
_TEMPORARY = re.compile(r"\..+\.tmp")  # `io.atomic_path`'s temporary files (a killed build's)


def _store_file(path: Path) -> bool:
    """Whether `path` is a file a store writes: its manifest, a shard, or a temporary one of those."""
    if _TEMPORARY.fullmatch(path.name):
        return True
    return path.is_file() and bool(_STORE_FILES.fullmatch(path.name))


def remove_store(directory: Path) -> bool:
    """`cache --rebuild`: delete `directory` when it is a store this command built, else refuse in one line.

    A store is a directory whose manifest has every section a feature cache's has (any format version,
    since a stale one is what --rebuild is for) and which holds only the store's files (the manifest,
    shards, temporary files). Anything else (a training run, a home folder named by a shared config) is
    never touched. Returns whether it deleted.
    """
    if not directory.exists() and not directory.is_symlink():
        return False
    if not directory.is_dir() or directory.is_symlink():
        raise ConfigError(
            f"{directory}: not a feature cache directory; --rebuild deletes only a feature cache: set "
            "output.dir to a new directory"
        )
    if not any(directory.iterdir()):
        return False
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not all(section in manifest for section in _CHECKED):
        raise ConfigError(
            f"{directory}: not a feature cache (no feature cache {MANIFEST_FILE}); --rebuild deletes only a "
            "feature cache it built: set output.dir to a new or empty directory, or remove this one yourself"
        )
    foreign = sorted(p.name for p in directory.iterdir() if not _store_file(p))
    if foreign:
        raise ConfigError(
            f"{directory}: holds {foreign[0]}, which the feature cache did not write; --rebuild deletes only "
            "the feature cache: move it out first, or set output.dir to a new directory"
        )
    remove_directory(directory)
    return True


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    write_text_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ layout


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


# ---------------------------------------------------------------------------------- reading a cache

class FeatureCache(Dataset):
    """A complete cache on disk as a dataset of (example, draw) items; `collate` stacks them into a batch.

    Items are read lazily from memory-mapped shards; the open handles are dropped when the dataset is
    pickled into DataLoader workers, which reopen their own.
    """

    def __init__(self, directory: str | Path, manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = dict(manifest)
        self.num_examples = int(manifest["data"]["examples"])
        self.seq_len = int(manifest["data"]["seq_len"])
        self.n_draws = int(manifest["noise"]["draws"])
        self.examples_per_shard = int(manifest["layout"]["examples_per_shard"])
        self.has_contexts = bool(manifest["features"]["context_layers"])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.num_examples

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def _shard(self, index: int) -> tuple[Any, int]:
        shard, local = divmod(index, self.examples_per_shard)
        if shard not in self._handles:
            path = self.directory / shard_name(shard)
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise self._corrupt(path, exc) from None
        return self._handles[shard], local

    def _corrupt(self, path: Path, exc: BaseException) -> StaleFeatureCacheError:
        """One line naming the shard and the command that rebuilds the cache."""
        reason = " ".join(str(exc).split())[:200]
        return StaleFeatureCacheError(
            f"{path}: corrupt feature-cache shard ({reason}); rebuild the cache with `llada-trm cache "
            f"--config <config> --rebuild` (or `rm -r {self.directory}`)"
        )

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        """One (example, draw): hidden_states [L, D], contexts [L, Dc], masked [L], p_mask [], input_ids [L],
        prompt_lengths []."""
        index, draw = item
        handle, local = self._shard(index)
        try:
            out = {
                "hidden_states": handle.get_slice("hidden_states")[local, draw],
                "masked": handle.get_slice("masked")[local, draw],
                "p_mask": handle.get_slice("p_mask")[local, draw],
                "input_ids": handle.get_slice("input_ids")[local].long(),
                "prompt_lengths": handle.get_slice("prompt_lengths")[local],
            }
            if self.has_contexts:
                out["contexts"] = handle.get_slice("contexts")[local, draw]
        except (SafetensorError, OSError, ValueError, IndexError, RuntimeError) as exc:
            raise self._corrupt(self.directory / shard_name(index // self.examples_per_shard), exc) from None
        return out

    def collate(self, items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Stack items into the batch `cached_features` reads (plus the SFT keys the objective reads)."""
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        batch["p_mask"] = batch["p_mask"][:, None].expand(-1, self.seq_len).contiguous()
        batch["answer_lengths"] = self.seq_len - batch["prompt_lengths"]
        return batch


def cached_features(
    model: LLaDATRMHybrid, batch: Mapping[str, Tensor]
) -> tuple[BackboneFeatures, tuple[Tensor, Tensor, Tensor]]:
    """A cached batch as `(BackboneFeatures, (noisy_ids, masked, p_mask))` for `diffusion_objective`.

    The backbone logits are rebuilt by the LM head at the masked positions only: the objective, the chunk
    confidence and the halting read nothing else, and elsewhere they stay zero. Call under the same autocast
    as the live step.
    """
    dtype = model.backbone.dtype
    hidden = batch["hidden_states"].to(dtype)
    contexts = batch.get("contexts")
    masked = batch["masked"].bool()
    with torch.no_grad():
        rows = masked.nonzero(as_tuple=True)
        row_logits = model.lm_head(hidden[rows])
        base = row_logits.new_zeros(*masked.shape, row_logits.shape[-1]).index_put_(rows, row_logits)
    features = BackboneFeatures(
        hidden_states=hidden,
        base_logits=base,
        contexts=None if contexts is None else contexts.to(dtype),
        masked=masked,
    )
    noisy = torch.where(masked, torch.full_like(batch["input_ids"], model.mask_token_id), batch["input_ids"])
    return features, (noisy, masked, batch["p_mask"])


def open_feature_cache(directory: str | Path, expected: Mapping[str, Any]) -> FeatureCache:
    """Open a complete cache, refusing a stale or unfinished one."""
    directory = Path(directory)
    stored = read_manifest(directory)
    if stored is None:
        raise ConfigError(
            f"{directory}: no feature cache here (no {MANIFEST_FILE}); build it with "
            "`llada-trm cache --config <config>` or train with advanced.feature_cache: true"
        )
    check_manifest(stored, expected, directory)
    if not stored.get("complete"):
        raise ConfigError(
            f"{directory}: the feature cache is unfinished; `llada-trm cache --config <config>` resumes it"
        )
    return FeatureCache(directory, stored)


# ------------------------------------------------------------------------------------------------ build


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
    if autocast_dtype is None:
        autocast = contextlib.nullcontext
    else:
        autocast = partial(torch.autocast, device_type=device.type, dtype=autocast_dtype)
    stored = read_manifest(directory)
    if stored is not None:
        check_manifest(stored, manifest, directory)
        if stored.get("complete"):
            return FeatureCache(directory, stored)
        manifest = stored
        sweep_temporaries(directory)  # shards a killed build was writing
    elif directory.is_dir() and any(directory.iterdir()):
        raise ConfigError(
            f"{directory}: not empty and not a feature cache (no {MANIFEST_FILE}); move it out of the way or "
            "set output.dir to a new directory"
        )
    else:  # a new cache: shards of ~SHARD_BYTES unless `examples_per_shard` is given
        n, feats = int(manifest["data"]["examples"]), manifest["features"]
        if examples_per_shard is None:
            width = int(feats["d_model"]) + int(feats["context_dim"] or 0)
            per_example = int(manifest["noise"]["draws"]) * int(manifest["data"]["seq_len"]) * width
            examples_per_shard = max(1, SHARD_BYTES // (per_example * DTYPES[feats["dtype"]].itemsize))
        per_shard = min(examples_per_shard, n)
        layout = {"examples_per_shard": per_shard, "shards": math.ceil(n / per_shard)}
        manifest = {**manifest, "layout": layout}
        directory.mkdir(parents=True, exist_ok=True)
        write_manifest(directory, manifest)

    per_shard, n_draws = int(manifest["layout"]["examples_per_shard"]), int(manifest["noise"]["draws"])
    spans = {k: (k * per_shard, min(per_shard, len(examples) - k * per_shard))  # first example, count
             for k in range(int(manifest["layout"]["shards"]))}  # fmt: skip
    todo = [k for k in spans if not (directory / shard_name(k)).is_file()]  # renamed into place: complete
    total = sum(spans[k][1] for k in todo) * n_draws
    noise, dtype = manifest["noise"], DTYPES[manifest["features"]["dtype"]]
    seq_len = int(manifest["data"]["seq_len"])
    every = max(1, total // 20)  # in a log: about 20 plain lines
    with progress_bar(total, desc="feature cache", unit="item", every=every, enabled=progress) as bar:
        for k in todo:  # the frozen backbone over the shard's examples, every draw; written atomically
            first, count = spans[k]
            batch = collate_batch(examples[first : first + count], pad_id, pad_to=seq_len)
            draws: list[dict[str, Tensor]] = []  # per draw: each stored feature of the shard's examples
            for draw in range(n_draws):
                parts: list[dict[str, Tensor]] = []
                for start in range(0, count, batch_size):
                    rows = slice(start, min(start + batch_size, count))
                    indices = range(first + rows.start, first + rows.stop)
                    if masks is None:
                        noisy, masked, p_mask = draw_noise(
                            batch["input_ids"][rows], batch["prompt_lengths"][rows], int(noise["mask_id"]),
                            seed=int(noise["seed"]), examples=indices, draws=draw, eps=float(noise["eps"]),
                        )
                    else:
                        part = {key: value[rows] for key, value in batch.items()}
                        noisy, masked, p_mask = masks.draw(part, indices, draw)
                    with torch.no_grad(), autocast():
                        features = model.features(noisy.to(device))
                    contexts = features.contexts
                    parts.append({
                        "hidden_states": features.hidden_states.to("cpu", dtype),
                        **({} if contexts is None else {"contexts": contexts.to("cpu", dtype)}),
                        "masked": masked,
                        "p_mask": p_mask[:, 0].float(),
                    })  # fmt: skip
                    bar.update(len(indices))
                draws.append({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
            out = {key: torch.stack([d[key] for d in draws], dim=1).contiguous() for key in draws[0]}
            out["input_ids"] = batch["input_ids"].to(torch.int32)
            out["prompt_lengths"] = batch["prompt_lengths"].to(torch.int64)
            with atomic_path(directory / shard_name(k)) as tmp:
                save_file(out, str(tmp))
    manifest = {**manifest, "complete": True}
    write_manifest(directory, manifest)
    return FeatureCache(directory, manifest)


# ----------------------------------------------------------------------------------------- run configs


def cache_directory(config: RunConfig) -> Path:
    """`<output.dir>/feature_cache`: the run's cache lives with the run."""
    return Path(config.output.dir) / "feature_cache"


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
    compute = str(model.backbone.dtype).removeprefix("torch.")
    if autocast_dtype is not None:
        compute += f" autocast {str(autocast_dtype).removeprefix('torch.')}"
    t = config.training
    manifest = expected_manifest(
        model, backbone=backbone_fingerprint(backbone_dir), backbone_path=str(backbone_dir),
        examples=examples, pad_id=pad_id, seed=t.seed, draws=config.advanced.cache_noise_draws,
        cache_dtype=CACHE_DTYPE, compute=compute, masks=t.masks, forward_mix=t.forward_mix,
    )
    if is_main_process():
        cache = write_feature_cache(
            model, examples, directory, manifest, pad_id=pad_id, batch_size=config.training.batch_size,
            device=device, autocast_dtype=autocast_dtype, progress=progress, masks=masks,
        )
    if is_distributed():
        torch.distributed.barrier()
    if not is_main_process():
        cache = open_feature_cache(directory, manifest)
    return cache


def build_feature_cache(config: RunConfig, *, progress: bool = True, rebuild: bool = False) -> Path:
    """`llada-trm cache --config FILE`: build (or resume, or confirm) the run's feature cache; its directory.

    The trainer's own setup builds it (no step is taken), so the cache is the one training will accept.
    `rebuild=True` deletes an existing cache first: only a feature cache (`remove_store`).
    """
    from llada_trm.training.loop import Trainer  # the loop reads caches through this module

    if rebuild:
        remove_store(cache_directory(config))
    config = config.model_copy(deep=True)
    config.advanced.feature_cache = True
    return Trainer(config, progress=progress).feature_cache.directory
