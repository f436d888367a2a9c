"""--data-loader mode: decode + the official train transform in a DataLoader per worker count, img/s per
worker and CPU ms per image (loader process + workers); with --data-shards also the same images read from
shards, and the file opens per epoch of each."""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.common import DEFAULTS, log, usable_cores
from bench.report import command_line, loadavg, versions
from swin_train.errors import ConfigError, DataError
from swin_train.models.registry import variant_arch


class ImageFiles(torch.utils.data.Dataset):
    """The images under a folder (an ImageFolder tree or a flat folder), decoded to RGB and transformed
    under a per-sample seed, as swin-train's folder and shard datasets do."""

    def __init__(self, paths: list[Path], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        from swin_train.data.seeding import run_seeded

        with Image.open(self.paths[index]) as img:
            return run_seeded(self.transform, img.convert("RGB"), index)


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (loader workers, which exit when
    an epoch's iteration ends)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_epochs(
    loader, images: int, workers: int, before_epoch: Callable[[int], None]
) -> tuple[float, float]:
    """(img/s, CPU ms per image) over whole epochs of `loader` until `images` images were timed. The
    workers start anew each epoch (as the shard loader's do); img/s excludes each epoch's start-up (its
    clock starts once every worker has delivered its first batch), CPU counts everything, start-up and
    main process included, per image delivered."""
    warm, counted, delivered, seconds, epoch, cpu = max(workers, 1), 0, 0, 0.0, 0, cpu_seconds()
    while counted < images:
        before_epoch(epoch)
        start = None
        for i, batch in enumerate(loader):
            size = len(batch[1]) if isinstance(batch, list | tuple) else batch.shape[0]
            delivered += size
            if i == warm - 1:
                start = time.perf_counter()
            elif i >= warm:
                counted += size
        if start is None or i < warm:
            raise ConfigError(
                f"an epoch has {i + 1} batches, too few to time after {warm} warm-up batches; "
                "use more images or a smaller --batch-size"
            )
        seconds += time.perf_counter() - start
        epoch += 1
    return counted / seconds, 1000 * (cpu_seconds() - cpu) / delivered


def find_images(root: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"--data-loader {root} is not a directory; pass an ImageFolder or a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
    paths = [p for p in paths if not p.name.startswith(".")]
    if not paths:
        raise DataError(f"no JPEG/PNG images under {root}; pass an ImageFolder or a folder of images")
    return paths


def time_loader(dataset: ImageFiles, workers: int, batch_size: int, images: int) -> tuple[float, float]:
    """(img/s, CPU ms per image) of a DataLoader with `workers` workers over `dataset` in random order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    return timed_epochs(loader, images, workers, lambda epoch: None)


def time_shard_loader(
    root: Path, transform: Callable, workers: int, batch_size: int, images: int
) -> tuple[float, float, int]:
    """(img/s, CPU ms per image, shard files opened per epoch) of swin-train's shard reader over the train
    split of `root`, measured as the folder is."""
    from swin_train.data import shards

    split = shards.resolve_split(str(root), "train")
    dataset = shards.ShardTrainDataset(split, transform, batch_size=batch_size, num_workers=workers)
    loader = shards.build_shard_loader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=False, drop_last=True
    )
    img_s, cpu_ms = timed_epochs(loader, images, workers, dataset.set_epoch)
    # each shard is opened once per epoch (tests/test_shards.py counts the opens)
    return img_s, cpu_ms, len(split.shards)


def run_data_loader(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    from swin_train.config import AugConfig, DataConfig
    from swin_train.data.transforms import build_train_transform

    if any(w < 0 for w in args.workers) or args.data_images < 1:
        raise ConfigError("--workers must be >= 0 and --data-images >= 1")
    repeats = args.repeats or DEFAULTS["cpu"]["repeats"]
    batch_size = args.batch_size or 32
    img_size = args.img_size or variant_arch(args.model)["img_size"]
    paths = find_images(Path(args.data_loader))
    transform = build_train_transform(
        DataConfig(img_size=img_size), AugConfig()
    )  # the official recipe: rand-m9-mstd0.5-inc1, jitter 0.4, ...
    dataset = ImageFiles(paths, transform)
    log(f"{len(paths)} images, workers {args.workers}, {repeats} rounds of {args.data_images} images")
    # (img/s, CPU ms per image) per round; folder and shard rounds alternate, so drifts hit both alike
    rounds: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}
    shard_rounds: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}
    shard_opens = 0
    for _ in range(repeats):
        for workers in args.workers:
            rounds[workers].append(time_loader(dataset, workers, batch_size, args.data_images))
            if args.data_shards:
                *measured, shard_opens = time_shard_loader(
                    Path(args.data_shards), transform, workers, batch_size, args.data_images
                )
                shard_rounds[workers].append(tuple(measured))

    def summary(measured: list[tuple[float, float]], workers: int, opens: int) -> dict:
        median = statistics.median(img_s for img_s, _ in measured)
        cpu_ms = [ms for _, ms in measured]
        return {
            "img_s": [img_s for img_s, _ in measured],
            "median_img_s": median,
            "per_worker_img_s": median / max(workers, 1),
            "cpu_ms_per_image": statistics.median(cpu_ms),
            "file_opens_per_epoch": opens,
        }

    results = {}
    for workers, measured in rounds.items():
        results[str(workers)] = summary(measured, workers, len(paths))  # one open per image
        if args.data_shards:
            results[str(workers)]["shards"] = summary(shard_rounds[workers], workers, shard_opens)
    return {
        "mode": "data-loader",
        "config": {
            "dir": str(args.data_loader),
            "num_images": len(paths),
            "img_size": img_size,
            "batch_size": batch_size,
            "workers": args.workers,
            "repeats": repeats,
            "images_per_round": args.data_images,
            "transform": repr(transform),
        },
        "env": {**versions(), "cores": usable_cores(), "command": command_line(argv), "loadavg": loadavg()},
        "results": results,
    }
