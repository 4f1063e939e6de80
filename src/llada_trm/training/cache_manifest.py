"""What a feature cache was built from: fingerprints, the manifest, its check, the shard layout.

The manifest's sections (`backbone`, `data`, `noise`, `features`) must match the run exactly for a cache to be
used; `layout` and `complete` describe the cache itself. `training.feature_cache` builds and opens caches.
The manifest is also what makes a directory a store: `remove_store` (`cache --rebuild`) deletes only a
directory whose manifest is a store's and whose files are all the store's own.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llada_trm.data import EncodedExample
from llada_trm.errors import ConfigError
from llada_trm.hybrid import LLaDATRMHybrid
from llada_trm.io import DTYPES, remove_directory, sweep_temporaries, write_text_atomic

__all__ = [
    "store_directory",
    "CACHE_FORMAT_VERSION",
    "MANIFEST_FILE",
    "FeatureSpec",
    "NoiseSpec",
    "StaleFeatureCacheError",
    "backbone_fingerprint",
    "check_manifest",
    "data_fingerprint",
    "expected_manifest",
    "read_manifest",
    "remove_store",
    "shard_layout",
    "sweep_temporaries",
    "shard_name",
    "write_manifest",
]

CACHE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
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


@dataclass(frozen=True)
class NoiseSpec:
    """The manifest's `noise` section: the draws the cache holds (`n_draws` per example), from the forward
    process or the run's `training.masks` (`diffusion.targeted_masks`)."""

    seed: int
    n_draws: int
    mask_id: int
    eps: float = 1e-3
    masks: str = "forward"
    forward_mix: float = 0.0


@dataclass(frozen=True)
class FeatureSpec:
    """The manifest's `features` section: what each stored feature is; `compute` names the backbone's
    precision."""

    cache_dtype: torch.dtype
    compute: str
    context_layers: Sequence[int]
    d_model: int
    context_dim: int | None

    @classmethod
    def for_model(cls, model: LLaDATRMHybrid, cache_dtype: torch.dtype, compute: str) -> FeatureSpec:
        """The features `model` produces: its hidden width and, when the refiner reads backbone layers,
        their context width."""
        bb = model.backbone.config
        return cls(
            cache_dtype=cache_dtype,
            compute=compute,
            context_layers=model.context_layers,
            d_model=bb.d_model,
            context_dim=bb.n_heads * bb.head_dim,
        )


def _noise_section(noise: NoiseSpec) -> dict[str, Any]:
    """The forward process is recorded as before (so caches built then stay valid); other masks add names."""
    section: dict[str, Any] = {"seed": noise.seed, "draws": noise.n_draws, "eps": noise.eps}
    section["mask_id"] = noise.mask_id
    if noise.masks != "forward":
        section.update(masks=noise.masks, forward_mix=noise.forward_mix)
    return section


def expected_manifest(
    *,
    backbone: str,
    examples: Sequence[EncodedExample],
    pad_id: int,
    noise: NoiseSpec,
    features: FeatureSpec,
    backbone_path: str = "",
) -> dict[str, Any]:
    """What a cache for this run must have been built from.

    `backbone` is `backbone_fingerprint(dir)`. The sections other than `layout` and `complete` must match a
    cache on disk exactly (`check_manifest`); `backbone.path` is informational.
    """
    if noise.n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {noise.n_draws}")
    if not examples:
        raise ValueError("a feature cache needs at least one training example")
    seq_len = max(len(example["input_ids"]) for example in examples)
    layers = list(features.context_layers)
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "complete": False,
        "backbone": {"fingerprint": backbone, "path": backbone_path},
        "data": {
            "fingerprint": data_fingerprint(examples, seq_len, pad_id),
            "examples": len(examples),
            "seq_len": seq_len,
        },
        "noise": _noise_section(noise),
        "features": {
            "dtype": str(features.cache_dtype).removeprefix("torch."),
            "compute": features.compute,
            "context_layers": layers,
            "d_model": features.d_model,
            "context_dim": features.context_dim if layers else None,
        },
    }




