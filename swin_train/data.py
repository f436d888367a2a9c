"""Data: ImageFolder datasets, timm transforms, mixup, samplers and loaders with exact resume.

Reproducible augmentation (the contract behind exact resume)
------------------------------------------------------------
`ResumableTrainSampler` yields keys `(index, sample_seed)` instead of plain indices. The datasets here
accept either an `int` (no seeding: eval, or any other sampler) or such a key, and then run the
transform inside `seeded_rng(sample_seed)`: python `random`, numpy's global RNG and torch's CPU
generator are seeded from the key for that one call and restored afterwards. `sample_seed` is drawn
from the same `torch.Generator(seed + epoch)` as the permutation, indexed by dataset index, so the
augmentation of image i in epoch e is a pure function of (seed, epoch, i): it does not depend on the
worker that decodes it, on the number of workers, on persistent-worker RNG state, or on where the
epoch started. Resuming at batch k (`sampler.set_start(k, batch_size)`) therefore reproduces batches
k, k+1, ... bitwise without decoding the skipped samples. Mixup runs in the main process on numpy's
global RNG; wrap it in `seeded_rng(seed, rank, epoch, step)` to make it resumable as well.

Two pipelines
-------------
By default the workers return normalised float images (ToTensor, Normalize and random erasing run in
the workers). With `uint8=True` the transforms stop at a uint8 (3, S, S) tensor (timm's
`use_prefetcher` pipeline): a quarter of the bytes to pin and copy, and less worker CPU; the
conversion, normalisation and random erasing then run on the device (`swin_train.prefetch`), erasing
seeded per batch from (seed, rank, epoch, batch index) so that resume stays bitwise.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from swin_train.errors import DataError

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

log = logging.getLogger("swin_train")

SampleKey = tuple[int, int]  # (dataset index, augmentation seed) as yielded by ResumableTrainSampler

# PIL raises these for unreadable / truncated / hostile files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------
# Reproducible randomness


@contextmanager
def seeded_rng(*key: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed `random`, numpy's global RNG and torch's CPU generator from `key` (non-negative ints) for
    the duration of the block, then restore all three. With a CUDA `device`, that device's default
    generator is seeded and restored as well; other CUDA generators are not touched."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(4, np.uint32)  # 128 bits
    seed64 = int(state[0]) << 32 | int(state[1])
    cuda = _cuda_generator(device)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_cuda = cuda.get_state() if cuda is not None else None  # host-side (seed, offset): no sync
    random.seed(seed64)
    np.random.seed(state)
    torch.default_generator.manual_seed(seed64)
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


def _cuda_generator(device: torch.device | str | None) -> torch.Generator | None:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()
    ]


def _split_key(key: int | SampleKey) -> tuple[int, int | None]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


# ----------------------------------------------------------------------------------------------
# Transforms


def build_train_transform(
    img_size: int,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    reprob: float = 0.25,
    remode: str = "pixel",
    recount: int = 1,
    hflip: float = 0.5,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    uint8: bool = False,
) -> Callable:
    """timm's ImageNet train transform (random-resized crop, flip, RandAugment or colour jitter,
    normalise, random erasing); defaults are the official Swin recipe. As in timm and the official
    code, colour jitter is ignored when RandAugment/AutoAugment is on. PIL image -> (3, S, S) float.

    `uint8=True`: stop before ToTensor, as timm's `use_prefetcher`: PIL -> (3, S, S) uint8, no
    normalisation and no random erasing (`prefetch.DeviceTransform` does both on the batch). The random
    draws before that point are the same, so the images are those of the float pipeline."""
    aa = None if not auto_augment or auto_augment.lower() == "none" else auto_augment
    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(crop_scale),
        hflip=hflip,
        color_jitter=color_jitter if color_jitter > 0 else None,
        auto_augment=aa,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        use_prefetcher=uint8,
    )
    _fix_posterize(transform)
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, valid for 0 bits: Pillow >= 12 raises on bits=0 (older Pillow returned black,
    which is what the official recipe trained with)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every channel masked to 0
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Callable) -> None:
    """Route the posterize ops of timm's RandAugment/AutoAugment/AugMix in `transform` to `_posterize`.

    `rand-m9-mstd0.5-inc1` samples magnitude 10 (clamped) about 2% of the time, which maps to 0 bits
    for PosterizeIncreasing: with current Pillow that is a ValueError that kills a worker mid-epoch.
    Patched per op instance, nothing global.
    """
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))
        for sub_policy in getattr(t, "policy", []):
            ops += list(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = _posterize


def build_eval_transform(
    img_size: int,
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    uint8: bool = False,
) -> Callable:
    """Resize the shorter side to int(img_size / crop_pct), center-crop img_size, normalise.
    crop_pct == 1.0 is a plain resize to img_size x img_size (the official 384 eval: no crop).
    `uint8=True`: (3, S, S) uint8 without normalisation (done on the device, see `build_train_transform`)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    # timm: floor(img_size / crop_pct) == int(...) for positive sizes; 'squash' resizes both edges.
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=crop_pct,
        crop_mode="squash" if crop_pct == 1.0 else "center",
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        use_prefetcher=uint8,
    )


