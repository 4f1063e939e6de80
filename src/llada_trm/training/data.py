"""Datasets and a resumable, rank-sharded sampler for the trainer.

The training order of an epoch is a permutation that depends only on (seed, epoch), so a resumed run can
rebuild it and skip the micro-batches it already consumed instead of replaying a data loader's RNG; with
several processes each rank reads its strided share of that same order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from llada_trm.config import DataConfig
from llada_trm.data import GSM8KRecord, SFTDataset, generate_problems, load_gsm8k
from llada_trm.errors import ConfigError

__all__ = ["EpochSampler", "build_datasets", "build_records", "make_loader"]

logger = logging.getLogger("llada_trm")


class EpochSampler(DistributedSampler):
    """torch's `DistributedSampler`, able to start an epoch part-way (for resuming).

    An epoch's order is a permutation seeded by seed + epoch (`set_epoch`), padded by wrapping around to a
    multiple of the world size; rank r takes positions r, r + W, r + 2W, ... So in every micro-step the W
    ranks together read consecutive positions of the one global order, and W processes with batch b read the
    same examples per step as one process with batch W*b. `set_epoch(epoch, start)` skips the first `start`
    indices of this rank's shard.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError("EpochSampler needs a non-empty dataset")
        super().__init__(
            range(size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.size = size
        self.start = 0
        self._order: tuple[int, list[int]] | None = None

    @property
    def shard_size(self) -> int:
        """Examples of this rank per epoch (the padded global order / world size)."""
        return self.num_samples

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


def build_records(data: DataConfig) -> tuple[list[GSM8KRecord], list[GSM8KRecord]]:
    """Training and evaluation records: a GSM8K source sliced by the splits, or the generated task."""
    try:
        if data.dataset == "synthetic":
            task = data.synthetic  # the task's knobs plus n_train / n_eval
            train = generate_problems(task, task.n_train, "train")
            evaluation = generate_problems(task, task.n_eval, "test") if task.n_eval else []
        else:
            train = load_gsm8k(data.path, data.train_split)
            evaluation = load_gsm8k(data.path, data.eval_split) if data.eval_split else []
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data: {exc}") from None
    return train, evaluation


def build_datasets(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[SFTDataset, SFTDataset | None]:
    """Tokenised SFT datasets; examples longer than `data.max_length` are skipped (and counted)."""
    train_records, eval_records = build_records(data)
    train = SFTDataset(tokenizer, train_records, data.max_length)
    if len(train) == 0:
        raise ConfigError(
            f"data.max_length: none of the {len(train_records)} training examples fits in {data.max_length} "
            "tokens; raise data.max_length"
        )
    if train.num_skipped:
        logger.warning(
            "skipped %d of %d training examples longer than data.max_length=%d",
            train.num_skipped,
            len(train_records),
            data.max_length,
        )
    evaluation = SFTDataset(tokenizer, eval_records, data.max_length) if eval_records else None
    if evaluation is not None and len(evaluation) == 0:
        logger.warning("no evaluation example fits data.max_length=%d; validation is off", data.max_length)
        evaluation = None
    return train, evaluation


def make_loader(
    dataset: SFTDataset | Dataset,
    *,
    batch_size: int,
    sampler: Sampler[int],
    num_workers: int,
    pin_memory: bool,
    seed: int,
) -> DataLoader:
    """A DataLoader whose seed draws use a private generator, never the global torch RNG (resumability).

    `dataset` is an `SFTDataset` or any dataset with a `collate` method (the feature cache).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )
