"""SimMIM pre-training data (data/simmim.py, data/unlabeled.py): the official MaskGenerator and transform,
masks that repeat across workers and resumes, and folders of images without classes."""

from __future__ import annotations

import io
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import (
    epoch_batches,
    image_folder,
    photo_folder,
    photo_jpegs,
    png,
    repeatable_epoch_batches,
    shard_epoch_batches,
)
from official import official_module
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from swin_train.config import DataConfig
from swin_train.data.decode import open_encoded
from swin_train.data.folder import scan_image_folder
from swin_train.data.prefetch import DeviceTransform
from swin_train.data.seeding import run_seeded, seeded_rng
from swin_train.data.simmim import MaskGenerator, SimMIMTransform, build_simmim_transform
from swin_train.data.unlabeled import NO_LABEL, scan_unlabeled_folder, unlabeled_image_folder
from swin_train.errors import ConfigError, DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "size, mask_patch, model_patch, ratio",
    [(192, 32, 4, 0.6), (224, 32, 4, 0.6), (64, 16, 2, 0.75), (96, 32, 4, 0.1)],
)
def test_mask_generator_equals_the_official_one_under_the_same_numpy_seed(
    size, mask_patch, model_patch, ratio, tmp_path
):
    official = official_module("official_data_simmim_pt", "data/data_simmim_pt.py", tmp_path)
    theirs = official.MaskGenerator(size, mask_patch, model_patch, ratio)
    ours = MaskGenerator(size, mask_patch, model_patch, ratio)
    assert ours.mask_count == theirs.mask_count and ours.token_count == theirs.token_count
    for seed in range(5):
        np.random.seed(seed)
        expected = theirs()
        np.random.seed(seed)
        assert torch.equal(ours(), torch.from_numpy(expected).to(torch.uint8)), seed


