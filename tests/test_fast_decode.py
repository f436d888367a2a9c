"""data.fast_decode (swin_train/data/decode.py): the crop drawn on the header, decoded and resized once.

Real photographs (the loader benchmark's, scripts/bench/photos.py) at ImageNet sizes: the same random draws
as timm's full path, pixels within a PSNR floor of it, today's path bitwise with fast_decode off, exact
resume and one-line errors with it on.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    epoch_batches,
    load_module,
    photo_folder,
    photo_jpegs,
    repeatable_epoch_batches,
    shard_epoch_batches,
)
from PIL import Image
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import RandomResizedCropAndInterpolation

from swin_train.config import AugConfig, DataConfig
from swin_train.data.decode import dct_scale, open_encoded, pil_pixels
from swin_train.data.folder import ImageFolderDataset, build_datasets, decode_image
from swin_train.data.samplers import ResumableTrainSampler
from swin_train.data.seeding import run_seeded, seeded_rng
from swin_train.data.shards import Shard, decode_sample
from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
from swin_train.errors import DataError

PRE = Preprocess(224, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """12 JPEGs cut from the bundled photographs as the benchmark cuts them (300-500 px, quality 75-95)."""
    return photo_jpegs(12, seed=7)


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _rng_fingerprint() -> tuple:
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().tolist()


def test_fast_decode_draws_the_same_boxes_flips_and_randaugment_ops_as_the_full_path(photos, monkeypatch):
    draws: list[tuple] = []
    get_params = RandomResizedCropAndInterpolation.get_params
    monkeypatch.setattr(
        RandomResizedCropAndInterpolation,
        "get_params",
        staticmethod(lambda img, scale, ratio: draws.append(get_params(img, scale, ratio)) or draws[-1]),
    )
    op_call = AugmentOp.__call__
    monkeypatch.setattr(
        AugmentOp, "__call__", lambda op, img: draws.append((op.name, _rng_fingerprint())) or op_call(op, img)
    )
    full = build_train_transform(DataConfig(fast_decode=False), AugConfig(), uint8=True)
    fast = build_train_transform(DataConfig(fast_decode=True), AugConfig(), uint8=True)
    for seed, data in enumerate(photos):
        draws.clear()
        with seeded_rng(seed):
            full(_decoded(data))
            full_end = _rng_fingerprint()
        full_draws = list(draws)
        draws.clear()
        with seeded_rng(seed):
            fast(open_encoded(data))
            fast_end = _rng_fingerprint()
        # boxes, then each RandAugment op with the RNG state it started from; the flip's torch draw and
        # everything after show in the final state of all three generators
        assert draws == full_draws and len(draws) == 3 and fast_end == full_end


def test_fast_crop_and_resize_stay_within_53_db_of_full_decode_and_eval_within_70_db(photos):
    # crop + resize alone (no flip or RandAugment, which can amplify a 1-level difference)
    aug = AugConfig(auto_augment=None, color_jitter=0, hflip=0)
    full = build_train_transform(DataConfig(fast_decode=False), aug, uint8=True)
    fast = build_train_transform(DataConfig(fast_decode=True), aug, uint8=True)
    full_eval, fast_eval = (
        build_eval_transform(PRE, uint8=True),
        build_eval_transform(PRE, uint8=True, fast_decode=True),
    )
    for seed, data in enumerate(photos):
        for draw in range(3):
            a = run_seeded(full, _decoded(data), seed, draw)
            b = run_seeded(fast, open_encoded(data), seed, draw)
            assert a.shape == b.shape == (3, 224, 224) and _psnr(a, b) >= 50.0
        assert _psnr(full_eval(_decoded(data)), fast_eval(open_encoded(data))) >= 68.0


def test_reduced_dct_scale_only_where_the_resize_still_shrinks_twice_and_within_33_db(photos):
    assert dct_scale((500, 375), (375 / 224, 375 / 224)) == 1  # ImageNet-sized crops decode whole
    assert dct_scale((2000, 1600), (3.9, 5.0)) == 1 and dct_scale((2000, 1600), (4.0, 5.0)) == 2
    assert dct_scale((4000, 3000), (16.1, 13.0)) == 4
    big = io.BytesIO()
    _decoded(photos[4]).resize((2000, 1500), Image.Resampling.LANCZOS).save(big, "JPEG", quality=90)
    aug = AugConfig(auto_augment=None, color_jitter=0, hflip=0, crop_scale=[0.9, 1.0])
    full = build_train_transform(DataConfig(fast_decode=False), aug, uint8=True)
    fast = build_train_transform(DataConfig(fast_decode=True), aug, uint8=True)
    a = run_seeded(full, _decoded(big.getvalue()), 3)
    b = run_seeded(fast, open_encoded(big.getvalue()), 3)
    assert _psnr(a, b) >= 33.0


def test_reduced_dct_scale_stays_within_35_db_on_content_made_to_break_it():
    # stripes whose period is twice the DCT factor, text and a zone plate: a crop box rounded to whole reduced
    # pixels shifted them by up to half a period (16-27 dB); the exact fractional box keeps 36 dB and more
    fidelity = load_module(
        "dct_fidelity", Path(__file__).resolve().parents[1] / "scripts" / "dct_fidelity.py"
    )
    for name, image in fidelity.adversarial_images(2003, 1501):
        if name in ("stripes 16px", "text", "zone plate"):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=75)
            assert dct_scale((2003, 1501), (2003 / 224, 1501 / 224)) == 2  # the eval crop takes the DCT path
            train, evaluation = fidelity.fidelity(buffer.getvalue(), 224, draws=4)
            assert min(train) >= 35.0 and evaluation >= 35.0, (name, train, evaluation)


def test_a_1_px_image_gives_the_full_paths_crops_bitwise_even_where_timm_draws_an_empty_box():
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 40, 90)).save(buffer, "PNG")
    aug = AugConfig(auto_augment=None, color_jitter=0, hflip=0)
    full = build_train_transform(DataConfig(img_size=32, fast_decode=False), aug, uint8=True)
    fast = build_train_transform(DataConfig(img_size=32, fast_decode=True), aug, uint8=True)
    black = 0
    for seed in range(64):  # about one draw in six is an empty box, which the full path resizes to black
        a = run_seeded(full, _decoded(buffer.getvalue()), seed)
        b = run_seeded(fast, open_encoded(buffer.getvalue()), seed)  # was a RuntimeError from interpolate
        assert torch.equal(a, b)
        black += int(a.max() == 0)
    assert 0 < black < 64


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of `values` (H, W) grayscale or (H, W, 3) RGB, written out (Pillow saves no 16-bit RGB)."""
    height, width = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grayscale_keeps_its_high_byte_on_the_pillow_and_fast_paths_alike(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (40, 56), dtype=np.uint16)
    high = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, 2)  # (H, W, 3)
    gray, rgb = tmp_path / "gray16.png", tmp_path / "rgb16.png"
    gray.write_bytes(png16(values))
    rgb.write_bytes(png16(np.repeat(values[..., None], 3, 2)))
    assert Image.open(gray).mode == "I;16"  # Pillow's convert("RGB") clipped it: every pixel 255
    # the same values as 16-bit RGB, which Pillow reads by their high byte, and the fast path's pixels
    assert np.array_equal(np.asarray(decode_image(gray)), high)
    assert np.array_equal(np.asarray(decode_image(rgb)), high)
    assert np.array_equal(pil_pixels(open_encoded(gray.read_bytes()).header).permute(1, 2, 0).numpy(), high)
    # both transforms at the image's own size (no resize, whose kernels differ by a level): the same bytes
    square = tmp_path / "square16.png"
    square.write_bytes(png16(values[:32, :32]))
    pre = Preprocess(32, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3)
    full, fast = (
        build_eval_transform(pre, uint8=True),
        build_eval_transform(pre, uint8=True, fast_decode=True),
    )
    expected = torch.from_numpy(high[:32, :32]).permute(2, 0, 1)
    assert torch.equal(full(decode_image(square)), expected)
    assert torch.equal(fast(open_encoded(square.read_bytes())), expected)
    shard = Shard("x.tar", "x.tar", 1)
    image, _ = decode_sample({"__key__": "k", "png": gray.read_bytes(), "cls": b"0"}, shard)
    assert np.array_equal(np.asarray(image), high)


