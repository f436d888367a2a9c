"""Tests for the swin_train.data package (folders, transforms, samplers, the shapes set): tiny folders, exact numbers, bitwise resume."""

from __future__ import annotations

import logging
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DistributedSampler

from swin_train.config import AugConfig, DataConfig
from swin_train.data import seeding, shapes
from swin_train.data.folder import build_datasets, build_eval_dataset
from swin_train.data.loader import build_loader
from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
from swin_train.data.seeding import run_seeded, seeded_rng
from swin_train.data.shapes import default_shapes_root, ensure_shapes_dataset
from swin_train.data.synthetic import SyntheticDataset
from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
from swin_train.errors import DataError
from swin_train.losses import build_mixup, build_train_criterion


def _eval_tf(img_size: int, crop_pct: float, **kw):
    return build_eval_transform(Preprocess(img_size, crop_pct, "bicubic", IMAGENET_MEAN, IMAGENET_STD), **kw)


def _train_tf(img_size: int, **aug):
    return build_train_transform(DataConfig(img_size=img_size), AugConfig(**aug))


# ----------------------------------------------------------------------------------------------
# helpers


def _png(path: Path, seed: int, size: tuple[int, int] = (12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, spec: dict[str, dict[str, int]]) -> Path:
    """spec: {split: {class: n_images}} -> root/split/class/img_i.png"""
    for split, classes in spec.items():
        for c, (name, n) in enumerate(classes.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _png(root / split / name / f"img_{i}.png", seed=1000 * c + i)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# shapes


def test_shapes_deterministic_counts_and_cached(tmp_path):
    kw = dict(img_size=16, train_per_class=3, val_per_class=2)
    a = ensure_shapes_dataset(tmp_path / "a", seed=1, **kw)
    b = ensure_shapes_dataset(tmp_path / "b", seed=1, **kw)
    c = ensure_shapes_dataset(tmp_path / "c", seed=2, **kw)
    assert _files(a) == _files(b)  # byte-identical, meta.json included
    assert {k: v for k, v in _files(a).items() if k.endswith(".png")} != {
        k: v for k, v in _files(c).items() if k.endswith(".png")
    }
    for split, n in (("train", 3), ("val", 2)):
        names = sorted(p.name for p in (a / split).iterdir())
        assert names == sorted(shapes.CLASSES) and len(names) == 8
        for name in names:
            assert len(list((a / split / name).glob("*.png"))) == n
    img = Image.open(a / "train" / "star" / "star_0000.png")
    assert img.size == (16, 16) and img.mode == "RGB"

    # cached: a second call rewrites nothing
    stamp = {p: p.stat().st_mtime_ns for p in a.rglob("*.png")}
    assert ensure_shapes_dataset(a, seed=1, **kw) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.png")} == stamp
    # other parameters: regenerated in place
    ensure_shapes_dataset(a, seed=1, img_size=16, train_per_class=4, val_per_class=2)
    assert len(list((a / "train" / "ring").glob("*.png"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/old folders left


def test_shapes_killed_generation_leaves_no_half_set(tmp_path, monkeypatch):
    calls = []
    real_draw = shapes.draw_shape

    def failing_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # a kill in the middle of writing
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(shapes, "draw_shape", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(tmp_path / "s", img_size=8, train_per_class=2, val_per_class=1)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temp folder

    # kill -9 leaves a temp folder behind: a dead process's is removed, a live one's is kept
    monkeypatch.setattr(shapes, "draw_shape", real_draw)
    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f".s.tmp-{host}-99999999-abcd"
    live = tmp_path / f".s.tmp-{host}-{os.getpid()}-abcd"
    for d in (dead, live):
        (d / "train" / "circle").mkdir(parents=True)
    root = ensure_shapes_dataset(tmp_path / "s", img_size=8, train_per_class=2, val_per_class=1)
    assert not dead.exists() and live.exists()
    assert len(list(root.rglob("*.png"))) == 8 * 3


def test_shapes_refuses_foreign_folder_and_default_root(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(DataError, match="not a swin-train shapes set"):
        ensure_shapes_dataset(tmp_path / "mine", img_size=8, train_per_class=1, val_per_class=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user data"
    with pytest.raises(DataError, match="cannot write the shapes set"):  # parent is a file
        ensure_shapes_dataset(
            tmp_path / "mine" / "notes.txt" / "s", img_size=8, train_per_class=1, val_per_class=1
        )

    monkeypatch.setenv("SWIN_TRAIN_CACHE", str(tmp_path / "c1"))
    assert default_shapes_root() == tmp_path / "c1" / f"shapes-v{shapes.VERSION}"
    monkeypatch.delenv("SWIN_TRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_shapes_root() == tmp_path / "xdg" / "swin-train" / f"shapes-v{shapes.VERSION}"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_shapes_root() == Path.home() / ".cache" / "swin-train" / f"shapes-v{shapes.VERSION}"


# ----------------------------------------------------------------------------------------------
# datasets and their errors


def test_build_datasets_reads_folders(tmp_path):
    root = _folder(tmp_path, {"train": {"b": 2, "a": 3}, "val": {"a": 1, "b": 1}})
    _png(root / "train" / "a" / ".hidden.png", 0)  # hidden files and folders are not data
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "a" / "notes.txt").write_text("x")
    train, val, classes = build_datasets(root, train_transform=None, eval_transform=TF.to_tensor)
    assert classes == ["a", "b"]
    assert (len(train), len(val)) == (5, 2)
    assert train.targets == [0, 0, 0, 1, 1]
    x, y = val[1]
    assert y == 1 and x.shape == (3, 12, 12)
    ds, names = build_eval_dataset(root, TF.to_tensor)
    assert names == ["a", "b"] and len(ds) == 2


@pytest.mark.parametrize(
    "spec, match",
    [
        (None, "does not exist"),
        ({"train": {"a": 1}}, "has no val/ subfolder"),
        ({"val": {"a": 1}}, "has no train/ subfolder"),
        ({"train": {"a": 1, "b": 0}, "val": {"a": 1, "b": 1}}, r"class folder \S+/train/b has no images"),
        ({"train": {}, "val": {"a": 1}}, "has no class folders"),
        ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, "only in train: b; only in val: c"),
    ],
)
def test_build_datasets_errors(tmp_path, spec, match):
    root = tmp_path / "data"
    if spec is not None:
        root.mkdir()
        _folder(root, spec)
        for split in spec:
            (root / split).mkdir(exist_ok=True)
    with pytest.raises(DataError, match=match) as err:
        build_datasets(root, train_transform=None, eval_transform=None)
    assert "\n" not in str(err.value)


def test_bad_image_raises_or_is_skipped(tmp_path, caplog):
    root = _folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    bad = root / "train" / "a" / "broken.jpg"  # sorts first: index 0
    bad.write_bytes(b"\x00not a jpeg at all" * 10)
    train, _, _ = build_datasets(root, train_transform=TF.to_tensor, eval_transform=None)
    assert train.samples[0][0] == str(bad)
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        train[0]

    train, _, _ = build_datasets(
        root, train_transform=TF.to_tensor, eval_transform=None, skip_bad_images=True
    )
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        x, y = train[0]
    assert torch.equal(x, train[1][0]) and y == train[1][1]  # replaced by the next index
    assert "broken.jpg" in caplog.text
    assert train.num_skipped == 1
    # counted across worker processes too: one pass over the set hits the bad file once more
    loader = build_loader(train, batch_size=2, sampler=ExactEvalSampler(len(train)), num_workers=2, seed=0)
    assert sum(len(y) for _, y in loader) == len(train)
    assert train.num_skipped == 2


# ----------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_resize_and_crop_arithmetic():
    img = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    )  # W300 H200
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    bicubic = TF.InterpolationMode.BICUBIC

    out = _eval_tf(224, crop_pct=0.875)(img)
    assert out.shape == (3, 224, 224)
    ref = TF.center_crop(TF.resize(img, 256, interpolation=bicubic), 224)  # int(224 / 0.875) = 256
    assert torch.allclose(out, TF.normalize(TF.to_tensor(ref), mean, std), atol=1e-6)

    out = _eval_tf(32, crop_pct=0.9)(img)
    ref = TF.center_crop(TF.resize(img, 35, interpolation=bicubic), 32)  # int(32 / 0.9) = int(35.55) = 35
    assert torch.allclose(out, TF.normalize(TF.to_tensor(ref), mean, std), atol=1e-6)

    out = _eval_tf(224, crop_pct=1.0)(img)  # plain resize, whole image, aspect not kept
    ref = TF.resize(img, [224, 224], interpolation=bicubic)
    assert torch.allclose(out, TF.normalize(TF.to_tensor(ref), mean, std), atol=1e-6)


def test_train_transform_shape_and_posterize_zero_bits():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    t = _train_tf(32)  # the official recipe: RandAugment m9 mstd0.5 inc1, erasing 0.25
    assert t(img).shape == (3, 32, 32)
    # magnitude 10 makes PosterizeIncreasing keep 0 bits; Pillow >= 12 raises there, ours gives black
    t = _train_tf(32, auto_augment="rand-m10-mstd0-inc1")
    op = next(op for op in t.transforms[2].ops if op.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert np.asarray(op(img)).max() == 0
    assert _train_tf(32, auto_augment="none", reprob=0.0)(img).shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# samplers


def test_exact_eval_sampler_covers_every_index_once():
    n = 37  # prime: no world size 2..5 divides it
    for world in range(1, 6):
        shards = [list(ExactEvalSampler(n, world, r)) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert [len(ExactEvalSampler(n, world, r)) for r in range(world)] == [len(s) for s in shards]


def test_resumable_sampler_matches_distributed_sampler():
    n, world = 23, 3
    for rank in range(world):
        ours = ResumableTrainSampler(n, num_replicas=world, rank=rank, seed=5)
        ref = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=True
        )
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert [i for i, _ in ours] == list(ref)
            assert len(ours) == len(ref) == 7


def test_resumable_sampler_shards_and_start():
    n, world = 50, 4
    samplers = [ResumableTrainSampler(n, num_replicas=world, rank=r, seed=1) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    keys = [list(s) for s in samplers]
    shards = [[i for i, _ in k] for k in keys]
    assert all(len(s) == 12 for s in shards)
    assert len({i for s in shards for i in s}) == 48  # disjoint

    s = samplers[1]
    full = list(s)
    s.set_start(3, 2)
    assert list(s) == full[6:] and len(s) == len(full) - 6
    s.set_epoch(2)  # a new epoch clears the offset
    assert list(s) == full
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]
    with pytest.raises(ValueError):
        s.set_start(7, 2)

    # the augmentation seed of an index depends on (seed, epoch, index) only, not on the world size
    single = ResumableTrainSampler(n, seed=1)
    single.set_epoch(2)
    seed_of = dict(single)
    assert all(seed_of[i] == k for shard in keys for i, k in shard)
    with pytest.raises(DataError, match="fewer than the 8 processes"):
        ResumableTrainSampler(5, num_replicas=8, rank=0)


# ----------------------------------------------------------------------------------------------
# exact resume of augmented batches


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_resumed_loader_reproduces_batches_bitwise(tmp_path):
    root = _folder(tmp_path, {"train": {"a": 12, "b": 12}, "val": {"a": 1, "b": 1}})
    tf = _train_tf(16, reprob=0.5, crop_scale=[0.3, 1.0])  # RandAugment + erasing + crops
    train, _, _ = build_datasets(root, train_transform=tf, eval_transform=None)
    batch = 4

    def run(epoch: int, start: int, workers: int):
        sampler = ResumableTrainSampler(len(train), seed=3)
        loader = build_loader(
            train, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True, seed=3
        )
        out = []
        for e in range(epoch, epoch + 2):  # two epochs through the same (persistent) workers
            sampler.set_epoch(e)
            if e == epoch:
                sampler.set_start(start, batch)
            out.append(_batches(loader))
        return out

    full = run(1, 0, workers=2)
    resumed = run(1, 2, workers=2)
    assert len(full[0]) == 6 and len(resumed[0]) == 4
    for (xa, ya), (xb, yb) in zip(full[0][2:] + full[1], resumed[0] + resumed[1]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # independent of the worker count too, and the main-process RNGs are left alone
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    in_process = run(1, 2, workers=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed[0], in_process[0]))
    # and the augmentation really is random: another epoch shows the same images differently
    first = {int(i): x for i, x in zip(*_index_images(train, 1))}
    other = {int(i): x for i, x in zip(*_index_images(train, 2))}
    assert not any(torch.equal(first[i], other[i]) for i in first)


def _index_images(ds, epoch: int):
    sampler = ResumableTrainSampler(len(ds), seed=3)
    sampler.set_epoch(epoch)
    keys = list(sampler)
    return [k[0] for k in keys], [ds[k][0] for k in keys]


def test_seeded_rng_is_pure_and_restores_state():
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    with seeded_rng(1, 2, 3):
        a = (random.random(), np.random.rand(), torch.rand(1).item())
    with seeded_rng(1, 2, 3):
        b = (random.random(), np.random.rand(), torch.rand(1).item())
    with seeded_rng(1, 2, 4):
        c = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b and all(x != y for x, y in zip(a, c))
    assert np.array_equal(np.random.get_state()[1], before)


def test_run_seeded_restores_in_the_main_process_only(monkeypatch):
    def draw(scale):
        return scale * random.random(), scale * np.random.rand(), scale * torch.rand(1).item()

    with seeded_rng(1, 2, 3):
        expected = draw(2.0)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    assert run_seeded(draw, 2.0, 1, 2, 3) == expected
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's stream goes on
    # in a loader worker: the same draws, and the generators are left seeded (no save/restore)
    monkeypatch.setattr(seeding.torch.utils.data, "get_worker_info", lambda: object())
    assert run_seeded(draw, 2.0, 1, 2, 3) == expected
    assert not np.array_equal(np.random.get_state()[1], before)


def test_build_loader_checks_and_synthetic():
    ds = SyntheticDataset(10, num_classes=3, img_size=8, seed=0)
    x, y = ds[(4, 123)]
    assert x.shape == (3, 8, 8) and 0 <= y < 3
    again = SyntheticDataset(10, num_classes=3, img_size=8, seed=0)
    assert torch.equal(ds[4][0], again[4][0]) and [ds[i][1] for i in range(10)] == [
        again[i][1] for i in range(10)
    ]
    with pytest.raises(DataError, match="only 10 samples per process but batch size 16"):
        build_loader(ds, batch_size=16, sampler=ResumableTrainSampler(10), drop_last=True)
    loader = build_loader(ds, batch_size=4, sampler=ExactEvalSampler(10), num_workers=0)
    assert [len(y) for _, y in loader] == [4, 4, 2]


# ----------------------------------------------------------------------------------------------
# mixup and criterion


def test_mixup_and_criterion_selection():
    assert build_mixup(AugConfig(mixup=0.0, cutmix=0.0), 5) is None
    mix = build_mixup(AugConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), 5)
    assert isinstance(mix, Mixup)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing, mix.num_classes) == (0.8, 1.0, 0.1, 5)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with seeded_rng(0, 0, 1, 7):
        xa, ta = mix(x.clone(), y)
    with seeded_rng(0, 0, 1, 7):
        xb, tb = mix(x.clone(), y)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)  # resumable under seeded_rng
    assert ta.shape == (4, 5) and torch.allclose(ta.sum(1), torch.ones(4))

    assert isinstance(
        build_train_criterion(AugConfig(label_smoothing=0.1), mixup_active=True), SoftTargetCrossEntropy
    )
    ls = build_train_criterion(AugConfig(label_smoothing=0.1), mixup_active=False)
    assert isinstance(ls, LabelSmoothingCrossEntropy) and ls.smoothing == 0.1
    assert isinstance(
        build_train_criterion(AugConfig(label_smoothing=0.0), mixup_active=False), torch.nn.CrossEntropyLoss
    )
