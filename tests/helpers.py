"""Shared test utilities: tiny data sets and running the CLIs in a subprocess."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def script_parts(package: str, *modules: str) -> SimpleNamespace:
    """The modules of a script's package under scripts/ (scripts/gpucheck/running.py: `parts.running`),
    importable once the script, loaded by path, has put scripts/ on sys.path."""
    return SimpleNamespace(**{name: importlib.import_module(f"{package}.{name}") for name in modules})
