"""--data-loader mode: the input pipeline of a training run, swin-train's against timm's own, side by side.

Rows, each timed with 1 and 2 (`--workers`) loader workers, interleaved round by round (every row of a round
runs before any row of the next, so drifts of a shared machine hit all rows alike):

- timm: `timm.data.create_dataset` + `create_loader` as timm's train.py builds them, with its default
  prefetcher (uint8 from the workers, normalised and randomly erased by PrefetchLoader on the device, here
  the CPU) and the Swin recipe: RandomResizedCrop 224 bicubic, flip 0.5, rand-m9-mstd0.5-inc1, random
  erasing 0.25; its posterize patched as swin-train's is (it raises on current Pillow otherwise);
- ours: swin-train's folder dataset, sampler, loader and device transform as `build_data` builds them
  (`data.fast_decode` as configured; `--full-decode-row` adds a row with it off), the decoded-image cache
  off (an ImageNet-sized set never fits);
- ours shards: the same images packed as shards (`--data-shards`, or packed by `--photos`);
- evaluation: timm's eval loader (resize 256 + center crop 224, bicubic) against ours, over the same
  (training) images: more of them than a val split holds, and the transform does not care.

Per row and worker count: img/s (each epoch's clock starts once every worker delivered a batch), CPU ms per
image of the whole process tree (main process and workers, start-up and shut-down included: a round builds
its loader, runs whole epochs and joins its workers) and the per-round ratio of CPU ms to timm's, medians
over `--repeats` rounds. From the CPU ms: the cores a GPU needs at the train rates of `--gpu-rate`.
`--photos N` makes the benchmark's real-photo set (bench/photos.py) in DIR first.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import DEFAULTS, log, usable_cores
from bench.report import command_line, loadavg, versions
from swin_train.errors import ConfigError, DataError

# timm's published train rates, RTX 3090, AMP, batch 256/192/128 (pytorch-image-models
# results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv): Swin-T, Swin-S, Swin-B img/s
PUBLISHED_GPU_RATES = {"swin_tiny": 646.76, "swin_small": 399.67, "swin_base": 279.66}
RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", reprob=0.25, crop_pct=0.875)


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU of (this process, its reaped children: loader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def shutdown(loader) -> None:
    """Join a DataLoader's workers (persistent ones live until their iterator goes), so that their CPU is
    counted now (RUSAGE_CHILDREN counts reaped children only)."""
    loader = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps its DataLoader
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


@dataclass
class Pipeline:
    """One row's loader for one worker count: `epoch(e)` yields that epoch's batches as the training loop
    gets them (normalised on the "device")."""

    epoch: Callable[[int], Iterable]
    loader: object


def timed_round(pipeline: Pipeline, images: int, workers: int) -> tuple[float, float, float]:
    """(img/s, CPU ms per image, of which in the main process) over whole epochs until `images` images were
    timed; see the module doc."""
    warm, counted, delivered, seconds, epoch, cpu = max(workers, 1), 0, 0, 0.0, 0, cpu_seconds()
    while counted < images:
        start, i = None, -1
        for i, (batch, _) in enumerate(pipeline.epoch(epoch)):
            delivered += batch.shape[0]
            if i == warm - 1:
                start = time.perf_counter()
            elif i >= warm:
                counted += batch.shape[0]
        if start is None or i < warm:
            raise ConfigError(
                f"an epoch has {i + 1} batches, too few to time after {warm} warm-up batches; "
                "use more images or a smaller --batch-size"
            )
        seconds += time.perf_counter() - start
        epoch += 1
    shutdown(pipeline.loader)
    main, children = (1000 * (after - before) / delivered for after, before in zip(cpu_seconds(), cpu))
    return counted / seconds, main + children, main


def find_images(root: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"--data-loader {root} is not a directory; pass an ImageFolder or a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
    paths = [p for p in paths if not p.name.startswith(".")]
    if not paths:
        raise DataError(f"no JPEG/PNG images under {root}; pass an ImageFolder or a folder of images")
    return paths


def train_folder(root: Path) -> Path:
    """root/train of an ImageFolder root, else root."""
    return root / "train" if (root / "train").is_dir() else root


# ------------------------------------------------------------------------------------------- the rows
def timm_pipeline(folder: Path, cfg, workers: int, train: bool) -> Pipeline:
    """timm's ImageDataset + create_loader as its train.py builds them (PrefetchLoader on the CPU)."""
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
        device=torch.device("cpu"),
        use_prefetcher=True,
    )
    if train:
        recipe = dict(re_prob=a.reprob, re_mode=a.remode, re_count=a.recount, scale=tuple(a.crop_scale))
        recipe.update(hflip=a.hflip, color_jitter=a.color_jitter, auto_augment=a.auto_augment)
        loader = create_loader(dataset, is_training=True, **recipe, **common)
    else:
        loader = create_loader(dataset, is_training=False, crop_pct=cfg.eval.crop_pct, **common)
    _fix_posterize(dataset.transform)  # before the workers start (on the first iteration)
    return Pipeline(lambda epoch: loader, loader)


