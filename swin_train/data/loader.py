"""DataLoaders whose output does not depend on worker count, worker history or where an epoch started."""

from __future__ import annotations

import logging
import os
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from swin_train.data.seeding import seed_generator, seed_globals_from
from swin_train.errors import DataError

log = logging.getLogger("swin_train")


def usable_workers(requested: int) -> int:
    """`requested` loader workers, at most one per CPU this process may run on (more only add start-up
    time and memory; PyTorch itself warns about them). The output does not depend on the count."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cpus:
        log.info(
            "data.num_workers=%d but this process may use %d CPUs: using %d workers", requested, cpus, cpus
        )
        return cpus
    return requested


def _init_worker(seed: int, rank: int, worker_id: int) -> None:
    """Deterministic global RNGs in each worker, for code outside the seeded transforms."""
    seed_globals_from(seed, rank, worker_id)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler,
    num_workers: int = 0,
    pin_memory: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader over `sampler` with persistent workers (num_workers > 0), pinned memory (when a
    GPU exists) and workers seeded from (seed, rank, worker_id). Augmentations do not depend on the
    worker seeds: with ResumableTrainSampler they are a pure function of (seed, epoch, index), which
    is why persistent workers (whose RNG carries across epochs) are safe for exact resume."""
    if drop_last and len(sampler) < batch_size:
        raise DataError(
            f"only {len(sampler)} samples per process but batch size {batch_size} with drop_last: "
            "no full batch; lower the batch size or add data"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=partial(_init_worker, seed, rank) if num_workers > 0 else None,
        generator=seed_generator(seed, rank),
    )
