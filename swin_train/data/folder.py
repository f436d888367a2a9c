"""ImageFolder data sets (`root/<split>/<class>/**/<image>`): scanning, decoding, and the rules both
training and `swin-predict` apply to image files."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from swin_train.data.decode import Encoded, UndecodableImage, open_encoded, rgb_image, takes_encoded
from swin_train.data.seeding import transform_sample
from swin_train.errors import DataError

log = logging.getLogger("swin_train")

SampleKey = tuple[int, int]  # (dataset index, augmentation seed) as yielded by ResumableTrainSampler

# The label of a file evaluation left out (data.skip_bad_images): no class, so evaluation counts it nowhere
SKIPPED_LABEL = -1

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
    augmentations and batches are bitwise the same). The whole set decides (`decoded_set_fits`: every file's
    header, so the decision is the same in every process and after a resume): if it would not fit, nothing
    is kept (`enabled` is False); nor is anything beyond `budget` bytes (a file that grew since). Each data
    worker has its own."""

    def __init__(self, budget: int, paths: Sequence[str] = ()):
        self.budget = budget
        self.images: dict[int, np.ndarray] = {}
        self.bytes = 0
        self.enabled = budget > 0 and decoded_set_fits(paths, budget)
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


def decoded_set_fits(paths: Sequence[str], budget: int) -> bool:
    """Whether the files at `paths`, decoded to RGB, fit in `budget` bytes, from their headers (cheap: no
    pixel is decoded); reading stops at the first file past the budget, so a large set costs a few opens.
    A file whose header does not read counts nothing: it is skipped or stops the run when it is loaded."""
    total = 0
    for path in paths:
        width, height = _header_size(path) or (0, 0)
        total += width * height * 3
        if total > budget:
            return False
    return True


class OutputCache:
    """Evaluation's transformed images (tensors), kept by the process that computed them, up to `budget`
    bytes. The evaluation transform draws nothing at random, so a kept output is bitwise the one computing
    it again gives: training's validation (which keeps them) and swin-eval (which does not) feed the model
    the same pixels, whichever decode path the transform takes. Each data worker has its own."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self.outputs: dict[int, torch.Tensor] = {}

    def get(self, index: int) -> torch.Tensor | None:
        return self.outputs.get(index)  # the batch collation copies it: never changed in place

    def add(self, index: int, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            return
        kept = output.clone()  # a center crop is a view of the whole resized image
        size = kept.untyped_storage().nbytes()
        if self.bytes + size <= self.budget:
            self.outputs[index] = kept
            self.bytes += size


class ImageFolderDataset(Dataset):
    """`root/<class>/**/<image>` as (image, label) pairs; keys may be ints or `SampleKey`s, whose seed
    makes the augmentation of a sample a pure function of the key (`transform_sample`), whichever worker
    decodes it. A transform that takes undecoded files (decode.takes_encoded) gets them.

    Training (`evaluation` False): with `skip_bad_images`, an undecodable file is logged and replaced by the
    next index (deterministic: the batch keeps its size); `num_skipped` counts such replacements across all
    worker processes. `cache_bytes` > 0 keeps decoded images in memory when the whole set fits
    (DecodedCache); a set the cache holds is decoded whole, cached or not, so a sample's pixels never depend
    on what a process decoded before.

    `evaluation`: an undecodable file (with `skip_bad_images`) is not replaced but handed over as a
    placeholder labelled SKIPPED_LABEL, which evaluation leaves out of every count; `skipped_files()` names
    the files the latest pass skipped. `cache_bytes` keeps transformed images (OutputCache), never decoded
    ones, so every pass feeds the model the pixels of an uncached pass."""

    def __init__(
        self,
        split_dir: str | Path,
        transform: Callable | None = None,
        *,
        skip_bad_images: bool = False,
        scanned: tuple[list[str], list[tuple[str, int]]] | None = None,
        cache_bytes: int = 0,
        evaluation: bool = False,
    ) -> None:
        self.root = Path(split_dir)
        self.classes, self.samples = scanned if scanned is not None else scan_image_folder(self.root)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.evaluation = evaluation
        # shared memory: workers are separate processes, a plain int would count per worker
        self._skipped = multiprocessing.Value("q", 0)
        # evaluation: 1 where the latest pass skipped the file, written by whichever worker read it
        self._skipped_flags = (
            multiprocessing.Array("b", len(self.samples), lock=False) if evaluation else None
        )
        self._warned: set[str] = set()
        paths = [path for path, _ in self.samples] if cache_bytes > 0 and not evaluation else []
        self.cache = DecodedCache(0 if evaluation else cache_bytes, paths)
        self.outputs = OutputCache(cache_bytes if evaluation else 0)

    @property
    def num_skipped(self) -> int:
        """How many times a bad image was replaced or left out (all processes, since construction)."""
        return int(self._skipped.value)

    def skipped_files(self) -> list[str]:
        """The files this process's latest evaluation pass left out (the indices its sampler gave it)."""
        if self._skipped_flags is None:
            return []
        flags = np.frombuffer(self._skipped_flags, dtype=np.int8)
        return [self.samples[i][0] for i in np.flatnonzero(flags)]

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
        if self.evaluation:
            return self._evaluation_sample(index)
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

    def _evaluation_sample(self, index: int) -> tuple[object, int]:
        """(the transformed image, its label), or a placeholder labelled SKIPPED_LABEL for a bad file."""
        path, label = self.samples[index]
        kept = self.outputs.get(index)
        if kept is None:
            try:
                kept = self._load(index)
            except DECODE_ERRORS as e:
                return self._placeholder(index, path, e)
            try:
                kept = kept if self.transform is None else self.transform(kept)
            except UndecodableImage as e:  # an undecoded file's data failed in the transform
                return self._placeholder(index, path, e.cause)
            self.outputs.add(index, kept)
        self._skipped_flags[index] = 0
        return kept, label

    def _placeholder(self, index: int, path: str, e: BaseException) -> tuple[object, int]:
        """What stands in a batch for a file evaluation leaves out: a 1x1 black image through the same
        transform (so that it collates with the others), labelled SKIPPED_LABEL."""
        self._bad_image(path, e)
        self._skipped_flags[index] = 1
        blank = Image.new("RGB", (1, 1))
        return (blank if self.transform is None else self.transform(blank)), SKIPPED_LABEL


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
    val = ImageFolderDataset(root / "val", eval_transform, scanned=val_scan, evaluation=True, **common)
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
    ds = ImageFolderDataset(root / split, transform, skip_bad_images=skip_bad_images, evaluation=True)
    return ds, list(ds.classes)


def few(names: Sequence[str], n: int = 5) -> str:
    """At most `n` names, comma-separated, and how many more."""
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