def test_fast_decode_off_gives_todays_batches_bitwise(tmp_path, photos):
    root = photo_folder(tmp_path, photos[:6])
    transform = build_train_transform(DataConfig(fast_decode=False), AugConfig(), uint8=True)
    train, _, _ = build_datasets(root, train_transform=transform, eval_transform=None)
    # today's path written out: timm's own transform (posterize patched) on a Pillow-decoded image
    from timm.data import create_transform

    from swin_train.data.transforms import _fix_posterize

    timm_transform = create_transform(
        224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
        use_prefetcher=True,
    )  # fmt: skip
    _fix_posterize(timm_transform)
    sampler = ResumableTrainSampler(len(train), num_replicas=1, rank=0, seed=5)
    sampler.set_epoch(1)
    expected = [run_seeded(timm_transform, decode_image(train.samples[i][0]), seed) for i, seed in sampler]
    got = torch.cat(epoch_batches(train, 0))
    assert torch.equal(got, torch.stack(expected[: len(got)]))


def test_fast_decode_folder_batches_repeat_across_workers_and_resume_mid_epoch(tmp_path, photos):
    root = photo_folder(tmp_path, photos[:6])
    transform = build_train_transform(DataConfig(fast_decode=True), AugConfig(), uint8=True)
    # a cache budget the set fits in: every image then decodes whole, cached or not
    for cache in (0, 1 << 30):
        train, _, _ = build_datasets(root, train_transform=transform, eval_transform=None, cache_bytes=cache)
        repeatable_epoch_batches(train)


