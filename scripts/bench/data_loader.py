"""--data-loader mode: the input pipeline of a training run, swin-train's against timm's own, side by side.

Rows, each timed with 1 and 2 (`--workers`) loader workers, interleaved round by round (every row of a round
runs before any row of the next, so drifts of a shared machine hit all rows alike):

- timm: `timm.data.create_dataset` + `create_loader` as timm's train.py builds them, with its default
  prefetcher (uint8 from the workers, normalised and randomly erased by PrefetchLoader on the device) and
  the Swin recipe: RandomResizedCrop 224 bicubic, flip 0.5, rand-m9-mstd0.5-inc1, random erasing 0.25; its
  posterize patched as swin-train's is (it raises on current Pillow otherwise);
- ours: swin-train's folder dataset, sampler, loader and device transform as `build_data` builds them,
  the workers augmenting (`aug.on_device: false`; `--full-decode-row` adds a row with data.fast_decode
  off), the decoded-image cache off (an ImageNet-sized set never fits), JPEGs decoded by the library
  data/jpeg.py chooses (TorchCodec where it loads); ours_torchvision: the same with torchvision's
  deprecated decoders (SWIN_TRAIN_JPEG_DECODER=torchvision), while TorchCodec decodes the ours row and
  torchvision's decoders still load;
- ours_device_augment: `aug.on_device: true`: the workers stop after the crop, the device flips and
  applies RandAugment; ours_device_decode: `data.decode: cuda`: the workers read files and draw, the
  device decodes, crops, resizes, flips and augments;
- ours_shards: the same images packed as shards (`--data-shards`, or packed by `--photos`);
- evaluation: timm's eval loader (resize 256 + center crop 224, bicubic) against ours (and ours with the
  device decoding, and with torchvision's decoders), over the same (training) images.

The device is `--device` (default: the CPU, where the device work runs in this process on one thread).
Per row and worker count: img/s (each epoch's clock starts once every worker delivered a batch), CPU ms per
image of the whole process tree (main process and workers, start-up and shut-down included: a round builds
its loader, runs whole epochs and joins its workers), of it the main process's, of that the device work
(loader_rows.DeviceClock), and "feed a GPU": the process tree minus the device work, the CPU a run needs
while a GPU does the device work (on `--device cuda` nothing is subtracted: the device work ran there).
What a GPU run adds on the CPU to launch the device's kernels is not in this column (`scripts/gpu_check.py`'s
device_pipeline part measures it on a GPU). Ratios to timm: medians of the per-round ratios, of both
columns; and of ours and eval_ours to their torchvision rows (TorchCodec against torchvision's decoders).
From the feed column: the cores a GPU needs at the train rates of `--gpu-rate`.
`--photos N` makes the benchmark's real-photo set (bench/photos.py) in DIR first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import DEFAULTS, log, usable_cores
from bench.loader_rows import HOST, Pipeline, find_images, ours_pipeline, shard_pipeline, timm_pipeline
from bench.report import command_line, loadavg, versions
from bench.timing import synchronize
from swin_train.data.jpeg import DECODER_ENV, jpeg_decoder
from swin_train.errors import ConfigError

# timm's published train rates, RTX 3090, AMP, batch 256/192/128 (pytorch-image-models
# results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv): Swin-T, Swin-S, Swin-B img/s
PUBLISHED_GPU_RATES = {"swin_tiny": 646.76, "swin_small": 399.67, "swin_base": 279.66}
RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", reprob=0.25, crop_pct=0.875)
# rows timed with torchvision's JPEG decoders, and the row each is the baseline of
TORCHVISION_ROWS = {"ours_torchvision": "ours", "eval_ours_torchvision": "eval_ours"}


@contextlib.contextmanager
def jpeg_library(library: str | None) -> Iterator[None]:
    """SWIN_TRAIN_JPEG_DECODER=`library` (None: as it was) for this process and the workers it starts."""
    before = os.environ.get(DECODER_ENV)
    if library is not None:
        os.environ[DECODER_ENV] = library
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DECODER_ENV, None)
        else:
            os.environ[DECODER_ENV] = before


def torchvision_rows() -> bool:
    """Whether TorchCodec decodes our rows here and torchvision's decoders load (for the rows to compare)."""
    if jpeg_decoder() != "torchcodec":
        return False
    with jpeg_library("torchvision"):
        return jpeg_decoder() == "torchvision"


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
class Round:
    """One row's timed round: img/s and, per image delivered, CPU ms of the process tree, of the main
    process, of the device work in it (less the host planning, `host_ms`)."""

    img_s: float
    cpu_ms: float
    main_ms: float
    device_ms: float
    host_ms: float
    feed_ms: float  # what feeding a GPU costs the CPU: cpu_ms less the device work a GPU would do


