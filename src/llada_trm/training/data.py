"""Resumable, rank-sharded samplers and the loaders of the trainer (the datasets come from `llada_trm.build`).

The training order of an epoch is a permutation that depends only on (seed, epoch), so a resumed run can
rebuild it and skip the micro-batches it already consumed instead of replaying a data loader's RNG; with
several processes each rank reads its strided share of that same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from llada_trm.config import RunConfig
from llada_trm.data import SFTDataset
from llada_trm.diffusion.forward_process import draw_for_epoch

__all__ = ["DrawSampler", "EpochSampler", "make_loader", "run_loaders"]


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


class DrawSampler(Sampler[tuple[int, int]]):
    """Wraps an `EpochSampler`: its example indices, each paired with the epoch's noise draw (the cache)."""

    def __init__(self, examples: Sampler[int], n_draws: int) -> None:
        self.examples = examples
        self.n_draws = n_draws

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = draw_for_epoch(getattr(self.examples, "epoch", 0), self.n_draws)
        return ((index, draw) for index in self.examples)

    def __len__(self) -> int:
        return len(self.examples)


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


def run_loaders(
    config: RunConfig, train: Dataset, order: Sampler, eval_set: Dataset | None, device: torch.device
) -> tuple[DataLoader, DataLoader | None]:
    """The run's loaders: `train` read in `order` (the epoch sampler, or its (example, draw) pairs for the
    feature cache) and the validation set, if any, in dataset order."""
    data, t = config.data, config.training
    options = {
        "batch_size": t.batch_size,
        "num_workers": data.num_workers,
        "pin_memory": data.pin_memory and device.type == "cuda",
        "seed": t.seed,
    }
    train_loader = make_loader(train, sampler=order, **options)
    if eval_set is None:
        return train_loader, None
    in_order = EpochSampler(len(eval_set), seed=t.seed, shuffle=False)
    return train_loader, make_loader(eval_set, sampler=in_order, **options)