def test_mask_has_the_official_count_of_whole_mask_patches():
    gen = MaskGenerator(192, 32, 4, 0.6)  # 6 x 6 mask patches of 8 x 8 model patches
    assert (gen.token_count, gen.mask_count, gen.scale) == (36, 22, 8)  # ceil(36 x 0.6) = ceil(21.6)
    masks = torch.stack([gen(np.random.RandomState(seed)) for seed in range(50)])
    assert masks.shape == (50, 48, 48) and masks.dtype == torch.uint8
    blocks = masks.view(50, 6, 8, 6, 8)
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))  # every mask patch all 0 or all 1
    assert (blocks.amax((2, 4)).sum((1, 2)) == 22).all()
    assert len({m.numpy().tobytes() for m in masks}) == 50
    np.random.seed(3)  # without a generator: numpy's global one, as the official draws it
    a = gen()
    np.random.seed(3)
    assert torch.equal(a, gen(np.random.RandomState(3)))
    wide = MaskGenerator((192, 256), 32, 4, 0.6)(np.random.RandomState(0))  # H x W images
    assert wide.shape == (48, 64) and wide.sum() == math.ceil(48 * 0.6) * 64


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (200, 32, 4, 0.6),
            "the mask patch 32 does not divide the image size 200x200; use an image size that is a multiple of "
            "32 or another mask patch size",
        ),
        ((192, 30, 4, 0.6), "the mask patch 30 does not divide the image size 192x192"),
        (
            (192, 32, 3, 0.6),
            "the mask patch 32 is not a multiple of the model's patch 3; use a multiple of 3",
        ),
        ((192, 32, 4, 1.0), "the mask ratio must be in (0, 1), got 1.0"),
        ((192, 32, 4, 0.0), "the mask ratio must be in (0, 1), got 0.0"),
        ((192, 0, 4, 0.5), "SimMIM masks need positive sizes"),
    ],
)
def test_mask_settings_errors_are_one_line(args, message):
    with pytest.raises(ConfigError) as e:
        MaskGenerator(*args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the transform


def _image(seed: int, size=(90, 70)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _recording_boxes(monkeypatch) -> list:
    boxes: list = []
    get_params = RandomResizedCropAndInterpolation.get_params
    monkeypatch.setattr(
        RandomResizedCropAndInterpolation,
        "get_params",
        staticmethod(lambda img, scale, ratio: boxes.append(get_params(img, scale, ratio)) or boxes[-1]),
    )
    return boxes


def _official_pixels(image: Image.Image, box, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official transform_img for a given crop box: resized_crop (bilinear), ToTensor, Normalize; as
    drawn and flipped."""
    crop = TF.resized_crop(image, *box, [size, size], T.InterpolationMode.BILINEAR)
    tensor = TF.normalize(TF.to_tensor(crop), MEAN, STD)
    return tensor, tensor.flip(-1)


def test_transform_is_the_official_one_given_the_same_box(monkeypatch):
    boxes = _recording_boxes(monkeypatch)
    transform = build_simmim_transform(DataConfig(img_size=64, fast_decode=False), model_patch_size=4)
    rrc = transform.image_transform.transforms[0]
    assert (rrc.scale, rrc.ratio, rrc.interpolation) == (
        (0.67, 1.0),
        (3 / 4, 4 / 3),
        T.InterpolationMode.BILINEAR,
    )
    assert [type(t).__name__ for t in transform.image_transform.transforms] == [
        "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"
    ]  # fmt: skip
    flips = []
    for seed in range(12):
        image = _image(seed)
        boxes.clear()
        pixels, mask = run_seeded(transform, image, seed)
        plain, flipped = _official_pixels(image, boxes[0], 64)
        assert torch.equal(pixels, plain) or torch.equal(pixels, flipped), seed
        flips.append(torch.equal(pixels, flipped))
        assert mask.shape == (16, 16) and mask.sum() == 3 * 8 * 8  # ceil(4 x 0.6) = 3 of 2 x 2 mask patches
    assert 0 < sum(flips) < 12


def test_transform_equals_the_official_simmim_transform_from_the_snapshot(tmp_path, monkeypatch):
    official = official_module("official_data_simmim_pt", "data/data_simmim_pt.py", tmp_path)
    config = SimpleNamespace(
        DATA=SimpleNamespace(IMG_SIZE=64, MASK_PATCH_SIZE=32, MASK_RATIO=0.6),
        MODEL=SimpleNamespace(TYPE="swin", SWIN=SimpleNamespace(PATCH_SIZE=4)),
    )
    theirs = official.SimMIMTransform(config)
    boxes = _recording_boxes(monkeypatch)
    ours = build_simmim_transform(DataConfig(img_size=64, fast_decode=False), model_patch_size=4)
    for seed in range(6):
        image = _image(seed)
        boxes.clear()
        pixels, mask = run_seeded(ours, image, seed)
        monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a: boxes[0]))
        with seeded_rng(seed):
            np.random.seed(seed)
            their_pixels, their_mask = theirs(image)
        assert torch.equal(pixels, their_pixels) or torch.equal(pixels, their_pixels.flip(-1)), seed
        np.random.seed(seed)
        assert torch.equal(MaskGenerator(64, 32, 4, 0.6)(), torch.from_numpy(their_mask).to(torch.uint8))
        assert mask.shape == their_mask.shape


def test_uint8_fast_decode_transform_normalised_on_the_device_matches_the_worker_pipeline():
    photos = photo_jpegs(4, seed=3)
    data = DataConfig(img_size=96, fast_decode=False)
    floats = build_simmim_transform(data, model_patch_size=4)
    uint8 = build_simmim_transform(data, model_patch_size=4, uint8=True)
    fast = build_simmim_transform(DataConfig(img_size=96), model_patch_size=4, uint8=True)
    assert fast.takes_encoded and not uint8.takes_encoded
    device = DeviceTransform("cpu", MEAN, STD)
    for seed, photo in enumerate(photos):
        image = Image.open(io.BytesIO(photo)).convert("RGB")
        (f, mask_f), (u, mask_u) = run_seeded(floats, image, seed), run_seeded(uint8, image, seed)
        (q, mask_q) = run_seeded(fast, open_encoded(photo), seed)
        assert (
            u.dtype == q.dtype == torch.uint8 and torch.equal(mask_f, mask_u) and torch.equal(mask_u, mask_q)
        )
        assert torch.equal(device(u[None])[0], f)  # the same image as the workers would normalise
        mse = ((u.float() - q.float()) ** 2).mean().item()
        assert mse == 0 or 10 * math.log10(255**2 / mse) >= 45.0  # fast decode: the same crop, torch's resize


class _Flat:
    """A SimMIM transform whose image and mask come back as one tensor (epoch_batches compares tensors)."""

    def __init__(self, transform: SimMIMTransform) -> None:
        self.transform, self.takes_encoded = transform, transform.takes_encoded

    def __call__(self, image) -> torch.Tensor:
        pixels, mask = self.transform(image)
        return torch.cat([pixels.flatten().float(), mask.flatten().float()])


# ---------------------------------------------------------------- unlabeled folders and masks across resumes


def test_unlabeled_folder_reads_every_image_at_any_depth_in_a_fixed_order(tmp_path, caplog):
    root = tmp_path / "pile"
    for name in (
        "b.png",
        "a.png",
        "z/2.png",
        "z/1.png",
        "m/deep/er/x.png",
        ".hidden.png",
        ".git/c.png",
        "._a.png",
    ):
        png(root / name, len(name))
    (root / "notes.txt").write_text("not an image")
    (root / "z" / "loop").symlink_to(root)
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        paths = scan_unlabeled_folder(root)
    rel = [str(p)[len(str(root)) + 1 :] for p in paths]
    assert rel == ["a.png", "b.png", "m/deep/er/x.png", "z/1.png", "z/2.png"]
    assert "skipped directory link" in caplog.text
    classes = image_folder(tmp_path / "classes")
    assert scan_unlabeled_folder(classes / "train") == [p for p, _ in scan_image_folder(classes / "train")[1]]
    dataset = unlabeled_image_folder(root)
    assert len(dataset) == 5 and dataset.classes == [] and dataset[0][1] == NO_LABEL
    assert dataset[0][0].size == (32, 32)


def test_unlabeled_folder_errors_and_skip_bad_images(tmp_path):
    with pytest.raises(DataError, match=r"^data path .*missing does not exist or is not a folder"):
        scan_unlabeled_folder(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty holds no images \(.*\) at any depth; add images$"):
        scan_unlabeled_folder(tmp_path / "empty")
    root = tmp_path / "pile"
    for i in range(3):
        png(root / f"{i}.png", i)
    (root / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"^cannot decode image .*1\.png \(.*\); delete or replace it"):
        unlabeled_image_folder(root)[1]
    skipping = unlabeled_image_folder(root, skip_bad_images=True)
    image, label = skipping[1]  # replaced by the next image, as for ImageFolders
    assert np.array_equal(np.asarray(image), np.asarray(skipping[2][0])) and label == NO_LABEL
    assert skipping.num_skipped == 1


def test_masks_and_crops_repeat_across_workers_and_resume_mid_epoch(tmp_path):
    root = tmp_path / "pile"
    for i in range(6):
        png(root / f"d{i % 2}" / f"{i}.png", i, size=64)
    transform = _Flat(
        build_simmim_transform(DataConfig(img_size=32), model_patch_size=4, mask_patch_size=16, uint8=True)
    )
    for cache in (0, 1 << 30):
        whole = repeatable_epoch_batches(unlabeled_image_folder(root, transform, cache_bytes=cache))
    masks = [b[:, 3 * 32 * 32 :] for b in whole]
    assert all(((m == 0) | (m == 1)).all() and (m.sum(1) == 3 * 16).all() for m in masks)  # 3 of 4 patches
    other_epoch = epoch_batches(unlabeled_image_folder(root, transform), 0, epoch=2)
    assert not all(torch.equal(a, b) for a, b in zip(whole, other_epoch))


def test_labeled_shards_and_hf_rows_give_seeded_masks_with_their_labels_ignored(tmp_path):
    transform = _Flat(
        build_simmim_transform(DataConfig(img_size=32), model_patch_size=4, mask_patch_size=16, uint8=True)
    )
    folder, shards = photo_folder(tmp_path / "src", photo_jpegs(8, seed=1)), tmp_path / "wds"
    whole = shard_epoch_batches(folder, shards, transform, 0)
    resumed = shard_epoch_batches(folder, shards, transform, 1)
    assert len(whole) == 4 and all(torch.equal(a, b) for a, b in zip(whole[1:], resumed))
    datasets = pytest.importorskip("datasets")
    from swin_train.data.hf_dataset import HFImageDataset

    _, samples = scan_image_folder(folder / "train")
    samples = samples[:6]  # three batches of two
    rows = datasets.Dataset.from_dict(
        {"image": [p for p, _ in samples], "label": [y for _, y in samples]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    hf = HFImageDataset(rows, transform)
    assert torch.equal(hf[(3, 77)][0], hf[(3, 77)][0]) and not torch.equal(hf[(3, 77)][0], hf[(3, 78)][0])
    repeatable_epoch_batches(hf)