def ours_pipeline(folder: Path, cfg, workers: int, train: bool) -> Pipeline:
    """swin-train's ImageFolderDataset, sampler, loader and device transform, as build_data builds them."""
    from swin_train.data.build import device_transform_for
    from swin_train.data.folder import ImageFolderDataset
    from swin_train.data.loader import build_loader
    from swin_train.data.prefetch import prefetch
    from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
    from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
    from swin_train.distributed import DistEnv

    d, env = cfg.data, DistEnv()
    if train:
        transform = build_train_transform(d, cfg.aug, uint8=True)
    else:
        transform = build_eval_transform(Preprocess.from_config(cfg), uint8=True, fast_decode=d.fast_decode)
    paths = [str(p) for p in find_images(folder)]
    dataset = ImageFolderDataset(folder, transform, scanned=(["images"], [(p, 0) for p in paths]))
    if train:
        sampler = ResumableTrainSampler(len(dataset), num_replicas=1, rank=0, seed=cfg.seed)
    else:
        sampler = ExactEvalSampler(len(dataset), 1, 0)
    loader = build_loader(
        dataset, batch_size=d.batch_size, sampler=sampler, num_workers=workers, drop_last=train, seed=cfg.seed
    )
    device_transform = device_transform_for(cfg, env, train=train)

    def epoch(e: int):
        if not train:
            return prefetch(loader, "cpu", lambda images, _: device_transform(images))
        sampler.set_epoch(e)
        return prefetch(loader, "cpu", lambda images, i: device_transform(images, e, i))

    return Pipeline(epoch, loader)


def shard_pipeline(shards: Path, cfg, workers: int) -> Pipeline:
    """swin-train's shard reader over the train split of `shards`, as build_shard_data builds it."""
    from swin_train.data import shards as S
    from swin_train.data.build import device_transform_for
    from swin_train.data.prefetch import prefetch
    from swin_train.data.transforms import build_train_transform
    from swin_train.distributed import DistEnv

    d = cfg.data
    split = S.resolve_split(str(shards), "train")
    transform = build_train_transform(d, cfg.aug, uint8=True)
    dataset = S.ShardTrainDataset(
        split, transform, batch_size=d.batch_size, num_workers=workers, seed=cfg.seed
    )
    loader = S.build_shard_loader(
        dataset, batch_size=d.batch_size, num_workers=workers, pin_memory=False, drop_last=True
    )
    device_transform = device_transform_for(cfg, DistEnv(), train=True)

    def epoch(e: int):
        dataset.set_epoch(e)
        return prefetch(loader, "cpu", lambda images, i: device_transform(images, e, i))

    return Pipeline(epoch, loader)


def run_config(args: argparse.Namespace, img_size: int, batch_size: int, fast_decode: bool):
    from swin_train.config import Config

    cfg = Config()
    cfg.data.img_size, cfg.data.batch_size, cfg.data.fast_decode = img_size, batch_size, fast_decode
    cfg.data.decoded_cache_mib = 0
    cfg.seed = args.seed
    return cfg  # the official recipe: the config's defaults (RECIPE lists what the rows depend on)


