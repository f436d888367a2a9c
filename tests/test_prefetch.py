"""Tests for swin_train.data.prefetch: the device half of the uint8 pipeline and the prefetching loader."""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading

import numpy as np
import pytest
import torch
from helpers import MICRO_OVERRIDES, assert_bitwise_equal, weights
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.data.random_erasing import RandomErasing

from swin_train.config import AugConfig, DataConfig, load_config
from swin_train.data.device_decode import Undecoded
from swin_train.data.erasing import SeededErasing
from swin_train.data.folder import build_datasets
from swin_train.data.loader import build_loader
from swin_train.data.prefetch import FEEDER, DeviceTransform, normalize_uint8, prefetch
from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
from swin_train.data.seeding import seeded_rng
from swin_train.data.shapes import ensure_shapes_dataset
from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
from swin_train.errors import DataError
from swin_train.trainer import train

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    """8 classes at 32 px: 16 train / 2 val images per class."""
    root = tmp_path_factory.mktemp("tiny") / "shapes"
    return ensure_shapes_dataset(root, img_size=32, train_per_class=16, val_per_class=2)


def _rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _same_rng_states(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def _loaders(root, *, uint8: bool, workers: int = 0, start: int = 0):
    """Train (RandAugment, crops, flips; no erasing) and val loaders over `root`, epoch 1 from batch `start`."""
    train_tf = build_train_transform(
        DataConfig(img_size=32), AugConfig(crop_scale=[0.3, 1.0], reprob=0.0), uint8=uint8
    )
    eval_tf = build_eval_transform(Preprocess(32, 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD), uint8=uint8)
    train_set, val_set, _ = build_datasets(root, train_transform=train_tf, eval_transform=eval_tf)
    sampler = ResumableTrainSampler(len(train_set), seed=4)
    sampler.set_epoch(1)
    sampler.set_start(start, 16)
    kw = dict(batch_size=16, num_workers=workers, seed=4)
    return (
        build_loader(train_set, sampler=sampler, drop_last=True, **kw),
        build_loader(val_set, sampler=ExactEvalSampler(len(val_set)), **kw),
    )


def _collect(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.cpu().clone(), y.cpu().clone()) for x, y in batches]


def test_device_path_batches_equal_the_worker_path_bitwise(tiny_shapes):
    floats = [_collect(loader) for loader in _loaders(tiny_shapes, uint8=False)]
    uint8_loaders = _loaders(tiny_shapes, uint8=True, workers=2)
    raw = next(iter(uint8_loaders[0]))[0]
    assert raw.dtype == torch.uint8 and raw.shape == (16, 3, 32, 32)  # a quarter of the float bytes
    tf = DeviceTransform("cpu", IMAGENET_MEAN, IMAGENET_STD, reprob=0.0)
    on_device = [
        _collect(prefetch(uint8_loaders[0], "cpu", lambda x, i: tf(x, 1, i))),
        _collect(prefetch(uint8_loaders[1], "cpu", lambda x, i: tf(x))),
    ]
    for ref, got in zip(floats, on_device):
        assert len(ref) == len(got) > 0
        for (xa, ya), (xb, yb) in zip(ref, got):
            assert xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    # the arithmetic alone: ToTensor's x / 255 then Normalize's (x - mean) / std, per image
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ref = torch.stack([(img.float().div(255) - mean) / std for img in x])
    assert torch.equal(normalize_uint8(x, mean, std), ref)


def test_device_erasing_is_a_pure_function_of_seed_rank_epoch_and_batch():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    tf = DeviceTransform("cpu", reprob=1.0, remode="pixel", seed=3, rank=0)
    clean = DeviceTransform("cpu")(x)
    before = _rng_states()
    a, again = tf(x, 2, 5), tf(x, 2, 5)
    assert _same_rng_states(before, _rng_states())  # the global streams (mixup, drop path) are untouched
    assert torch.equal(a, again)
    erased = (a != clean).flatten(1).any(1)
    assert erased.all()  # probability 1: every image has a box of fresh noise ...
    assert ((a != clean).float().mean() < 0.5).item()  # ... covering at most a third of it
    for other in (tf(x, 2, 6), tf(x, 3, 5), DeviceTransform("cpu", reprob=1.0, seed=3, rank=1)(x, 2, 5)):
        assert not torch.equal(a, other)
    assert torch.equal(tf(x), clean)  # no batch index (evaluation): no erasing
    with pytest.raises(ValueError, match="epoch"):
        tf(x, None, 5)


