"""Shared test utilities: tiny data sets and running the CLIs in a subprocess."""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

# A micro Swin for the shapes set (8 classes, 32 px): 8x8 tokens, windows of 4, two stages.
MICRO_OVERRIDES = [
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depths=[2,2]",
    "model.num_heads=[2,4]",
    "model.window_size=4",
    "model.num_classes=8",
    "model.drop_path_rate=0.1",
    "data.img_size=32",
    "data.dataset=imagefolder",
    "aug.auto_augment=null",
    "aug.reprob=0",
    "aug.mixup=0",
    "aug.cutmix=0",
    "aug.color_jitter=0",
    "aug.crop_scale=[0.5,1.0]",
    "eval.crop_pct=1.0",
    "amp=none",
    "train.base_lr=2e-3",
    "train.warmup_lr=1e-5",
    "train.min_lr=1e-5",
    "train.lr_base_batch=32",
    "train.warmup_epochs=0",
    "data.num_workers=0",
    "print_freq=5",
]


def env_for_subprocess(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_cli(
    module: str, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m swin_train.cli.<module> args...` in a subprocess, output captured."""
    cmd = [sys.executable, "-m", f"swin_train.cli.{module}", *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env or env_for_subprocess()
    )


def torchrun_command(nproc: int, module: str, *args: str, extra: tuple[str, ...] = ()) -> list[str]:
    """`torchrun --standalone` of `swin_train.cli.<module>` on `nproc` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        *extra,
        "-m",
        f"swin_train.cli.{module}",
        *map(str, args),
    ]


def torchrun(nproc: int, module: str, *args: str, timeout: float = 300, extra: tuple[str, ...] = ()):
    cmd = torchrun_command(nproc, module, *args, extra=extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env_for_subprocess())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def png(path: Path, seed: int, size: int = 32) -> None:
    """A random RGB PNG at `path` (folders created)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, classes=("cat", "dog"), train: int = 8, val: int = 4) -> Path:
    """`root/{train,val}/<class>/<i>.png`: random 32 px images, different in every split and class."""
    for c, name in enumerate(classes):
        for i in range(train):
            png(root / "train" / name / f"{i}.png", 100 * c + i)
        for i in range(val):
            png(root / "val" / name / f"{i}.png", 1000 + 100 * c + i)
    return root


def two_class_train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """swin-train arguments: the micro model for 2 classes, batch 4, 1 epoch, on the CPU."""
    micro = [o for o in MICRO_OVERRIDES if not o.startswith("model.num_classes")]
    return [
        "--data-path",
        str(data),
        "--output",
        str(out),
        *micro,
        "model.num_classes=2",
        "data.batch_size=4",
        "train.epochs=1",
        "--device",
        "cpu",
        *extra,
    ]


def load_module(name: str, path: str | os.PathLike):
    """The Python file at `path` (a script, which is no package module) imported as module `name`; registered in
    sys.modules before it runs, since dataclasses look their module up while the file executes."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def script_parts(package: str, *modules: str) -> SimpleNamespace:
    """The modules of a script's package under scripts/ (scripts/gpucheck/running.py: `parts.running`),
    importable once the script, loaded by path, has put scripts/ on sys.path."""
    return SimpleNamespace(**{name: importlib.import_module(f"{package}.{name}") for name in modules})


def photo_jpegs(count: int, seed: int) -> list[bytes]:
    """`count` JPEGs cut from scikit-image's photographs as the loader benchmark cuts them (scripts/bench/
    photos.py: shorter side 300-500 px, quality 75-95, grain), deterministic from `seed`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench.photos import SOURCES, cut_photo, load_sources

    sources = load_sources()
    out = []
    for i in range(count):
        image, quality = cut_photo(sources[SOURCES[i % len(SOURCES)]], np.random.default_rng([seed, i]), True)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def photo_folder(root: Path, photos: list[bytes]) -> Path:
    """An ImageFolder root of JPEG bytes: each photo in train/ and val/, classes 'a' and 'b' alternating."""
    for i, data in enumerate(photos):
        for split in ("train", "val"):
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}.jpg").write_bytes(data)
    return root


def epoch_batches(dataset, workers: int, *, device_transform=None, epoch: int = 1, start: int = 0) -> list:
    """One epoch's image batches of `dataset` (batch 2, the resumable sampler, seed 5) from batch `start` on,
    through `device_transform(images, epoch, batch)` when given."""
    from swin_train.data.loader import build_loader
    from swin_train.data.samplers import ResumableTrainSampler

    sampler = ResumableTrainSampler(len(dataset), num_replicas=1, rank=0, seed=5)
    loader = build_loader(dataset, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True)
    sampler.set_epoch(epoch)
    sampler.set_start(start, 2)
    if device_transform is None:
        return [images.clone() for images, _ in loader]
    return [device_transform(images, epoch, i) for i, (images, _) in enumerate(loader, start)]


def repeatable_epoch_batches(dataset, *, device_transform=None) -> list:
    """Epoch 1's three batches of `dataset` (see epoch_batches), asserted the same with 0 and 2 workers and,
    from a resume at batch 1, the same rest of the epoch."""
    whole = epoch_batches(dataset, 0, device_transform=device_transform)
    again = epoch_batches(dataset, 2, device_transform=device_transform)
    assert len(whole) == 3 and all(torch.equal(a, b) for a, b in zip(whole, again))
    resumed = epoch_batches(dataset, 1, device_transform=device_transform, start=1)
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(whole[1:], resumed))
    return whole


def shard_epoch_batches(folder: Path, shards: Path, transform, start: int, device_transform=None) -> list:
    """Epoch 1's image batches (2 workers, batch 2) from `start` on, of `folder` packed 2 images a shard into
    `shards` (once), through `device_transform(images, epoch, batch)` when given."""
    from swin_train.data import shards as S
    from swin_train.data.pack import PackOptions, pack

    if not shards.exists():
        pack(folder, shards, PackOptions(shard_size=2), progress=False)
    ds = S.ShardTrainDataset(
        S.resolve_split(str(shards), "train"), transform, batch_size=2, num_workers=2, seed=3
    )
    ds.set_epoch(1)
    ds.set_start(start, 2)
    loader = S.build_shard_loader(ds, batch_size=2, num_workers=2, pin_memory=False, drop_last=True)
    if device_transform is None:
        return [images.clone() for images, _ in loader]
    return [device_transform(images, 1, i) for i, (images, _) in enumerate(loader, start)]
