"""ImageFolder data sets (`root/<split>/<class>/**/<image>`): scanning, decoding, and the rules both
training and `swin-predict` apply to image files."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from swin_train.data.decode import Encoded, UndecodableImage, open_encoded, rgb_image, takes_encoded
from swin_train.data.seeding import transform_sample
from swin_train.errors import DataError

log = logging.getLogger("swin_train")

SampleKey = tuple[int, int]  # (dataset index, augmentation seed) as yielded by ResumableTrainSampler

# PIL raises these for unreadable / truncated / hostile files (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
    """An image by its name: a known extension and not hidden (macOS `._x.jpg` are never images)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def split_key(key: int | SampleKey) -> tuple[int, int | None]:
    """(index, augmentation seed or None) from a sampler's key."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


def decode_error_reason(e: BaseException) -> str:
    """One line on why PIL could not read a file (PIL's own message would repeat the file object's repr)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can identify (empty, unknown format or damaged)"
    if isinstance(e, OSError) and e.strerror and e.filename:  # open() failed: "Permission denied"
        return e.strerror
    return " ".join(f"{type(e).__name__}: {e}".split())


def decode_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image, decoded the same way for training, evaluation and prediction (no EXIF rotation).
    Raises one of DECODE_ERRORS."""
    with open(path, "rb") as f:
        return rgb_image(Image.open(f))  # decodes: truncated data fails here


def read_encoded(path: str | os.PathLike) -> Encoded:
    """A file's bytes with its header parsed, for a transform that decodes only what it needs
    (decode.py); a bad header raises one of DECODE_ERRORS, bad data UndecodableImage when decoded."""
    with open(path, "rb") as f:
        return open_encoded(f.read(), str(path))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_images(class_dir: Path, split_real: str, skipped_links: list[str]) -> list[str]:
    """Image files under one class folder, sorted, following directory links that lead out of the data set.

    A link back into the split (`ln -s .. cat/loop`) would loop and relabel other classes' images as this
    class; a link to a folder already walked would count images twice. Both are skipped and reported."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        kept = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if d.startswith("."):
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if target in seen or _within(target, split_real) or _within(split_real, target):
                    skipped_links.append(f"{full} -> {target}")
                    continue
            kept.append(d)
        dirnames[:] = kept
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return found