@pytest.mark.parametrize("mode, count", [("pixel", 1), ("pixel", 3), ("rand", 2), ("const", 1)])
def test_device_erasing_is_timms_random_erasing_under_the_batch_seed(mode, count):
    # the boxes from a private random.Random, the noise from a private generator, one masked write per
    # box slot: the same batches as timm's RandomErasing box by box on the seeded global generators
    x = torch.randn(16, 3, 24, 20)
    key = (0x45524153, 7, 1, 3, 9)
    with seeded_rng(*key):
        expected = RandomErasing(0.6, mode=mode, max_count=count, device="cpu")(x.clone())
    got = SeededErasing(0.6, mode=mode, max_count=count)(x.clone(), *key)
    assert torch.equal(got, expected) and (got != x).flatten(1).any(1).sum() >= 6


def test_prefetch_indices_limit_and_resumed_erasing(tiny_shapes):
    batches = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(6)]
    seen = []
    out = list(prefetch(batches, "cpu", lambda x, i: seen.append(i) or x + 100, start=3, limit=4))
    assert seen == [3, 4, 5, 6] and len(out) == 4
    assert [int(y[0]) for _, y in out] == [0, 1, 2, 3] and out[1][0][0, 0].item() == 101.0
    assert [x[0, 0].item() for x, _ in prefetch(batches, "cpu")] == [float(i) for i in range(6)]

    # erasing in a run resumed at batch 2 of epoch 1 equals the uninterrupted run's from batch 2 on
    tf = DeviceTransform("cpu", reprob=0.5, seed=4)
    full = _collect(prefetch(_loaders(tiny_shapes, uint8=True)[0], "cpu", lambda x, i: tf(x, 1, i)))
    resumed = _collect(
        prefetch(_loaders(tiny_shapes, uint8=True, start=2)[0], "cpu", lambda x, i: tf(x, 1, i), start=2)
    )
    assert len(full) == 8 and len(resumed) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], resumed))
    plain = _collect(prefetch(_loaders(tiny_shapes, uint8=True)[0], "cpu", lambda x, i: tf(x)))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, plain))  # erasing did happen


def _undecoded_batches(read: list, count: int = 100):
    """Stand-ins for batches the device decodes (they take the feeder thread on CPU too); `read` logs them."""
    for i in range(count):
        read.append(i)
        yield Undecoded([b""], torch.zeros(1, 9), torch.zeros(1, 0), ["f"]), torch.tensor([i])


def _feeders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(FEEDER)]


def test_the_feeder_raises_a_batchs_error_in_the_loop_and_stops_when_the_loop_stops():
    def transform(images, i):
        if i == 2:
            raise DataError("cannot decode image f (bad data); delete or replace it")
        return torch.full((1,), float(i))

    got, read = [], []
    with pytest.raises(DataError, match=r"^cannot decode image f \(bad data\)"):
        for images, _ in prefetch(_undecoded_batches(read), "cpu", transform):
            got.append(images.item())
    assert got == [0.0, 1.0] and read == [0, 1, 2, 3] and not _feeders()  # the loop reads one batch ahead
    # a loop that stops early stops the feeder, which finishes the batch it is on
    read.clear()
    batches = prefetch(_undecoded_batches(read), "cpu", lambda images, i: torch.zeros(1))
    next(batches)
    batches.close()
    assert not _feeders() and len(read) <= 3


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _flat(optimizer_state):
    return [t for i in sorted(optimizer_state) for _, t in sorted(optimizer_state[i].items())]


