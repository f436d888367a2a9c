"""The training recipe, written once (Recipe), and its translation for each trainer: swin-train's config and
command, timm train.py's flags (the mapping, setting by setting, is in scripts/benchmark_trainer.py's
docstring), and the environment both run in."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from swin_train.errors import ConfigError

TRAINERS = ("swin", "timm")


@dataclass(frozen=True)
class Recipe:
    """One training recipe, expressed once and translated for each trainer (see the module docstring)."""

    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12)
    patch_size: int = 2
    window_size: int = 4
    img_size: int = 32
    num_classes: int = 10
    drop_path: float = 0.1
    batch_size: int = 64
    workers: int = 1
    epochs: int = 10
    warmup_epochs: int = 1
    lr: float = 2e-3
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = 0.5
    seed: int = 0
    log_interval: int = 50

    def check(self) -> None:
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(
                f"--epochs {self.epochs} with {self.warmup_epochs} warmup epochs: need epochs >= 1 and "
                "warmup epochs < epochs (timm's --warmup-prefix schedule decays over the rest)"
            )
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError(
                f"--batch-size must be >= 1 and --workers >= 0, got {self.batch_size}, {self.workers}"
            )


def swin_config(recipe: Recipe, data_dir: Path, output: Path) -> dict:
    """The swin-train YAML config (as a dict) for `recipe`."""
    r = recipe
    return {
        "model": {
            "patch_size": r.patch_size,
            "in_chans": 3,
            "embed_dim": r.embed_dim,
            "depths": list(r.depths),
            "num_heads": list(r.num_heads),
            "window_size": r.window_size,
            "drop_path_rate": r.drop_path,
            "num_classes": r.num_classes,
        },
        "data": {
            "dataset": "imagefolder",
            "data_path": str(data_dir),
            "img_size": r.img_size,
            "batch_size": r.batch_size,
            "num_workers": r.workers,
            "interpolation": "bicubic",
        },
        "train": {
            "epochs": r.epochs,
            "warmup_epochs": r.warmup_epochs,
            "base_lr": r.lr,
            "warmup_lr": r.warmup_lr,
            "min_lr": r.min_lr,
            "lr_base_batch": r.batch_size,
            "weight_decay": r.weight_decay,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "clip_grad": r.clip_grad,
        },
        "aug": {
            "auto_augment": None,
            "color_jitter": 0.0,
            "reprob": 0.0,
            "hflip": r.hflip,
            "crop_scale": list(r.crop_scale),
            "mixup": 0.0,
            "cutmix": 0.0,
            "label_smoothing": r.smoothing,
        },
        "eval": {"crop_pct": 1.0},
        "amp": "none",
        "seed": r.seed,
        "output": str(output),
        "save_freq": 1,
        "print_freq": r.log_interval,
    }


def swin_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "swin_train.cli.train", "--config", str(config_path), "--device", "cpu"]


def timm_command(
    recipe: Recipe, timm_train: Path, data_dir: Path, output: Path, experiment: str
) -> list[str]:
    """timm's train.py command line for `recipe` (flag by flag as in scripts/benchmark_trainer.py's docstring)."""
    r = recipe
    flags = [
        ("--data-dir", str(data_dir)),
        ("--train-split", "train"),
        ("--val-split", "val"),
        *_timm_model(r),
        ("--device", "cpu"),
        ("--batch-size", str(r.batch_size)),
        ("--workers", str(r.workers)),
        *_timm_optimizer(r),
        *_timm_schedule(r),
        ("--clip-grad", str(r.clip_grad)),
        ("--smoothing", str(r.smoothing)),
        *_timm_augmentation(r),
        ("--seed", str(r.seed)),
        ("--log-interval", str(r.log_interval)),
        ("--output", str(output)),
        ("--experiment", experiment),
    ]
    return [sys.executable, str(timm_train)] + [arg for flag in flags for arg in flag]


Flags = list[tuple[str, ...]]  # a flag and its values, in order


def _timm_model(r: Recipe) -> Flags:
    """timm's Swin-T entry point with the recipe's micro architecture as model kwargs."""
    tup = lambda values: "(" + ",".join(str(v) for v in values) + ")"
    kwargs = (
        f"embed_dim={r.embed_dim}",
        f"depths={tup(r.depths)}",
        f"num_heads={tup(r.num_heads)}",
        f"patch_size={r.patch_size}",
        f"window_size={r.window_size}",
        f"img_size={r.img_size}",
    )
    return [
        ("--model", "swin_tiny_patch4_window7_224"),
        ("--model-kwargs", *kwargs),
        ("--num-classes", str(r.num_classes)),
        ("--input-size", "3", str(r.img_size), str(r.img_size)),
        ("--drop-path", str(r.drop_path)),
    ]


def _timm_optimizer(r: Recipe) -> Flags:
    return [
        ("--opt", "adamw"),
        ("--opt-betas", "0.9", "0.999"),
        ("--opt-eps", "1e-8"),
        ("--weight-decay", str(r.weight_decay)),
        ("--lr", str(r.lr)),
    ]


def _timm_schedule(r: Recipe) -> Flags:
    """With --warmup-prefix timm adds the warmup epochs to --epochs and decays over the rest, which is
    swin-train's schedule."""
    return [
        ("--sched", "cosine"),
        ("--sched-on-updates",),
        ("--epochs", str(r.epochs - r.warmup_epochs)),
        ("--warmup-epochs", str(r.warmup_epochs)),
        ("--warmup-prefix",),
        ("--warmup-lr", str(r.warmup_lr)),
        ("--min-lr", str(r.min_lr)),
    ]


def _timm_augmentation(r: Recipe) -> Flags:
    """The random-resized crop and flip, the plain eval resize, and everything else off."""
    return [
        ("--scale", str(r.crop_scale[0]), str(r.crop_scale[1])),
        ("--hflip", str(r.hflip)),
        ("--train-interpolation", "bicubic"),
        ("--interpolation", "bicubic"),
        ("--crop-pct", "1.0"),
        ("--color-jitter", "0"),
        ("--reprob", "0"),
        ("--mixup", "0"),
        ("--cutmix", "0"),
    ]


def trainer_env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The same environment for both trainers: unbuffered output and, when given, the thread count."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env
