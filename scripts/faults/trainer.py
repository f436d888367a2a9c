"""What the campaign knows of swin-train: the command every attempt runs (a micro recipe on a generated
shapes set), the lines the trainer logs, and how its saves name their temp files."""

from __future__ import annotations

import re
import sys
from pathlib import Path

# A micro Swin on 32 px shapes with the official augmentation (RandAugment, random erasing, Mixup/CutMix,
# label smoothing), stochastic depth and EMA, so that every random stream and every piece of state that a
# resume must restore is exercised. One line per step (print_freq=1): the campaign follows progress there.
RECIPE = [
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depths=[2,2]",
    "model.num_heads=[2,4]",
    "model.window_size=4",
    "model.num_classes=8",
    "model.drop_path_rate=0.1",
    "data.img_size=32",
    "data.dataset=imagefolder",
    "data.batch_size=16",
    "eval.crop_pct=1.0",
    "amp=none",
    "train.base_lr=2e-3",
    "train.warmup_lr=1e-5",
    "train.min_lr=1e-5",
    "train.lr_base_batch=32",
    "train.ema=true",
    "train.ema_decay=0.9",
    "print_freq=1",
]
SHAPES_PER_CLASS = {"train_per_class": 16, "val_per_class": 4}  # 8 steps per epoch at batch 16

# What the trainer logs (swin_train.trainer, swin_train.run) and how its saves name temp files.
STEP_LINE = re.compile(r"epoch (\d+) step (\d+)/(\d+): ")
RESUME_LINE = re.compile(r"resuming from .*: epoch (\d+), step (\d+) of (\d+) \(global step (\d+)\)")
STEPS_PER_EPOCH_LINE = re.compile(r"; (\d+) steps per epoch;")
READY_LINE = "effective lr: "  # logged right before metrics are opened and training starts
STOP_LINE = "stop requested (SIGTERM)"
DONE_LINE = "done: top-1"
TEMP_NAME = re.compile(r"^\..+\.tmp-")


def train_command(data_path: Path, out: Path, *, epochs: int, every: int, workers: int) -> list[str]:
    warmup_epochs = min(1, epochs - 1)  # the schedule needs warmup < total
    return [
        sys.executable,
        "-m",
        "swin_train.cli.train",
        "--device",
        "cpu",
        "--data-path",
        str(data_path),
        "--output",
        str(out),
        *RECIPE,
        f"train.epochs={epochs}",
        f"train.warmup_epochs={warmup_epochs}",
        f"train.checkpoint_every_steps={every}",
        f"data.num_workers={workers}",
    ]


def ensure_data(root: Path) -> Path:
    from swin_train.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(root, img_size=32, seed=0, **SHAPES_PER_CLASS)