# ----------------------------------------------------------------------------------------------
# Datasets


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and (path, label) samples of one split, validated.

    Unlike torchvision's ImageFolder, hidden folders and files (`.ipynb_checkpoints`, macOS `._x.jpg`)
    are skipped: they are never images and would otherwise become classes or decode errors.
    """
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if _is_image(f)]
        if not found:
            raise DataError(
                f"class folder {split_dir / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        samples += found
    return classes, samples


class ImageFolderDataset(Dataset):
    """`root/<class>/**/<image>` as (image, label) pairs; keys may be ints or `SampleKey`s (see the
    module docstring). With `skip_bad_images`, an undecodable file is logged and replaced by the next
    index (deterministic); `num_skipped` counts such replacements across all worker processes."""

    def __init__(
        self,
        split_dir: str | Path,
        transform: Callable | None = None,
        *,
        skip_bad_images: bool = False,
        scanned: tuple[list[str], list[tuple[str, int]]] | None = None,
    ) -> None:
        self.root = Path(split_dir)
        self.classes, self.samples = scanned if scanned is not None else scan_image_folder(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        # shared memory: workers are separate processes, a plain int would count per worker
        self._skipped = multiprocessing.Value("q", 0)
        self._warned: set[str] = set()

    @property
    def num_skipped(self) -> int:
        """How many times a bad image was replaced (all processes, since construction)."""
        return int(self._skipped.value)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with open(path, "rb") as f:
                    img = Image.open(f)
                    return img.convert("RGB"), label
            except _DECODE_ERRORS as e:
                if not self.skip_bad_images:
                    raise DataError(
                        f"cannot decode image {path} ({type(e).__name__}: {e}); "
                        "delete or replace it, or set data.skip_bad_images=true to skip such files"
                    ) from None
                with self._skipped.get_lock():
                    self._skipped.value += 1
                if path not in self._warned:  # once per file and process: no log flood every epoch
                    self._warned.add(path)
                    log.warning("skipping undecodable image %s (%s: %s)", path, type(e).__name__, e)
        raise DataError(f"no image under {self.root} can be decoded")

    def __getitem__(self, key: int | SampleKey) -> tuple[object, int]:
        index, sample_seed = _split_key(key)
        img, label = self._load(index)
        if self.transform is not None:
            if sample_seed is None:
                img = self.transform(img)
            else:
                with seeded_rng(sample_seed):
                    img = self.transform(img)
        return img, label


def _check_root(root: str | Path, splits: Sequence[str]) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data path {root} does not exist or is not a folder; point it at a folder with train/ and val/"
        )
    for split in splits:
        if not (root / split).is_dir():
            raise DataError(
                f"data path {root} has no {split}/ subfolder; expected {root}/{split}/<class>/<images>"
            )
    return root


def build_datasets(
    root: str | Path,
    *,
    train_transform: Callable | None,
    eval_transform: Callable | None,
    skip_bad_images: bool = False,
) -> tuple[ImageFolderDataset, ImageFolderDataset, list[str]]:
    """Train and val datasets from `root/train` and `root/val`, with the same class list."""
    root = _check_root(root, ("train", "val"))
    train_scan = scan_image_folder(root / "train")
    val_scan = scan_image_folder(root / "val")
    if train_scan[0] != val_scan[0]:
        only_train = sorted(set(train_scan[0]) - set(val_scan[0]))
        only_val = sorted(set(val_scan[0]) - set(train_scan[0]))
        raise DataError(
            f"train/ and val/ class folders differ under {root}: only in train: {_few(only_train)}; "
            f"only in val: {_few(only_val)}; both splits need the same class folders"
        )
    train = ImageFolderDataset(
        root / "train", train_transform, skip_bad_images=skip_bad_images, scanned=train_scan
    )
    val = ImageFolderDataset(root / "val", eval_transform, skip_bad_images=skip_bad_images, scanned=val_scan)
    return train, val, list(train.classes)


def build_eval_dataset(
    root: str | Path,
    transform: Callable | None,
    *,
    split: str = "val",
    skip_bad_images: bool = False,
) -> tuple[ImageFolderDataset, list[str]]:
    """The evaluation split alone (`root/val` by default) and its class names."""
    root = _check_root(root, (split,))
    ds = ImageFolderDataset(root / split, transform, skip_bad_images=skip_bad_images)
    return ds, list(ds.classes)


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


class SyntheticDataset(Dataset):
    """Random normalised images (3, S, S) with deterministic labels, for benchmarking the loop
    without decoding. Holds a pool of at most `pool_size` distinct images (memory stays small at 224+);
    sample i shows pool image i % pool_size. Accepts int or `SampleKey` keys."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int = 0, pool_size: int = 64):
        g = torch.Generator().manual_seed(seed)
        self.num_samples = num_samples
        self.images = torch.randn(min(pool_size, num_samples), 3, img_size, img_size, generator=g)
        self.labels = torch.randint(num_classes, (num_samples,), generator=g)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        index, _ = _split_key(key)
        return self.images[index % len(self.images)], int(self.labels[index])


