"""Samplers: a training order that resumes mid-epoch bitwise, and an evaluation split that never pads."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from swin_train.data.folder import SampleKey
from swin_train.errors import DataError


class ResumableTrainSampler(Sampler[SampleKey]):
    """DistributedSampler(shuffle=True, drop_last=True) order (randperm seeded with seed + epoch, strided
    shard per rank, equal length per rank) that yields `(index, sample_seed)` keys and can start mid-epoch.

    `sample_seed` is drawn from the same generator as the permutation, indexed by dataset index, so the
    augmentation of image i in epoch e is a pure function of (seed, epoch, i): not of the worker that
    decodes it, the number of workers or where the epoch started. Call `set_epoch(e)` before each epoch
    (it clears any start offset), then optionally `set_start(k, batch_size)` to skip the first k batches
    of this rank's shard without decoding them.
    """

    def __init__(self, dataset_len: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if dataset_len < num_replicas:
            raise DataError(
                f"the train set has {dataset_len} images, fewer than the {num_replicas} processes"
            )
        self.dataset_len, self.num_replicas, self.rank, self.seed = dataset_len, num_replicas, rank, seed
        self.num_samples = dataset_len // num_replicas  # the remainder sits out this epoch, as drop_last
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, batch_index: int, batch_size: int) -> None:
        """Begin the current epoch at batch `batch_index` of this rank (call after set_epoch)."""
        start = batch_index * batch_size
        if batch_index < 0 or start > self.num_samples:
            raise ValueError(
                f"batch {batch_index} x {batch_size} is outside this rank's {self.num_samples} samples"
            )
        self.start = start

    def epoch_keys(self) -> list[SampleKey]:
        """This rank's full shard of the current epoch as (index, sample_seed), ignoring the start."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_len, generator=g)
        seeds = torch.randint(0, 2**62, (self.dataset_len,), generator=g)  # by dataset index
        shard = order[self.rank : self.total_size : self.num_replicas]
        return list(zip(shard.tolist(), seeds[shard].tolist()))

    def __iter__(self) -> Iterator[SampleKey]:
        return iter(self.epoch_keys()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ExactEvalSampler(Sampler[int]):
    """Rank r takes indices r, r + W, r + 2W, ...: every index on exactly one rank, no padding, so
    summed counts over ranks are exact. Ranks may get one sample more than others: reduce sums."""

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
