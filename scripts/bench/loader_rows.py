"""The rows of --data-loader: each builds one loader (timm's or ours) for a worker count and yields its
batches as a training loop gets them, with the main process's device work timed on its own.

Device work: what the training device does to a batch after the copy (timm: PrefetchLoader's normalise and
random erasing; ours: DeviceTransform's decode, crop, resize, flip and RandAugment where configured,
normalise and erasing). `DeviceClock` adds up the main thread's CPU time spent in it (time.thread_time),
except our host-side planning (which samples take which op: device_augment.plan_batch), which a GPU run
does on the CPU too and which therefore stays in the "feed a GPU" column.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swin_train.errors import DataError


def find_images(root: Path) -> list[Path]:
    """The image files under `root`, sorted; DataError when there are none."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"--data-loader {root} is not a directory; pass an ImageFolder or a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
    paths = [p for p in paths if not p.name.startswith(".")]
    if not paths:
        raise DataError(f"no JPEG/PNG images under {root}; pass an ImageFolder or a folder of images")
    return paths


@dataclass
class DeviceClock:
    """Main-thread CPU seconds in device work (`seconds`) and in the host planning inside it (`host`)."""

    seconds: float = 0.0
    host: float = 0.0

    def timed(self, fn: Callable) -> Callable:
        def run(*args):
            start = time.thread_time()
            try:
                return fn(*args)
            finally:
                self.seconds += time.thread_time() - start

        return run


HOST = DeviceClock()  # the host planning of whichever row runs (one at a time)


def _timed_planning() -> None:
    """Route our device half's planning through HOST (once per process)."""
    from swin_train.data import device_augment, device_decode

    if getattr(device_augment.plan_batch, "timed", False):
        return
    plan = device_augment.plan_batch

    def timed_plan(params):
        start = time.thread_time()
        try:
            return plan(params)
        finally:
            HOST.host += time.thread_time() - start

    timed_plan.timed = True
    device_augment.plan_batch = device_decode.plan_batch = timed_plan


@dataclass
class Pipeline:
    """One row's loader for one worker count: `epoch(e)` yields that epoch's batches as the training loop
    gets them (finished by the "device"); `clock` holds the device work so far."""

    epoch: Callable[[int], Iterable]
    loader: object
    clock: DeviceClock = field(default_factory=DeviceClock)


class _TimedLoader:
    """A DataLoader whose batch fetches are timed (main thread CPU), for timm's PrefetchLoader: its device
    work is the time it spends outside these fetches."""

    def __init__(self, loader, clock: DeviceClock):
        self.loader, self.clock, self.fetch = loader, clock, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        while True:
            start = time.thread_time()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.fetch += time.thread_time() - start
            yield batch


def timm_pipeline(folder: Path, cfg, workers: int, train: bool, device: torch.device) -> Pipeline:
    """timm's ImageDataset + create_loader as its train.py builds them (PrefetchLoader on `device`)."""
    from timm.data import create_dataset, create_loader

    from swin_train.data.transforms import _fix_posterize

    d, a = cfg.data, cfg.aug
    dataset = create_dataset("", root=str(folder), is_training=train)
    common = dict(
        input_size=(3, d.img_size, d.img_size),
        batch_size=d.batch_size,
        interpolation=d.interpolation,
        mean=tuple(d.mean),
        std=tuple(d.std),
        num_workers=workers,
        device=device,
        use_prefetcher=True,
    )
    if train:
        recipe = dict(re_prob=a.reprob, re_mode=a.remode, re_count=a.recount, scale=tuple(a.crop_scale))
        recipe.update(hflip=a.hflip, color_jitter=a.color_jitter, auto_augment=a.auto_augment)
        loader = create_loader(dataset, is_training=True, **recipe, **common)
    else:
        loader = create_loader(dataset, is_training=False, crop_pct=cfg.eval.crop_pct, **common)
    _fix_posterize(dataset.transform)  # before the workers start (on the first iteration)
    data_loader, clock = loader.loader, DeviceClock()
    timed = loader.loader = _TimedLoader(data_loader, clock)

    def epoch(_: int) -> Iterator:
        iterator, fetched = iter(loader), timed.fetch
        while True:
            start = time.thread_time()
            batch = next(iterator, None)
            spent = time.thread_time() - start
            clock.seconds += spent - (timed.fetch - fetched)  # PrefetchLoader's own work
            fetched = timed.fetch
            if batch is None:
                return
            yield batch

    return Pipeline(epoch, data_loader, clock)


def ours_pipeline(folder: Path, cfg, workers: int, train: bool, device: torch.device) -> Pipeline:
    """swin-train's ImageFolderDataset, sampler, loader and device transform, as build_data builds them."""
    from swin_train.data.build import device_transform_for, eval_transform_for, train_transform_for
    from swin_train.data.folder import ImageFolderDataset
    from swin_train.data.loader import build_loader
    from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
    from swin_train.distributed import DistEnv

    _timed_planning()
    env = DistEnv(device=device)
    if train:
        transform, augment = train_transform_for(cfg, device, device_pipeline=True)
    else:
        transform, augment = eval_transform_for(cfg, device, device_pipeline=True), None
    paths = [str(p) for p in find_images(folder)]
    dataset = ImageFolderDataset(folder, transform, scanned=(["images"], [(p, 0) for p in paths]))
    if train:
        sampler = ResumableTrainSampler(len(dataset), num_replicas=1, rank=0, seed=cfg.seed)
    else:
        sampler = ExactEvalSampler(len(dataset), 1, 0)
    loader = build_loader(
        dataset, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        seed=cfg.seed, pin_memory=device.type == "cuda",
    )  # fmt: skip
    device_transform = device_transform_for(cfg, env, train=train, augment=augment)
    return _our_epochs(loader, device_transform, device, sampler if train else None)


def shard_pipeline(shards: Path, cfg, workers: int, device: torch.device) -> Pipeline:
    """swin-train's shard reader over the train split of `shards`, as build_shard_data builds it."""
    from swin_train.data import shards as S
    from swin_train.data.build import device_transform_for, train_transform_for
    from swin_train.distributed import DistEnv

    _timed_planning()
    d = cfg.data
    split = S.resolve_split(str(shards), "train")
    transform, augment = train_transform_for(cfg, device, device_pipeline=True)
    dataset = S.ShardTrainDataset(
        split, transform, batch_size=d.batch_size, num_workers=workers, seed=cfg.seed
    )
    loader = S.build_shard_loader(
        dataset,
        batch_size=d.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    device_transform = device_transform_for(cfg, DistEnv(device=device), train=True, augment=augment)
    return _our_epochs(loader, device_transform, device, dataset)


def _our_epochs(loader, device_transform, device: torch.device, order) -> Pipeline:
    """Batches through swin_train.data.prefetch with `device_transform` timed; `order` (a sampler or the
    shard dataset) is set to each epoch (None: evaluation)."""
    from swin_train.data.prefetch import prefetch

    clock = DeviceClock()

    def epoch(e: int):
        if order is None:
            return prefetch(loader, device, clock.timed(lambda images, _: device_transform(images)))
        order.set_epoch(e)
        return prefetch(loader, device, clock.timed(lambda images, i: device_transform(images, e, i)))

    return Pipeline(epoch, loader, clock)