def timed_round(pipeline: Pipeline, images: int, workers: int, device: torch.device) -> Round:
    """The row's round: whole epochs until `images` images were timed; see the module doc."""
    warm, counted, delivered, seconds, epoch, cpu = max(workers, 1), 0, 0, 0.0, 0, cpu_seconds()
    clock, host = pipeline.clock.seconds, HOST.host
    while counted < images:
        start, i = None, -1
        for i, (batch, _) in enumerate(pipeline.epoch(epoch)):
            delivered += batch.shape[0]
            if i == warm - 1:
                synchronize(device)  # the device work queued so far is not this epoch's timed part
                start = time.perf_counter()
            elif i >= warm:
                counted += batch.shape[0]
        if start is None or i < warm:
            raise ConfigError(
                f"an epoch has {i + 1} batches, too few to time after {warm} warm-up batches; "
                "use more images or a smaller --batch-size"
            )
        synchronize(device)  # a GPU's queued work is done: the clock times the device, not the queueing
        seconds += time.perf_counter() - start
        epoch += 1
    shutdown(pipeline.loader)
    main, children = (1000 * (after - before) / delivered for after, before in zip(cpu_seconds(), cpu))
    host_ms = 1000 * (HOST.host - host) / delivered
    device_ms = 1000 * (pipeline.clock.seconds - clock) / delivered - host_ms
    feed = main + children - (device_ms if device.type == "cpu" else 0.0)
    return Round(counted / seconds, main + children, main, device_ms, host_ms, feed)


def train_folder(root: Path) -> Path:
    """root/train of an ImageFolder root, else root."""
    return root / "train" if (root / "train").is_dir() else root


def run_config(args: argparse.Namespace, img_size: int, batch_size: int, **data):
    """The official recipe (the config's defaults; RECIPE lists what the rows depend on) at this size, with
    the data settings `data` (fast_decode, decode) and aug.on_device (`on_device`)."""
    from swin_train.config import Config

    cfg = Config()
    cfg.data.img_size, cfg.data.batch_size, cfg.data.decoded_cache_mib = img_size, batch_size, 0
    cfg.aug.on_device = data.pop("on_device", False)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.seed = args.seed
    return cfg


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


def summary(rounds: list[Round], workers: int, baseline: list[Round] | None, torchvision=None) -> dict:
    """A row's medians, and its per-round ratios to timm's row (`baseline`) and to its torchvision row."""
    median = lambda key: statistics.median(getattr(r, key) for r in rounds)  # noqa: E731
    out = {
        "img_s": [r.img_s for r in rounds],
        "cpu_ms": [r.cpu_ms for r in rounds],
        "feed_ms": [r.feed_ms for r in rounds],
        "median_img_s": median("img_s"),
        "per_worker_img_s": median("img_s") / max(workers, 1),
        "cpu_ms_per_image": median("cpu_ms"),
        "main_process_ms_per_image": median("main_ms"),
        "device_work_ms_per_image": median("device_ms"),
        "host_planning_ms_per_image": median("host_ms"),
        "feed_ms_per_image": median("feed_ms"),
    }
    for name, base in (("timm", baseline), ("torchvision", torchvision)):
        if base:
            out[f"cpu_vs_{name}"] = statistics.median(r.cpu_ms / b.cpu_ms for r, b in zip(rounds, base))
            out[f"feed_vs_{name}"] = statistics.median(r.feed_ms / b.feed_ms for r, b in zip(rounds, base))
    return out


