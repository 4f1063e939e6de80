"""Reading a sampler-state store and mixing its states into the trainer's epochs.

A sampler-state batch trains with the forward-process batches' objective (`diffusion_objective`, LLaDA's
`masked_diffusion_loss`), its noise taken from the store instead of drawn:

    noisy   = the recorded state (prompt, committed answer tokens, [MASK] at still-masked positions)
    masked  = noisy == [MASK]            (answer positions only: the prompt is never masked)
    p_mask  = masked.sum() / gen_length  (the state's masked fraction of its answer region, per row)
    targets = the reference answer; answer_lengths = gen_length

so the loss covers exactly the still-masked positions, each weighted 1/p_mask / answer_length as a forward-
process draw with that masked fraction would be. Rows are right-padded with EOS past prompt + gen_length
(unmasked: attended, never a target), as SFT batches are.

The mix: with ratio r, micro-batch j of epoch e (of M) reads sampler states iff j is among the first
round(r * M) entries of a permutation of 0..M-1 seeded by (seed, e); the forward-process batch the loader
gave at j is skipped, so an epoch keeps its length and the schedule its steps. The c-th state batch of the
epoch takes states c*W*B .. (c+1)*W*B - 1 (modulo their number) of a permutation of all states seeded by
(seed, e), rank r every W-th of them. Both depend on (seed, epoch, index) only, so a resume is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from llada_trm.errors import ConfigError
from llada_trm.training.cache_manifest import (
    MANIFEST_FILE,
    StaleFeatureCacheError,
    check_manifest,
    read_manifest,
    shard_name,
)

__all__ = [
    "SAMPLER_STATES_CHECKED",
    "STATE_KEYS",
    "SamplerStates",
    "StateMix",
    "open_sampler_states",
    "state_noise",
]

SAMPLER_STATES_CHECKED = {  # manifest section -> what a mismatch means to the user
    "format_version": "another store format version",
    "backbone": "other backbone weights or config (model.backbone)",
    "data": "other training data (data.* settings, data.max_length or the tokenizer)",
    "sampling": "other sampling settings (the run's sampling: section)",
    "states": "other state draws (training.seed, advanced.sampler_states_per_problem or backbone precision)",
}
STATE_KEYS = ("state_ids", "state_masked", "state_p_mask")  # a batch holding these trains on its own noise


class SamplerStates:
    """A complete store in memory (token ids only: a few hundred bytes a state) with its batch builder."""

    def __init__(self, directory: str | Path, manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = dict(manifest)
        sampling = manifest["sampling"]
        self.gen_length, self.mask_id = int(sampling["gen_length"]), int(sampling["mask_id"])
        parts: dict[str, list[Tensor]] = {}
        for shard in range(int(manifest["layout"]["shards"])):
            path = self.directory / shard_name(shard)
            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError) as exc:
                raise StaleFeatureCacheError(
                    f"{path}: unreadable sampler-state shard ({' '.join(str(exc).split())[:200]}); rebuild "
                    "the store with `llada-trm cache --sampler-states --config <config> --rebuild`"
                ) from None
            for key, value in tensors.items():
                parts.setdefault(key, []).append(value)
        self.tensors = {key: torch.cat(values) for key, values in parts.items()}

    def __len__(self) -> int:
        return int(self.tensors["step"].shape[0])

    def batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        """States `indices` as a training batch: the SFT keys (`input_ids` = targets) plus `STATE_KEYS`."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        prompt_lengths = self.tensors["prompt_lengths"][rows]
        width = int(prompt_lengths.max()) + self.gen_length  # trimmed to the batch's longest row
        states = self.tensors["states"][rows, :width].long()
        targets = self.tensors["targets"][rows, :width].long()
        masked = states == self.mask_id
        p_mask = masked.sum(dim=1, keepdim=True).float() / self.gen_length
        return {
            "input_ids": targets,
            "prompt_lengths": prompt_lengths,
            "answer_lengths": torch.full_like(prompt_lengths, self.gen_length),
            "state_ids": states,
            "state_masked": masked,
            "state_p_mask": p_mask.expand(-1, width).contiguous(),
        }


def state_noise(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """`(noisy, masked, p_mask)` of a sampler-state batch, None for a forward-process batch."""
    if STATE_KEYS[0] not in batch:
        return None
    return batch["state_ids"], batch["state_masked"], batch["state_p_mask"]


def _seed(seed: int, what: str, epoch: int) -> int:
    digest = hashlib.blake2b(f"llada-trm/state-mix/{what}/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StateMix:
    """Which micro-batches of an epoch read sampler states, and which states they read (module docstring)."""

    def __init__(
        self, states: SamplerStates, ratio: float, *, seed: int, batch_size: int, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"training.sampler_state_ratio must be in (0, 1] for a mix, got {ratio}")
        if len(states) == 0:
            raise ConfigError(f"{states.directory}: the sampler-state store holds no state; rebuild it")
        self.states, self.ratio, self.seed = states, ratio, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self._plans: dict[tuple[int, int], dict[int, int]] = {}
        self._orders: dict[int, Tensor] = {}

    def plan(self, epoch: int, micro_per_epoch: int) -> dict[int, int]:
        """{micro-batch index: its rank among the epoch's state batches}, for round(r * M) of the M."""
        key = (epoch, micro_per_epoch)
        if key not in self._plans:
            count = round(self.ratio * micro_per_epoch)
            generator = torch.Generator().manual_seed(_seed(self.seed, "batches", epoch))
            chosen = sorted(torch.randperm(micro_per_epoch, generator=generator)[:count].tolist())
            self._plans = {key: {index: c for c, index in enumerate(chosen)}}  # one epoch at a time
        return self._plans[key]

    def batch_for(self, epoch: int, index: int, micro_per_epoch: int) -> dict[str, Tensor] | None:
        """The state batch that replaces micro-batch `index` of `epoch`, or None when it stays as it is."""
        c = self.plan(epoch, micro_per_epoch).get(index)
        if c is None:
            return None
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(_seed(self.seed, "states", epoch))
            self._orders = {epoch: torch.randperm(len(self.states), generator=generator)}
        span = self.batch_size * self.world_size
        positions = torch.arange(c * span + self.rank, (c + 1) * span, self.world_size) % len(self.states)
        return self.states.batch(self._orders[epoch][positions])


def open_sampler_states(directory: str | Path, expected: Mapping[str, Any]) -> SamplerStates:
    """Open a complete store, refusing a stale or unfinished one."""
    directory = Path(directory)
    stored = read_manifest(directory)
    rebuild = "llada-trm cache --sampler-states --config <config>"
    checked = SAMPLER_STATES_CHECKED
    if stored is None:
        raise ConfigError(f"{directory}: no sampler-state store (no {MANIFEST_FILE}); build it: `{rebuild}`")
    check_manifest(stored, expected, directory, sections=checked, rebuild=f"{rebuild} --rebuild")
    if not stored.get("complete"):
        raise ConfigError(f"{directory}: the sampler-state store is unfinished; `{rebuild}` resumes it")
    return SamplerStates(directory, stored)