# ---------------------------------------------------------------------------------------------- run
def prepare_inputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(image root, shards or None); with --photos, the photo set is made (and packed) first."""
    root = Path(args.data_loader)
    shards = Path(args.data_shards) if args.data_shards else None
    if args.photos:
        from bench.photos import SOURCES, make_photo_set

        # every photo (class) in both splits, as packing needs
        make_photo_set(root, train=args.photos, val=max(args.photos // 4, len(SOURCES)), seed=args.seed)
        if shards is None:
            shards = root.parent / f"{root.name}-wds"
        if not (shards / "_info.json").is_file():
            from swin_train.data.pack import PackOptions, pack

            log(f"packing {root} into {shards}")
            pack(root, shards, PackOptions(shard_size=max(args.photos // 8, 1)), progress=False)
    return root, shards


def summary(measured: list[tuple[float, float, float]], workers: int, baseline: list | None) -> dict:
    img_s, cpu_ms = [m[0] for m in measured], [m[1] for m in measured]
    out = {
        "img_s": img_s,
        "cpu_ms": cpu_ms,
        "median_img_s": statistics.median(img_s),
        "per_worker_img_s": statistics.median(img_s) / max(workers, 1),
        "cpu_ms_per_image": statistics.median(cpu_ms),
        "main_process_ms_per_image": statistics.median(m[2] for m in measured),
    }
    if baseline:
        out["cpu_vs_timm"] = statistics.median(ours / timm for ours, (_, timm, _) in zip(cpu_ms, baseline))
    return out


def run_data_loader(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    from swin_train.models.registry import variant_arch

    if any(w < 0 for w in args.workers) or args.data_images < 1:
        raise ConfigError("--workers must be >= 0 and --data-images >= 1")
    repeats = args.repeats or DEFAULTS["cpu"]["repeats"]
    batch_size = args.batch_size or 32
    img_size = args.img_size or variant_arch(args.model)["img_size"]
    root, shards = prepare_inputs(args)
    # The device's work (normalising, erasing) runs here on the CPU, on one thread: on a GPU it would cost
    # the CPU nothing, and more threads would only add their spin-waiting to every row.
    torch.set_num_threads(1)
    train_dir = train_folder(root)
    num_images = len(find_images(train_dir))
    cfg = run_config(args, img_size, batch_size, fast_decode=True)
    full = run_config(args, img_size, batch_size, fast_decode=False)
    rows: dict[str, Callable[[int], Pipeline]] = {
        "timm": lambda w: timm_pipeline(train_dir, cfg, w, True),
        "ours": lambda w: ours_pipeline(train_dir, cfg, w, True),
    }
    if args.full_decode_row:
        rows["ours_full_decode"] = lambda w: ours_pipeline(train_dir, full, w, True)
    if shards is not None:
        rows["ours_shards"] = lambda w: shard_pipeline(shards, cfg, w)
    rows["eval_timm"] = lambda w: timm_pipeline(train_dir, cfg, w, False)
    rows["eval_ours"] = lambda w: ours_pipeline(train_dir, cfg, w, False)
    log(f"{num_images} train images, rows {', '.join(rows)}, workers {args.workers}, {repeats} rounds")
    measured = {name: {w: [] for w in args.workers} for name in rows}
    for r in range(repeats):
        for workers in args.workers:
            for name, build in rows.items():
                measured[name][workers].append(timed_round(build(workers), args.data_images, workers))
        log(f"round {r + 1}/{repeats} done")
    results = {}
    for name, per_workers in measured.items():
        base = "eval_timm" if name.startswith("eval") else "timm"
        for w, rounds in per_workers.items():
            baseline = measured[base][w] if name != base else None
            results.setdefault(str(w), {})[name] = summary(rounds, w, baseline)
    for res in results.values():  # our folder row at the top level, as readers of earlier reports expect
        res.update(res["ours"])
    rates = dict(zip(PUBLISHED_GPU_RATES, args.gpu_rate or PUBLISHED_GPU_RATES.values()))
    widest = str(max(args.workers))
    cores = {
        name: {
            model: rate * results[widest][name]["cpu_ms_per_image"] / 1000 for model, rate in rates.items()
        }
        for name in rows
        if not name.startswith("eval")
    }
    return {
        "mode": "data-loader",
        "config": {
            "dir": str(root),
            "shards": str(shards) if shards else None,
            "num_images": num_images,
            "img_size": img_size,
            "batch_size": batch_size,
            "workers": args.workers,
            "repeats": repeats,
            "images_per_round": args.data_images,
            "recipe": RECIPE,
            "gpu_rates": rates,
            "transform": repr(_train_transform(cfg)),
        },
        "env": {
            **versions(),
            "cores": usable_cores(),
            "main_process_threads": torch.get_num_threads(),
            "command": command_line(argv),
            "loadavg": loadavg(),
        },
        "results": results,
        "cores_per_gpu": {"workers": int(widest), **cores},
    }


def _train_transform(cfg):
    from swin_train.data.transforms import build_train_transform

    return build_train_transform(cfg.data, cfg.aug, uint8=True)
