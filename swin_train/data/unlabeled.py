"""Images without classes, for pre-training: every image under a folder, at any depth.

A folder of class folders reads the same way (its class names ignored), in ImageFolder's order. Shards and
Hugging Face datasets with labels are read by their own data sets as they are; a pre-training task ignores the
label of each (image, label) sample, and the samples here carry NO_LABEL in its place so that every source
gives batches of the same shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from swin_train.data.folder import ImageFolderDataset, _class_images
from swin_train.errors import DataError

log = logging.getLogger("swin_train")

# the label of an image that has none; not folder.SKIPPED_LABEL (-1), evaluation's mark of a file left out
NO_LABEL = -2


def check_unlabeled_root(root: str | Path, setting: str = "data path") -> Path:
    """`root` as a folder, or a DataError that names the `setting` holding it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{setting} {root} does not exist or is not a folder; point it at a folder of images (any depth)"
        )
    return root


def scan_unlabeled_folder(root: str | Path, setting: str = "data path") -> list[str]:
    """The image files under `root`: its own files in name order, then each sub-folder's the same way, in
    name order (for class folders, ImageFolder's order). Hidden files and folders are skipped, and directory
    links that lead back into `root` (a loop or a duplicate) are skipped and reported, as for ImageFolders.
    `setting`: what holds `root`, for the errors."""
    root = check_unlabeled_root(root, setting)
    skipped_links: list[str] = []
    paths = _class_images(root, os.path.realpath(root), skipped_links)
    for link in skipped_links:
        log.warning(
            "skipped directory link %s: it leads back into the data set (a loop or a duplicate)", link
        )
    if not paths:
        raise DataError(
            f"{setting} {root} holds no images ({', '.join(IMG_EXTENSIONS)}) at any depth; add images"
        )
    return paths


def unlabeled_image_folder(
    root: str | Path,
    transform: Callable | None = None,
    *,
    skip_bad_images: bool = False,
    cache_bytes: int = 0,
    evaluation: bool = False,
    paths: list[str] | None = None,
    setting: str = "data path",
) -> ImageFolderDataset:
    """Every image under `root` (scan_unlabeled_folder) as (image, NO_LABEL) samples of an ImageFolderDataset:
    its decoding (undecoded files for a fast-decode transform), per-sample seeds, data.skip_bad_images
    (a bad file is logged and replaced by the next one, counted in num_skipped) and decoded-image cache.
    It has no classes. `evaluation`: a bad file is left out as ImageFolders leave it out of evaluation (a
    placeholder labelled SKIPPED_LABEL). `paths`: these files of `root` only (a scan's subset). `setting`: what
    holds `root`, for the errors."""
    root = Path(root).expanduser()
    samples = [
        (path, NO_LABEL) for path in (scan_unlabeled_folder(root, setting) if paths is None else paths)
    ]
    return ImageFolderDataset(
        root,
        transform,
        skip_bad_images=skip_bad_images,
        scanned=([], samples),
        cache_bytes=cache_bytes,
        evaluation=evaluation,
    )
