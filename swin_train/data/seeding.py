"""Reproducible randomness: seeds derived from integer keys, and a block that runs under them.

Exact resume rests on this: every random draw that shapes a batch (augmentation, erasing, mixup) runs
under a seed that is a pure function of (seed, rank, epoch, index), never of process or worker history.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")


def derive_seed(*key: int) -> tuple[int, np.ndarray]:
    """(64-bit seed for `random` and torch, 128-bit uint32 state for numpy) from non-negative ints;
    numpy's SeedSequence mixes the key so that neighbouring keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(4, np.uint32)
    return int(state[0]) << 32 | int(state[1]), state


def seed_generator(*key: int) -> torch.Generator:
    """A torch CPU generator seeded from `key` (see derive_seed)."""
    return torch.Generator().manual_seed(derive_seed(*key)[0])


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and CUDA) with one plain seed, as a
    process does once at start (model initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_globals_from(*key: int) -> None:
    """Seed python `random`, numpy's global RNG and torch's CPU generator from `key` (see derive_seed)."""
    seed64, state = derive_seed(*key)
    random.seed(seed64)
    np.random.seed(state)
    torch.default_generator.manual_seed(seed64)


@contextmanager
def seeded_rng(*key: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed `random`, numpy's global RNG and torch's CPU generator from `key` (non-negative ints) for
    the duration of the block, then restore all three. With a CUDA `device`, that device's default
    generator is seeded and restored as well; other CUDA generators are not touched."""
    seed64, _ = derive_seed(*key)
    cuda = _cuda_generator(device)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_cuda = cuda.get_state() if cuda is not None else None  # host-side (seed, offset): no sync
    seed_globals_from(*key)
    if cuda is not None:
        cuda.manual_seed(seed64)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            cuda.set_state(saved_cuda)


def run_seeded(fn: Callable[[T], R], arg: T, *key: int) -> R:
    """`fn(arg)` with `random`, numpy's global RNG and torch's CPU generator seeded from `key`.

    In a DataLoader worker the generators are seeded and not restored: every sample reseeds them, so no
    draw depends on what came before, and saving and restoring numpy's 2.5 KB state would cost more than
    decoding and cropping a small image. Elsewhere (the main process, workers=0) the caller's streams are
    restored, as `seeded_rng` does."""
    if torch.utils.data.get_worker_info() is not None:
        seed_globals_from(*key)
        return fn(arg)
    with seeded_rng(*key):
        return fn(arg)


def transform_sample(transform: Callable[[T], R], image: T, seed: int | None) -> R:
    """`transform(image)`, under the sample's augmentation seed when its sampler gave one (`run_seeded`)."""
    return transform(image) if seed is None else run_seeded(transform, image, seed)


def _cuda_generator(device: torch.device | str | None) -> torch.Generator | None:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()
    ]