def test_training_through_the_device_path_resumes_bitwise(tiny_shapes, tmp_path, caplog):
    """CPU, uint8 workers, normalisation + random erasing + mixup/cutmix in the main process, gradient
    accumulation: a run resumed from a mid-epoch checkpoint ends bitwise where the uninterrupted run ends."""
    overrides = [
        *MICRO_OVERRIDES,
        "data.batch_size=16",
        "train.accumulation_steps=2",
        "train.epochs=2",
        "aug.reprob=0.5",
        "aug.mixup=0.8",
        "aug.cutmix=1.0",
        "aug.auto_augment=rand-m9-mstd0.5-inc1",
        "train.checkpoint_every_steps=5",
        "train.keep_checkpoints=10",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    caplog.set_level(logging.INFO, logger="swin_train")  # the level; the text is read from each run's log.txt
    train(load_config(None, overrides, data_path=str(tiny_shapes), output=str(ref)), device="cpu")
    assert "images normalised on the device" in (ref / "log.txt").read_text()  # the default on CPU too
    # 128 images / 16 per batch / 2 micro-batches = 4 steps per epoch: step 5 is mid-epoch 1, and what a
    # run killed after writing it leaves behind
    state = torch.load(ref / "step-000000005.pth", weights_only=True)["train_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    run.mkdir()
    shutil.copy(ref / "step-000000005.pth", run / "step-000000005.pth")
    train(load_config(None, overrides, data_path=str(tiny_shapes), output=str(run)), device="cpu")
    assert (
        f"resuming from {run / 'step-000000005.pth'}: epoch 2, step 1 of 4" in (run / "log.txt").read_text()
    )

    assert_bitwise_equal(weights(ref / "last.pth"), weights(run / "last.pth"))
    a, b = (torch.load(d / "last.pth", weights_only=True) for d in (ref, run))
    assert a["train_state"] == b["train_state"] and a["train_state"]["global_step"] == 8
    assert all(
        torch.equal(x, y) for x, y in zip(_flat(a["optimizer"]["state"]), _flat(b["optimizer"]["state"]))
    )
    timing = ("train_img_s", "train_epoch_time")
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert strip(_records(ref)[-1]) == strip(_records(run)[-1])


def test_device_path_without_erasing_trains_as_the_worker_path(tiny_shapes, tmp_path):
    """With erasing off the two pipelines feed the model the same floats: one epoch with RandAugment and
    mixup/cutmix, validation included, gives bitwise the same weights and metrics either way."""
    overrides = [
        *MICRO_OVERRIDES,
        "data.batch_size=16",
        "train.epochs=1",
        "aug.mixup=0.8",
        "aug.cutmix=1.0",
        "aug.auto_augment=rand-m9-mstd0.5-inc1",
        "data.num_workers=1",
    ]
    for pipeline in (False, True):
        cfg = load_config(None, overrides, data_path=str(tiny_shapes), output=str(tmp_path / str(pipeline)))
        train(cfg, device="cpu", device_pipeline=pipeline)
    workers, device = tmp_path / "False", tmp_path / "True"
    assert_bitwise_equal(weights(workers / "last.pth"), weights(device / "last.pth"))
    timing = ("train_img_s", "train_epoch_time")
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert strip(_records(workers)[0]) == strip(_records(device)[0])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_prefetch_matches_cpu_and_survives_a_slow_consumer():
    """Side-stream copies, events and record_stream: batches handed out while the consumer stream is
    still busy (a sleep kernel) hold their values; normalisation and constant-mode erasing (its boxes come
    from python's RNG) are bitwise the CPU's."""
    host = [
        (torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8).pin_memory(), torch.arange(4) + i)
        for i in range(12)
    ]
    cpu_tf = DeviceTransform("cpu", reprob=0.5, remode="const", seed=1)
    cuda_tf = DeviceTransform("cuda", reprob=0.5, remode="const", seed=1)
    expected = [(cpu_tf(x, 0, i), y) for i, (x, y) in enumerate(host)]
    got = []
    for x, y in prefetch(host, "cuda", lambda x, i: cuda_tf(x, 0, i)):
        torch.cuda._sleep(10_000_000)  # keep the consumer stream busy while the next copy runs
        got.append((x * 1, y * 1))  # computed on the consumer stream after the sleep
        # x, y are released (here, and by the prefetcher at the next batch) while the sleep is still
        # queued: without record_stream the next copy could overwrite them before `x * 1` reads them
    torch.cuda.synchronize()
    assert len(got) == len(expected)
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())
    # pixel-mode noise comes from the CUDA generator: seeded per batch, and the global state is kept
    noisy, images = DeviceTransform("cuda", reprob=1.0, seed=1), host[0][0].cuda()
    cuda_rng = torch.cuda.get_rng_state()
    a, b, c = noisy(images, 0, 0), noisy(images, 0, 0), noisy(images, 0, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