def build_rows(
    args: argparse.Namespace, train_dir: Path, shards: Path | None, img_size: int, batch_size: int
):
    """{row name: workers -> Pipeline} (see the module doc), and the recipe's config."""
    device = torch.device(args.device)
    size = dict(img_size=img_size, batch_size=batch_size)
    cfg = run_config(args, **size)
    on_device = run_config(args, **size, on_device=True)
    decode = run_config(args, **size, decode="cuda", on_device=True)
    rows: dict[str, Callable[[int], Pipeline]] = {
        "timm": lambda w: timm_pipeline(train_dir, cfg, w, True, device),
        "ours": lambda w: ours_pipeline(train_dir, cfg, w, True, device),
        "ours_device_augment": lambda w: ours_pipeline(train_dir, on_device, w, True, device),
        "ours_device_decode": lambda w: ours_pipeline(train_dir, decode, w, True, device),
    }
    if torchvision_rows():
        rows["ours_torchvision"] = rows["ours"]  # run with SWIN_TRAIN_JPEG_DECODER=torchvision
    if args.full_decode_row:
        full = run_config(args, **size, fast_decode=False)
        rows["ours_full_decode"] = lambda w: ours_pipeline(train_dir, full, w, True, device)
    if shards is not None:
        rows["ours_shards"] = lambda w: shard_pipeline(shards, cfg, w, device)
    rows["eval_timm"] = lambda w: timm_pipeline(train_dir, cfg, w, False, device)
    rows["eval_ours"] = lambda w: ours_pipeline(train_dir, cfg, w, False, device)
    rows["eval_ours_device_decode"] = lambda w: ours_pipeline(train_dir, decode, w, False, device)
    if "ours_torchvision" in rows:
        rows["eval_ours_torchvision"] = rows["eval_ours"]
    if args.loader_rows:
        unknown = sorted(set(args.loader_rows) - set(rows))
        if unknown:
            raise ConfigError(f"--loader-rows: no row {', '.join(unknown)}; rows here: {', '.join(rows)}")
        baselines = {"timm"} | (
            {"eval_timm"} if any(r.startswith("eval") for r in args.loader_rows) else set()
        )
        baselines |= {TORCHVISION_ROWS[r] for r in args.loader_rows if r in TORCHVISION_ROWS}
        rows = {name: build for name, build in rows.items() if name in {*args.loader_rows, *baselines}}
    return rows, cfg


def run_data_loader(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    from swin_train.models.registry import variant_arch

    if any(w < 0 for w in args.workers) or args.data_images < 1:
        raise ConfigError("--workers must be >= 0 and --data-images >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available; run with --device cpu")
    repeats = args.repeats or DEFAULTS["cpu"]["repeats"]
    batch_size = args.batch_size or 32
    img_size = args.img_size or variant_arch(args.model)["img_size"]
    root, shards = prepare_inputs(args)
    # The device work runs here (on the CPU) on one thread: more threads would only add their spin-waiting
    # to every row, and the column that matters for a GPU run leaves it out anyway.
    torch.set_num_threads(1)
    train_dir = train_folder(root)
    num_images = len(find_images(train_dir))
    rows, cfg = build_rows(args, train_dir, shards, img_size, batch_size)
    log(f"{num_images} train images, rows {', '.join(rows)}, workers {args.workers}, {repeats} rounds")
    measured = {name: {w: [] for w in args.workers} for name in rows}
    for r in range(repeats):
        for workers in args.workers:
            for name, build in rows.items():
                with jpeg_library("torchvision" if name in TORCHVISION_ROWS else None):
                    round_ = timed_round(build(workers), args.data_images, workers, torch.device(args.device))
                measured[name][workers].append(round_)
        log(f"round {r + 1}/{repeats} done")
    results = {}
    for name, per_workers in measured.items():
        base = "eval_timm" if name.startswith("eval") else "timm"
        torchvision = {b: r for r, b in TORCHVISION_ROWS.items() if r in measured}.get(name)
        for w, rounds in per_workers.items():
            results.setdefault(str(w), {})[name] = summary(
                rounds,
                w,
                measured[base][w] if name != base else None,
                torchvision and measured[torchvision][w],
            )
    for res in results.values():  # our folder row at the top level, as readers of earlier reports expect
        res.update(res.get("ours", {}))
    rates = dict(zip(PUBLISHED_GPU_RATES, args.gpu_rate or PUBLISHED_GPU_RATES.values()))
    widest = str(max(args.workers))
    cores = {
        name: {
            model: rate * results[widest][name]["feed_ms_per_image"] / 1000 for model, rate in rates.items()
        }
        for name in rows
        if not name.startswith("eval")
    }
    config = {
        "dir": str(root),
        "shards": str(shards) if shards else None,
        "num_images": num_images,
        "img_size": img_size,
        "batch_size": batch_size,
        "workers": args.workers,
        "repeats": repeats,
        "images_per_round": args.data_images,
        "device": args.device,
        "recipe": RECIPE,
        "gpu_rates": rates,
        "transform": repr(_train_transform(cfg)),
    }
    env = {
        **versions(),
        "cores": usable_cores(),
        "main_process_threads": torch.get_num_threads(),
        "jpeg_decoder": jpeg_decoder(),
        "command": command_line(argv),
        "loadavg": loadavg(),
    }
    return {"mode": "data-loader", "config": config, "env": env, "results": results,
            "cores_per_gpu": {"workers": int(widest), "from": "feed_ms_per_image", **cores}}  # fmt: skip


def _train_transform(cfg):
    from swin_train.data.transforms import build_train_transform

    return build_train_transform(cfg.data, cfg.aug, uint8=True)
