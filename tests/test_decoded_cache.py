"""Decoded images kept in memory for small ImageFolder sets (swin_train/data/folder.py, DecodedCache)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import image_folder, png
from PIL import Image

from swin_train.config import AugConfig, DataConfig
from swin_train.data.folder import ImageFolderDataset, build_datasets
from swin_train.data.loader import build_loader
from swin_train.data.samplers import ResumableTrainSampler
from swin_train.data.transforms import build_train_transform
from swin_train.errors import DataError

PNG_BYTES = 32 * 32 * 3  # helpers.png writes 32 px RGB images


def _train_set(root, cache_bytes: int) -> ImageFolderDataset:
    transform = build_train_transform(
        DataConfig(img_size=32), AugConfig(auto_augment=None, reprob=0), uint8=True
    )
    train, _, _ = build_datasets(
        root, train_transform=transform, eval_transform=None, cache_bytes=cache_bytes
    )
    return train


def _epoch(dataset, epoch: int, workers: int, loader=None):
    """(loader, the epoch's batches) through a persistent-worker loader with per-sample augmentation seeds."""
    if loader is None:
        sampler = ResumableTrainSampler(len(dataset), num_replicas=1, rank=0, seed=0)
        loader = build_loader(dataset, batch_size=4, sampler=sampler, num_workers=workers, drop_last=True)
    loader.sampler.set_epoch(epoch)
    return loader, [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_small_set_is_decoded_once_and_later_epochs_are_bitwise_those_decoded_from_files(tmp_path, workers):
    root = image_folder(tmp_path / "data", train=6, val=2)
    cached = _train_set(root, cache_bytes=1 << 20)
    loader, first = _epoch(cached, 0, workers)
    shutil.rmtree(root / "train")  # from here on only memory can serve the images
    _, second = _epoch(cached, 1, workers, loader)
    _, again = _epoch(cached, 0, workers, loader)  # epoch 0 again, from memory

    reference_root = image_folder(tmp_path / "ref", train=6, val=2)
    _, ref0 = _epoch(_train_set(reference_root, cache_bytes=0), 0, workers)
    _, ref1 = _epoch(_train_set(reference_root, cache_bytes=0), 1, workers)
    for got, want in [(first, ref0), (again, ref0), (second, ref1)]:
        assert len(got) == len(want) == 3
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))


def test_a_set_that_would_not_fit_keeps_nothing(tmp_path):
    root = image_folder(tmp_path / "data", train=6, val=2)
    dataset = _train_set(root, cache_bytes=12 * PNG_BYTES - 1)  # 12 train images of 3 KiB: one byte short
    for i in range(len(dataset)):
        dataset[i]
    assert dataset.cache.bytes == 0 and not dataset.cache.images and not dataset.cache.filling
    shutil.rmtree(root / "train")
    with pytest.raises(DataError, match="cannot decode image"):
        dataset[0]


def test_the_whole_set_decides_whether_it_fits_not_its_first_image(tmp_path):
    root = image_folder(tmp_path / "data", train=6, val=2)
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "train" / "cat" / "0.png")  # sorted first
    whole = 11 * PNG_BYTES + 3  # the 12 train images decoded
    assert not _train_set(root, cache_bytes=whole - 1).cache.enabled  # the 1x1 image said 36 bytes fit
    dataset = _train_set(root, cache_bytes=whole)
    assert dataset.cache.enabled
    for i in range(len(dataset)):
        dataset[i]
    assert dataset.cache.bytes == whole and len(dataset.cache.images) == 12


def test_memory_never_exceeds_the_budget_when_later_images_are_larger(tmp_path):
    root = image_folder(tmp_path / "data", train=3, val=1)
    dataset = _train_set(root, cache_bytes=6 * PNG_BYTES)  # the 6 images of 3 KiB fit
    # a file that grew after the set was sized
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "train" / "dog" / "2.png")  # 4x the others
    for i in range(len(dataset)):
        dataset[i]
    assert dataset.cache.bytes <= 6 * PNG_BYTES and not dataset.cache.filling
    assert len(dataset.cache.images) == 5  # all but dog/2, whose 12 KiB would pass the budget


def test_an_undecodable_image_is_never_kept_and_is_skipped_every_epoch(tmp_path):
    root = image_folder(tmp_path / "data", train=3, val=1)
    (root / "train" / "cat" / "1.png").write_bytes(b"not a png")
    png(root / "train" / "cat" / "9.png", 7)  # an extra good image keeps the classes balanced enough
    transform = build_train_transform(
        DataConfig(img_size=32), AugConfig(auto_augment=None, reprob=0), uint8=True
    )
    train, _, _ = build_datasets(
        root, train_transform=transform, eval_transform=None, skip_bad_images=True, cache_bytes=1 << 20
    )
    for _ in range(2):
        for i in range(len(train)):
            train[i]
    assert train.num_skipped == 2 and len(train.cache.images) == len(train) - 1
