"""aug.on_device: the workers draw flip and RandAugment with timm's own objects and the device applies them
(augment_draws.py, device_augment.py, pillow_ops.py). On CPU tensors: the same draws as timm's pipeline,
every op bitwise Pillow's on photographs, whole batches bitwise the worker pipeline's, exact resume."""

from __future__ import annotations

import hashlib
import io
import logging
import random

import numpy as np
import pytest
import torch
from helpers import (
    assert_bitwise_equal,
    epoch_batches,
    image_folder,
    photo_folder,
    photo_jpegs,
    repeatable_epoch_batches,
    shard_epoch_batches,
    torchrun,
    two_class_train_args,
    weights,
)
from PIL import Image, ImageEnhance, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.data import auto_augment as timm_aa
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

from swin_train.cli.train import cli as train_cli
from swin_train.config import AugConfig, DataConfig, load_config
from swin_train.data.augment_draws import (
    INTERPOLATION_CODES,
    KINDS,
    ROW,
    AugmentDraws,
    Augmented,
    UnsupportedOnDevice,
    rotate_matrix,
)
from swin_train.data.build import train_transform_for
from swin_train.data.decode import open_encoded
from swin_train.data.device_augment import DeviceAugment
from swin_train.data.erasing import SeededErasing
from swin_train.data.folder import build_datasets
from swin_train.data.prefetch import DeviceTransform, normalize_uint8
from swin_train.data.seeding import derive_seed, run_seeded, seeded_rng
from swin_train.data.transforms import _posterize, build_train_transform
from swin_train.errors import ConfigError

SPECS = ("rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-n3-mstd1-tweights", "original-mstd0.5", "v0")
FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """10 JPEGs cut from the bundled photographs as the loader benchmark cuts them (300-500 px)."""
    return photo_jpegs(10, seed=3)