_CHECKED = {  # manifest section -> what a mismatch means to the user
    "format_version": "another cache format version",
    "backbone": "other backbone weights or config (model.backbone)",
    "data": "other training data (data.* settings, data.max_length or the tokenizer)",
    "noise": "other noise draws (training.seed, training.masks or advanced.cache_noise_draws)",
    "features": "other feature settings (model.context_layers, advanced.cache_dtype or backbone precision)",
}


def check_manifest(
    stored: Mapping[str, Any],
    expected: Mapping[str, Any],
    directory: Path,
    *,
    sections: Mapping[str, str] = _CHECKED,
    rebuild: str = "llada-trm cache --config <config> --rebuild",
) -> None:
    """Refuse a cache whose manifest disagrees with `expected` in any checked section.

    `sections` (section -> what a mismatch means) and the `rebuild` command default to the feature cache's;
    the sampler-state store (`training.sampler_states`) passes its own.
    """
    what = "feature cache" if sections is _CHECKED else "sampler-state store"
    setting = "advanced.feature_cache_dir" if sections is _CHECKED else "advanced.sampler_states_dir"
    for section, meaning in sections.items():
        have, want = stored.get(section), expected[section]
        if section == "backbone":
            have, want = (have or {}).get("fingerprint"), want["fingerprint"]
        if have != want:
            raise StaleFeatureCacheError(
                f"{directory}: stale {what}, built from {meaning}; rebuild it with `{rebuild}` (or `rm -r "
                f"{directory}`), or set {setting} to a new directory"
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


def remove_store(directory: Path, *, sections: Mapping[str, str] = _CHECKED) -> bool:
    """`cache --rebuild`: delete `directory` when it is a store this command built, else refuse in one line.

    A store is a directory whose manifest has every section of `sections` (the feature cache's by default,
    the sampler-state store's when passed; any format version, since a stale one is what --rebuild is
    for) and which holds only the store's files (the manifest, shards, temporary files). Anything else (a
    training run, a home folder named by a shared config) is never touched. Returns whether it deleted.
    """
    what = "feature cache" if sections is _CHECKED else "sampler-state store"
    setting = "advanced.feature_cache_dir" if sections is _CHECKED else "advanced.sampler_states_dir"
    if not directory.exists() and not directory.is_symlink():
        return False
    if not directory.is_dir() or directory.is_symlink():
        raise ConfigError(
            f"{directory}: not a {what} directory; --rebuild deletes only a {what}: set {setting} to a new "
            "directory"
        )
    if not any(directory.iterdir()):
        return False
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or not all(section in manifest for section in sections):
        raise ConfigError(
            f"{directory}: not a {what} (no {what} {MANIFEST_FILE}); --rebuild deletes only a {what} it "
            f"built: set {setting} to a new or empty directory, or remove this one yourself"
        )
    foreign = sorted(p.name for p in directory.iterdir() if not _store_file(p))
    if foreign:
        raise ConfigError(
            f"{directory}: holds {foreign[0]}, which the {what} did not write; --rebuild deletes only the "
            f"{what}: move it out first, or set {setting} to a new directory"
        )
    remove_directory(directory)
    return True


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    write_text_atomic(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ layout


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def shard_layout(manifest: Mapping[str, Any], examples_per_shard: int | None) -> dict[str, int]:
    """How many examples a shard holds (default: ~256 MiB shards) and how many shards there are."""
    n = int(manifest["data"]["examples"])
    if examples_per_shard is None:
        feats = manifest["features"]
        width = int(feats["d_model"]) + int(feats["context_dim"] or 0)
        itemsize = torch.empty((), dtype=DTYPES[feats["dtype"]]).element_size()
        per_example = int(manifest["noise"]["draws"]) * int(manifest["data"]["seq_len"]) * width * itemsize
        examples_per_shard = max(1, SHARD_BYTES // per_example)
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    examples_per_shard = min(examples_per_shard, n)
    return {"examples_per_shard": examples_per_shard, "shards": math.ceil(n / examples_per_shard)}


def store_directory(configured: str | None, output_dir: str, name: str) -> Path:
    """Where a run's stored precomputation lives: the configured directory, or `<output.dir>/<name>`."""
    return Path(configured).expanduser() if configured else Path(output_dir) / name
