"""Reading a complete feature cache: the (example, draw) dataset and the batch the objective trains on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset

from llada_trm.errors import ConfigError
from llada_trm.hybrid import BackboneFeatures
from llada_trm.training.cache_manifest import (
    MANIFEST_FILE,
    StaleFeatureCacheError,
    check_manifest,
    read_manifest,
    shard_name,
)

__all__ = ["FeatureCache", "cached_features", "open_feature_cache"]


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
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} is outside the cache's {self.num_examples} examples")
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
            "--config "
            f"<config> --rebuild` (or `rm -r {self.directory}`)"
        )

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        """One (example, draw): hidden_states [L, D], contexts [L, Dc], masked [L], p_mask [], input_ids [L],
        prompt_lengths []."""
        index, draw = item
        if not 0 <= draw < self.n_draws:
            raise IndexError(f"draw {draw} is outside the cache's {self.n_draws} draws")
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
    model: torch.nn.Module, batch: Mapping[str, Tensor]
) -> tuple[BackboneFeatures, tuple[Tensor, Tensor, Tensor]]:
    """A cached batch as `(BackboneFeatures, (noisy_ids, masked, p_mask))` for `diffusion_objective`.

    The backbone logits are rebuilt by the LM head at the masked positions only: the objective, the chunk
    confidence and the halting read nothing else, and elsewhere they stay zero. Call under the same autocast
    as the live step.
    """
    core = getattr(model, "module", model)
    dtype = core.backbone.dtype
    hidden = batch["hidden_states"].to(dtype)
    contexts = batch.get("contexts")
    masked = batch["masked"].bool()
    with torch.no_grad():
        rows = masked.nonzero(as_tuple=True)
        row_logits = core.lm_head(hidden[rows])
        base = row_logits.new_zeros(*masked.shape, row_logits.shape[-1]).index_put_(rows, row_logits)
    features = BackboneFeatures(
        hidden_states=hidden,
        base_logits=base,
        contexts=None if contexts is None else contexts.to(dtype),
        masked=masked,
    )
    noisy = torch.where(masked, torch.full_like(batch["input_ids"], core.mask_token_id), batch["input_ids"])
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