def test_fast_decode_shard_batches_resume_mid_epoch(tmp_path, photos):
    transform = build_train_transform(DataConfig(fast_decode=True), AugConfig(), uint8=True)
    folder, shards = photo_folder(tmp_path / "src", photos[:8]), tmp_path / "wds"
    whole = shard_epoch_batches(folder, shards, transform, 0)
    resumed = shard_epoch_batches(folder, shards, transform, 1)
    assert len(whole) == 4 and all(torch.equal(a, b) for a, b in zip(whole[1:], resumed))


def test_truncated_or_bad_jpegs_get_the_one_line_message_with_fast_decode(tmp_path, photos, caplog):
    root = photo_folder(tmp_path / "src", photos[:4])
    truncated = root / "train" / "b" / "00.jpg"
    truncated.write_bytes(photos[0][: len(photos[0]) // 2])  # header fine, data cut: fails when decoded
    transform = build_train_transform(DataConfig(fast_decode=True), AugConfig(), uint8=True)
    train, _, _ = build_datasets(root, train_transform=transform, eval_transform=None)
    index = [p for p, _ in train.samples].index(str(truncated))
    with pytest.raises(DataError, match=r"^cannot decode image .*00\.jpg \(.*\); delete or replace it") as e:
        train[(index, 1)]
    assert "\n" not in str(e.value) and "decode_jpeg.cpp" not in str(e.value)
    train, _, _ = build_datasets(root, train_transform=transform, eval_transform=None, skip_bad_images=True)
    image, label = train[(index, 1)]
    assert image.shape == (3, 224, 224) and train.num_skipped == 1

    import tarfile

    from swin_train.data import shards as S

    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "set-val-0000.tar", "w") as tar:
        for name, data in (("k0.jpg", truncated.read_bytes()), ("k0.cls", b"0")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    S.write_index(tmp_path / "wds")
    split = S.resolve_split(str(tmp_path / "wds"), "val")
    ds = S.ShardEvalDataset(split, build_eval_transform(PRE, uint8=True, fast_decode=True))
    with pytest.raises(DataError, match=r"^cannot decode image k0 in shard .*; re-pack with `swin-data pack"):
        list(ds)


def test_the_cache_decision_comes_from_the_files_headers_not_from_what_was_decoded_first(tmp_path, photos):
    root = photo_folder(tmp_path, photos[:4])
    transform = build_train_transform(DataConfig(fast_decode=True), AugConfig(), uint8=True)
    sizes = [Image.open(io.BytesIO(photo)).size for photo in photos[:4]]  # the whole set, not a/01.jpg alone
    need = sum(width * height * 3 for width, height in sizes)
    fits = ImageFolderDataset(root / "train", transform, cache_bytes=need)
    too_small = ImageFolderDataset(root / "train", transform, cache_bytes=need - 1)
    assert fits.cache.enabled and not too_small.cache.enabled