def scan_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and (path, label) samples of one split, validated.

    Unlike torchvision's ImageFolder, hidden folders and files (`.ipynb_checkpoints`, macOS `._x.jpg`)
    are skipped: they are never images and would otherwise become classes or decode errors.
    """
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    split_real = os.path.realpath(split_dir)
    samples: list[tuple[str, int]] = []
    skipped_links: list[str] = []
    for label, name in enumerate(classes):
        found = _class_images(split_dir / name, split_real, skipped_links)
        if not found:
            raise DataError(
                f"class folder {split_dir / name} has no images ({', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        samples += [(path, label) for path in found]
    for link in skipped_links:
        log.warning(
            "skipped directory link %s: it leads back into the data set (a loop or a duplicate)", link
        )
    return classes, samples


class DecodedCache:
    """Decoded images kept by the process that decoded them, for a data set whose decoded images fit in
    `budget` bytes. Why our own: ImageFolder decodes every file again every epoch; for a small set that is
    most of a data worker's work, and on a machine where the workers share cores with the training threads
    every step waits for it. Nothing changes but where the pixels come from (the same RGB array, so
    augmentations and batches are bitwise the same). The set's first image decides (`first_size`, from its
    header, so the decision is the same in every process and after a resume): if the set would not fit at
    its size, nothing is kept (`enabled` is False); nor is anything beyond `budget` bytes. Each data worker
    has its own."""

    def __init__(self, budget: int, num_images: int, first_size: tuple[int, int] | None = None):
        self.budget, self.num_images = budget, num_images
        self.images: dict[int, np.ndarray] = {}
        self.bytes = 0
        fits = first_size is not None and first_size[0] * first_size[1] * 3 * num_images <= budget
        self.enabled = budget > 0 and fits
        self.filling = self.enabled

    def get(self, index: int) -> Image.Image | None:
        pixels = self.images.get(index)
        return None if pixels is None else Image.fromarray(pixels)  # a new image (RGB arrays are copied)

    def add(self, index: int, image: Image.Image) -> None:
        if not self.filling:
            return
        pixels = np.asarray(image)  # (H, W, 3) uint8
        if self.bytes + pixels.nbytes > self.budget:
            self.filling = False
        else:
            self.images[index] = pixels
            self.bytes += pixels.nbytes


class ImageFolderDataset(Dataset):
    """`root/<class>/**/<image>` as (image, label) pairs; keys may be ints or `SampleKey`s, whose seed
    makes the augmentation of a sample a pure function of the key (`transform_sample`), whichever worker
    decodes it. With `skip_bad_images`, an undecodable file is logged and replaced by the next index
    (deterministic); `num_skipped` counts such replacements across all worker processes. `cache_bytes` > 0
    keeps decoded images in memory when the set fits (DecodedCache). A transform that takes undecoded
    files (decode.takes_encoded) gets them, except from a set the cache holds: there every image is
    decoded whole, cached or not, so a sample's pixels never depend on what a process decoded before."""

    def __init__(
        self,
        split_dir: str | Path,
        transform: Callable | None = None,
        *,
        skip_bad_images: bool = False,
        scanned: tuple[list[str], list[tuple[str, int]]] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.root = Path(split_dir)
        self.classes, self.samples = scanned if scanned is not None else scan_image_folder(self.root)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        # shared memory: workers are separate processes, a plain int would count per worker
        self._skipped = multiprocessing.Value("q", 0)
        self._warned: set[str] = set()
        first_size = _header_size(self.samples[0][0]) if cache_bytes > 0 and self.samples else None
        self.cache = DecodedCache(cache_bytes, len(self.samples), first_size)

    @property
    def num_skipped(self) -> int:
        """How many times a bad image was replaced (all processes, since construction)."""
        return int(self._skipped.value)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image | Encoded:
        """The image at `index`: cached, undecoded (Encoded) or decoded. Raises one of DECODE_ERRORS."""
        cached = self.cache.get(index)
        if cached is not None:
            return cached
        path = self.samples[index][0]
        if takes_encoded(self.transform) and not self.cache.enabled:
            return read_encoded(path)
        image = decode_image(path)
        self.cache.add(index, image)
        return image

    def _bad_image(self, path: str, e: BaseException) -> None:
        """Raise the one-line DataError, or (skip_bad_images) count and log the file once per process."""
        if not self.skip_bad_images:
            raise DataError(
                f"cannot decode image {path} ({decode_error_reason(e)}); "
                "delete or replace it, or set data.skip_bad_images=true to skip such files"
            ) from None
        with self._skipped.get_lock():
            self._skipped.value += 1
        if path not in self._warned:  # once per file and process: no log flood every epoch
            self._warned.add(path)
            log.warning("skipping undecodable image %s (%s)", path, decode_error_reason(e))

    def __getitem__(self, key: int | SampleKey) -> tuple[object, int]:
        index, sample_seed = split_key(key)
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, label = self.samples[i]
            try:
                image = self._load(i)
            except DECODE_ERRORS as e:
                self._bad_image(path, e)
                continue
            if self.transform is None:
                return image, label
            try:
                return transform_sample(self.transform, image, sample_seed), label
            except UndecodableImage as e:  # an undecoded file's data failed in the transform
                self._bad_image(path, e.cause)
        raise DataError(f"no image under {self.root} can be decoded")


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from an image file's header; None when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except DECODE_ERRORS:
        return None


def check_root(root: str | Path, splits: Sequence[str]) -> Path:
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
    cache_bytes: int = 0,
) -> tuple[ImageFolderDataset, ImageFolderDataset, list[str]]:
    """Train and val datasets from `root/train` and `root/val`, with the same class list (at least 2);
    `cache_bytes`: see DecodedCache."""
    root = check_root(root, ("train", "val"))
    train_scan = scan_image_folder(root / "train")
    val_scan = scan_image_folder(root / "val")
    if train_scan[0] != val_scan[0]:
        only_train = sorted(set(train_scan[0]) - set(val_scan[0]))
        only_val = sorted(set(val_scan[0]) - set(train_scan[0]))
        raise DataError(
            f"train/ and val/ class folders differ under {root}: only in train: {few(only_train)}; "
            f"only in val: {few(only_val)}; both splits need the same class folders"
        )
    if len(train_scan[0]) < 2:
        raise DataError(
            f"{root / 'train'} has {len(train_scan[0])} class folder ({few(train_scan[0])}); a classifier "
            "needs at least 2 classes: add a folder per class"
        )
    common = dict(skip_bad_images=skip_bad_images, cache_bytes=cache_bytes)
    train = ImageFolderDataset(root / "train", train_transform, scanned=train_scan, **common)
    val = ImageFolderDataset(root / "val", eval_transform, scanned=val_scan, **common)
    return train, val, list(train.classes)


def build_eval_dataset(
    root: str | Path,
    transform: Callable | None,
    *,
    split: str = "val",
    skip_bad_images: bool = False,
) -> tuple[ImageFolderDataset, list[str]]:
    """The evaluation split alone (`root/val` by default) and its class names."""
    root = check_root(root, (split,))
    ds = ImageFolderDataset(root / split, transform, skip_bad_images=skip_bad_images)
    return ds, list(ds.classes)


def few(names: Sequence[str], n: int = 5) -> str:
    """At most `n` names, comma-separated, and how many more."""
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