# ----------------------------------------------------------------------------------------------
# Samplers


class ResumableTrainSampler(Sampler[SampleKey]):
    """DistributedSampler(shuffle=True) order (randperm seeded with seed + epoch, strided shard per
    rank, equal length per rank) that yields `(index, sample_seed)` keys and can start mid-epoch.

    Call `set_epoch(e)` before each epoch (it clears any start offset), then optionally
    `set_start(k, batch_size)` to skip the first k batches of this rank's shard without touching them.
    """

    def __init__(
        self, dataset_len: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = True
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if dataset_len < num_replicas:
            raise DataError(
                f"the train set has {dataset_len} images, fewer than the {num_replicas} processes"
            )
        self.dataset_len, self.num_replicas, self.rank, self.seed = dataset_len, num_replicas, rank, seed
        self.drop_last = drop_last
        self.num_samples = (
            (dataset_len // num_replicas) if drop_last else math.ceil(dataset_len / num_replicas)
        )
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
        if self.drop_last:
            order = order[: self.total_size]
        else:  # pad by repeating the start of the permutation, as DistributedSampler does
            pad = self.total_size - self.dataset_len
            order = torch.cat([order, order.repeat(math.ceil(pad / self.dataset_len))[:pad]])
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


# ----------------------------------------------------------------------------------------------
# Loader


def _init_worker(seed: int, rank: int, worker_id: int) -> None:
    """Deterministic global RNGs in each worker, for code outside the seeded transforms."""
    state = np.random.SeedSequence([seed, rank, worker_id]).generate_state(2, np.uint32)
    random.seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(state)
    torch.default_generator.manual_seed(int(state[0]) << 32 | int(state[1]))


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
    prefetch_factor: int | None = None,
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
    base = np.random.SeedSequence([seed, rank]).generate_state(2, np.uint32)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=partial(_init_worker, seed, rank) if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(int(base[0]) << 32 | int(base[1])),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


# ----------------------------------------------------------------------------------------------
# Mixup and the train criterion


def build_mixup(
    *,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    cutmix_minmax: tuple[float, float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    label_smoothing: float = 0.1,
    num_classes: int,
) -> Mixup | None:
    """timm Mixup/CutMix (official recipe defaults), or None when both alphas are 0 and no
    cutmix_minmax is set. It needs an even batch size; it draws from numpy's global RNG."""
    if mixup <= 0 and cutmix <= 0 and cutmix_minmax is None:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        cutmix_minmax=cutmix_minmax,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def build_train_criterion(*, mixup_active: bool, label_smoothing: float = 0.0) -> nn.Module:
    """SoftTargetCrossEntropy with mixup (its targets already carry the smoothing), else
    LabelSmoothingCrossEntropy when label_smoothing > 0, else nn.CrossEntropyLoss (official order)."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()