@pytest.fixture(scope="module")
def small(photos) -> list[Image.Image]:
    """The photos shrunk to 72 x 56 (fast on CPU), plus a low-contrast one (autocontrast, equalize)."""
    images = [
        Image.open(io.BytesIO(p)).convert("RGB").resize((72, 56), Image.Resampling.BICUBIC) for p in photos
    ]
    return images + [images[0].point(lambda v: v // 3 + 60)]


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)


def _equal(image: Image.Image, tensor: torch.Tensor) -> bool:
    return torch.equal(_tensor(image), tensor)


def _one_op(image: torch.Tensor, kind: str, *args: float, interpolation: str = "bicubic") -> torch.Tensor:
    """`kind` with `args` applied to (1, 3, H, W) by the device half, as a batch whose one draw it is."""
    row = [KINDS.index(kind) + 1, INTERPOLATION_CODES.index(interpolation), *args]
    params = torch.tensor([[0.0, *row, *[0.0] * (ROW - len(row))]], dtype=torch.float64)
    return DeviceAugment(FILL)(Augmented(image.clone(), params))


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().tolist()


def _spy(transform, calls: list) -> None:
    """Log (name, level arguments) of every op timm's RandAugment/AutoAugment in `transform` applies."""
    for step in transform.transforms:
        ops_ = getattr(step, "ops", None) or [op for sp in getattr(step, "policy", []) for op in sp]
        for op in ops_:
            real = op.aug_fn
            op.aug_fn = lambda img, *args, _n=op.name, _f=real, **kw: (
                calls.append((_n, args)) or _f(img, *args, **kw)
            )


@pytest.mark.parametrize("spec", SPECS)
def test_the_workers_draw_exactly_the_ops_timm_applies_for_the_same_seed(photos, spec):
    aug = AugConfig(auto_augment=spec)
    timm_chain = build_train_transform(DataConfig(), aug, uint8=True)
    ours = build_train_transform(DataConfig(), aug, uint8=True, on_device=True)
    applied: list = []
    _spy(timm_chain, applied)
    draws = ours.transforms[-1]
    for seed, data in enumerate(photos):
        applied.clear()
        with seeded_rng(seed):
            timm_chain(open_encoded(data))
            timm_end = _rng_state()
        with seeded_rng(seed):
            sample = ours(open_encoded(data))
            ours_end = _rng_state()
        recorded = [(name, args) for name, args, _ in draws.log]
        assert recorded == applied and ours_end == timm_end
        assert isinstance(sample, Augmented) and sample.params.shape == (draws.num_params,)


def test_random_interpolation_is_drawn_inside_the_op_as_timm_draws_it(small):
    # timm's default hparams: each geometric op picks bilinear or bicubic with one more random draw
    augment = timm_aa.rand_augment_transform("rand-m9-n3-mstd0.5", {"translate_const": 40})
    worker_chain = [augment]
    draws = AugmentDraws(None, augment)
    for seed, image in enumerate(small):
        with seeded_rng(seed):
            expected = worker_chain[0](image)
            end = _rng_state()
        with seeded_rng(seed):
            sample = draws(image)
            assert _rng_state() == end
        got = DeviceAugment(draws.fill)(default_collate([sample]))
        assert _equal(expected, got)


def test_every_device_op_is_bitwise_pillows_on_photographs(small):
    rng = np.random.default_rng(0)
    checked = 0
    for image in small:
        t, (w, h) = _tensor(image), image.size
        for value in rng.uniform(-0.3, 0.3, 2):
            for resample, name in (
                (Image.Resampling.BICUBIC, "bicubic"),
                (Image.Resampling.BILINEAR, "bilinear"),
            ):
                kw = dict(fillcolor=FILL, resample=resample)
                cases = [
                    (timm_aa.shear_x(image, value, **kw), (1, value, 0, 0, 1, 0)),
                    (timm_aa.shear_y(image, value, **kw), (1, 0, 0, value, 1, 0)),
                    (timm_aa.translate_x_rel(image, value, **kw), (1, 0, value * w, 0, 1, 0)),
                    (timm_aa.translate_y_rel(image, value, **kw), (1, 0, 0, 0, 1, value * h)),
                    (timm_aa.rotate(image, value * 100, **kw), rotate_matrix(value * 100, w, h)),
                ]
                for expected, matrix in cases:
                    assert _equal(expected, _one_op(t, "affine", *matrix, interpolation=name))
                    checked += 1
        assert _equal(ImageOps.autocontrast(image), _one_op(t, "auto_contrast"))
        assert _equal(ImageOps.equalize(image), _one_op(t, "equalize"))
        assert _equal(ImageOps.invert(image), _one_op(t, "invert"))
        for bits in range(9):
            assert _equal(_posterize(image, bits), _one_op(t, "posterize", bits))
        for threshold in (0, 77, 128, 256):
            assert _equal(ImageOps.solarize(image, threshold), _one_op(t, "solarize", threshold))
            assert _equal(
                timm_aa.solarize_add(image, threshold // 3), _one_op(t, "solarize_add", threshold // 3, 128)
            )
        for factor in [*rng.uniform(0.1, 1.9, 3), 0.0, 1.0, 2.6]:
            assert _equal(ImageEnhance.Color(image).enhance(factor), _one_op(t, "color", factor))
            assert _equal(ImageEnhance.Contrast(image).enhance(factor), _one_op(t, "contrast", factor))
            assert _equal(ImageEnhance.Brightness(image).enhance(factor), _one_op(t, "brightness", factor))
            assert _equal(ImageEnhance.Sharpness(image).enhance(factor), _one_op(t, "sharpness", factor))
            checked += 4
    assert checked == len(small) * (2 * 2 * 5 + 6 * 4)


def test_the_histogram_ops_keep_pillows_rules_for_flat_and_two_level_channels():
    flat = Image.new("RGB", (9, 7), (40, 200, 0))
    two = Image.fromarray(np.tile(np.array([[[10, 10, 10]], [[250, 250, 250]]], np.uint8), (4, 9, 1)))
    for image in (flat, two):
        t = _tensor(image)
        assert _equal(ImageOps.autocontrast(image), _one_op(t, "auto_contrast"))
        assert _equal(ImageOps.equalize(image), _one_op(t, "equalize"))


def _mixed_batch(batch: int = 96, height: int = 20, width: int = 28, layers: int = 3) -> Augmented:
    """Noise images (and a flat, a two-level, a low-contrast and a three-level one) whose draws give every
    op kind, geometric ops with both interpolations and fills, at each of three positions."""
    rng, generator = np.random.default_rng(34), torch.Generator().manual_seed(34)
    pixels = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    pixels[1] = torch.tensor([40, 200, 0], dtype=torch.uint8).view(3, 1, 1)
    pixels[2] = torch.where(pixels[2] > 127, 250, 10).to(torch.uint8)
    pixels[3] = pixels[3] // 3 + 60
    pixels[4] = torch.randint(100, 103, (3, height, width), dtype=torch.uint8, generator=generator)
    params = np.zeros((batch, 1 + ROW * layers))
    params[:, 0] = rng.random(batch) < 0.5
    for s in range(batch):
        for layer in range(layers):
            row = params[s, 1 + ROW * layer : 1 + ROW * (layer + 1)]
            row[0] = code = (s + layer * (s // 12 + 1)) % (len(KINDS) + 1)  # 0: no op at this position
            kind = KINDS[code - 1] if code else None
            if kind == "affine":
                v = rng.uniform(-0.4, 0.4)
                matrices = [
                    (1, v, 0, 0, 1, 0),
                    (1, 0, 0, v, 1, 0),
                    (1, 0, v * width, 0, 1, 0),
                    (1, 0, 0, 0, 1, v * height),
                    rotate_matrix(v * 200, width, height),
                    (1, 0, rng.uniform(-40, 40), 0, 1, rng.uniform(-40, 40)),
                ]
                row[1] = rng.integers(2)
                row[2:] = matrices[rng.integers(len(matrices))]
            elif kind == "posterize":
                row[2] = rng.integers(0, 9)
            elif kind == "solarize":
                row[2] = rng.choice([0, 77, 128, 200, 256])
            elif kind == "solarize_add":
                row[2], row[3] = rng.integers(0, 111), rng.choice([0, 128, 256])
            elif kind in ("color", "contrast", "brightness", "sharpness"):
                row[2] = rng.choice([0.0, 1.0, 2.6, *rng.uniform(0.05, 1.95, 3)])
    return Augmented(pixels, torch.from_numpy(params))


_PILLOW = {  # each kind's Pillow op (timm's image functions), from its ROW arguments
    "affine": lambda im, a, bicubic: im.transform(
        im.size,
        Image.Transform.AFFINE,
        tuple(a),
        Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR,
        fillcolor=FILL,
    ),
    "auto_contrast": lambda im, a, _: ImageOps.autocontrast(im),
    "equalize": lambda im, a, _: ImageOps.equalize(im),
    "invert": lambda im, a, _: ImageOps.invert(im),
    "posterize": lambda im, a, _: _posterize(im, int(a[0])),
    "solarize": lambda im, a, _: ImageOps.solarize(im, a[0]),
    "solarize_add": lambda im, a, _: timm_aa.solarize_add(im, int(a[0]), thresh=a[1]),
    "color": lambda im, a, _: ImageEnhance.Color(im).enhance(a[0]),
    "contrast": lambda im, a, _: ImageEnhance.Contrast(im).enhance(a[0]),
    "brightness": lambda im, a, _: ImageEnhance.Brightness(im).enhance(a[0]),
    "sharpness": lambda im, a, _: ImageEnhance.Sharpness(im).enhance(a[0]),
}


def _one_by_one_with_pillow(batch: Augmented) -> torch.Tensor:
    """Each sample's draws applied one op at a time by Pillow, in its order: what the workers do."""
    out = []
    for pixels, p in zip(batch.pixels, batch.params.numpy()):
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        image = ImageOps.mirror(image) if p[0] else image
        for code, interpolation, *args in p[1:].reshape(-1, ROW):
            if code:
                image = _PILLOW[KINDS[int(code) - 1]](image, args, interpolation == 1)
        out.append(_tensor(image)[0])
    return torch.stack(out)


# sha256 (first 16 hex digits) of the mixed batch through the device half before it was vectorised (one
# call per op kind and position, each box erased by itself), to show the batches did not change
BEFORE_VECTORISING = {
    "augment": "f7a06db953dcd4ca",
    "pixel": "fe04bd39f1cd29b9",
    "pixel_recount3": "ae39d54021ef9daa",
    "rand_recount2": "d02f84e24ce02dbe",
    "const": "2fbc204d4d1c407d",
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def test_a_mixed_batch_is_bitwise_pillow_one_op_at_a_time_and_what_the_per_op_path_gave():
    batch = _mixed_batch()
    augment = DeviceAugment(FILL)
    got = augment(Augmented(batch.pixels.clone(), batch.params))
    assert torch.equal(got, _one_by_one_with_pillow(batch))
    digests = {"augment": _digest(got)}
    for name, erasing in {
        "pixel": dict(reprob=0.5),
        "pixel_recount3": dict(reprob=1.0, recount=3),
        "rand_recount2": dict(reprob=0.7, remode="rand", recount=2),
        "const": dict(reprob=0.6, remode="const"),
    }.items():
        device = DeviceTransform("cpu", seed=7, augment=augment, **erasing)
        digests[name] = _digest(device(Augmented(batch.pixels.clone(), batch.params), 3, 11))
    assert digests == BEFORE_VECTORISING


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops run inside it that are not views (on a GPU: kernel launches, or more)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _default_recipe_batch(batch: int, size: int = 32) -> tuple[Augmented, tuple[int, ...]]:
    """`batch` noise images through the default recipe's draws (rand-m9-mstd0.5-inc1, flips), and its fill."""
    on_device = build_train_transform(DataConfig(img_size=size), AugConfig(), uint8=True, on_device=True)
    generator = torch.Generator().manual_seed(batch)
    samples = []
    for seed in range(batch):
        noise = torch.randint(0, 256, (size + 8, size + 8, 3), dtype=torch.uint8, generator=generator)
        samples.append(run_seeded(on_device, Image.fromarray(noise.numpy()), seed))
    return default_collate(samples), on_device.draws.fill


def test_a_128_image_batch_is_augmented_normalised_and_erased_in_about_200_aten_ops_whatever_its_size():
    # before: 854 on this batch (759 augmenting: a call per op kind and position; 90 erasing: 3 a box)
    batch, fill = _default_recipe_batch(128)
    augment, erasing = DeviceAugment(fill), SeededErasing(AugConfig().reprob)
    augment(Augmented(batch.pixels.clone(), batch.params))  # AutoContrast's tables: once per process
    with _AtenOps() as augmenting:
        images = augment(batch)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with _AtenOps() as normalising:
        images = normalize_uint8(images, mean, std)
    boxes = erasing.boxes(random.Random(derive_seed(5)[0]), 128, 32, 32)
    with _AtenOps() as erasing_ops:
        erasing(images, 5)
    # per op position: one resampling and one colour pass; erasing: a noise draw per box (the same draws
    # as timm's, for the same noise) and one masked write
    assert augmenting.count == 158 and normalising.count == 5 and erasing_ops.count == len(boxes) + 3
    assert augmenting.count + normalising.count + erasing_ops.count == 196 and len(boxes) == 30
    bigger, _ = _default_recipe_batch(256)
    with _AtenOps() as augmenting_more:
        augment(bigger)
    assert augmenting_more.count == augmenting.count


@pytest.mark.parametrize("spec", SPECS[:4])
def test_device_batches_are_bitwise_the_worker_pipelines(photos, spec):
    data, aug = DataConfig(img_size=64), AugConfig(auto_augment=spec)
    workers = build_train_transform(data, aug, uint8=True)
    on_device = build_train_transform(data, aug, uint8=True, on_device=True)
    keys = [(i, seed) for seed in range(3) for i in range(len(photos))]
    expected = torch.stack([run_seeded(workers, open_encoded(photos[i]), s) for i, s in keys])
    batch = default_collate([run_seeded(on_device, open_encoded(photos[i]), s) for i, s in keys])
    got = DeviceAugment(on_device.transforms[-1].fill)(batch)
    assert got.shape == (len(keys), 3, 64, 64) and torch.equal(got, expected)


def test_full_decode_chain_hands_over_the_same_draws(photos):
    aug = AugConfig()
    full = build_train_transform(DataConfig(img_size=64, fast_decode=False), aug, uint8=True)
    full_device = build_train_transform(
        DataConfig(img_size=64, fast_decode=False), aug, uint8=True, on_device=True
    )
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in photos[:4]]
    expected = torch.stack([run_seeded(full, im, s) for s, im in enumerate(images)])
    batch = default_collate([run_seeded(full_device, im, s) for s, im in enumerate(images)])
    assert torch.equal(DeviceAugment(FILL)(batch), expected)


def test_on_device_batches_repeat_across_workers_resume_mid_epoch_and_equal_the_workers(tmp_path, photos):
    root = photo_folder(tmp_path, photos[:6])
    data, aug = DataConfig(img_size=48), AugConfig(reprob=0.25)
    on = build_train_transform(data, aug, uint8=True, on_device=True)
    device = DeviceTransform("cpu", reprob=0.25, seed=2, augment=DeviceAugment(on.transforms[-1].fill))
    train, _, _ = build_datasets(root, train_transform=on, eval_transform=None)
    whole = repeatable_epoch_batches(train, device_transform=device)
    off = build_train_transform(data, aug, uint8=True)
    workers_train, _, _ = build_datasets(root, train_transform=off, eval_transform=None)
    plain = DeviceTransform("cpu", reprob=0.25, seed=2)
    assert all(
        torch.equal(a, b) for a, b in zip(whole, epoch_batches(workers_train, 0, device_transform=plain))
    )


def test_on_device_shard_batches_resume_mid_epoch(tmp_path, photos):
    on = build_train_transform(DataConfig(img_size=48), AugConfig(), uint8=True, on_device=True)
    device = DeviceTransform("cpu", augment=DeviceAugment(on.transforms[-1].fill))
    folder, shards = photo_folder(tmp_path / "src", photos[:8]), tmp_path / "wds"
    whole = shard_epoch_batches(folder, shards, on, 0, device)
    resumed = shard_epoch_batches(folder, shards, on, 1, device)
    assert len(whole) == 4 and all(torch.equal(a, b) for a, b in zip(whole[1:], resumed))


def test_on_device_auto_means_a_gpu_and_an_unsupported_recipe_is_one_line_for_true(caplog):
    caplog.set_level(logging.INFO, "swin_train")
    cfg = load_config(None, [])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train_transform_for(cfg, cpu, device_pipeline=True)[1] is None
    assert isinstance(train_transform_for(cfg, cuda, device_pipeline=True)[1], DeviceAugment)
    # the workers normalise (the float pipeline): nothing left for the device
    assert train_transform_for(cfg, cuda, device_pipeline=False)[1] is None
    jitter = load_config(None, ["aug.auto_augment=null", "aug.color_jitter=0.4"])
    assert train_transform_for(jitter, cuda, device_pipeline=True)[1] is None  # auto: stays in the workers
    assert "ColorJitter" in caplog.text
    forced = load_config(None, ["aug.auto_augment=null", "aug.color_jitter=0.4", "aug.on_device=true"])
    with pytest.raises(
        ConfigError, match=r"^aug.on_device=true: the device does not apply ColorJitter; set aug"
    ):
        train_transform_for(forced, cpu, device_pipeline=True)
    with pytest.raises(UnsupportedOnDevice, match="GaussianBlur"):
        build_train_transform(
            DataConfig(), AugConfig(auto_augment="rand-m9-t3a", color_jitter=0), uint8=True, on_device=True
        )
    nearest = load_config(None, ["aug.on_device=true", "data.interpolation=nearest"])
    with pytest.raises(ConfigError, match="bilinear or bicubic"):
        train_transform_for(nearest, cpu, device_pipeline=True)
    assert load_config(None, ["aug.on_device=false"]).aug.on_device is False
    with pytest.raises(ConfigError, match="aug.on_device must be true, false or auto, got 'gpu'"):
        load_config(None, ["aug.on_device=gpu"])


@pytest.mark.parametrize("extra", [(), ("data.batch_size=16", "train.cpu_split=2")])
def test_a_cpu_run_with_the_device_half_forced_on_trains_bitwise_as_the_workers(tmp_path, extra, capsys):
    data = image_folder(tmp_path / "data", train=16)
    recipe = ["aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.reprob=0.25", *extra]
    for on in ("true", "false"):
        assert train_cli(two_class_train_args(data, tmp_path / on, *recipe, f"aug.on_device={on}")) == 0
        said = "normalised on the device (flipped and augmented there too)" in capsys.readouterr().out
        assert said == (on == "true")
    assert_bitwise_equal(weights(tmp_path / "true" / "last.pth"), weights(tmp_path / "false" / "last.pth"))


def test_two_processes_train_bitwise_with_the_device_half_forced_on(tmp_path):
    data = image_folder(tmp_path / "data", train=16)
    recipe = ["aug.auto_augment=rand-m9-mstd0.5-inc1", "aug.reprob=0.25"]
    for on in ("true", "false"):
        run = torchrun(2, "train", *two_class_train_args(data, tmp_path / on, *recipe, f"aug.on_device={on}"))
        assert run.returncode == 0, run.stderr[-2000:]
    assert_bitwise_equal(weights(tmp_path / "true" / "last.pth"), weights(tmp_path / "false" / "last.pth"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("spec", SPECS[:3])
def test_on_a_gpu_the_device_ops_give_the_cpus_pixels(photos, spec):
    # the same float64/float32/integer expressions on the GPU: expected bitwise (CUDA's arithmetic is IEEE)
    on_device = build_train_transform(
        DataConfig(img_size=224), AugConfig(auto_augment=spec), uint8=True, on_device=True
    )
    keys = [(i, seed) for seed in range(4) for i in range(len(photos))]
    samples = [run_seeded(on_device, open_encoded(photos[i]), s) for i, s in keys]
    augment = DeviceAugment(on_device.draws.fill)
    on_cpu = augment(default_collate(samples))
    batch = default_collate(samples)
    on_gpu = augment(batch.to("cuda")).cpu()
    differing = int((on_gpu != on_cpu).flatten(1).any(1).sum())
    assert differing == 0, f"{differing} of {len(keys)} images differ between the GPU and the CPU"
