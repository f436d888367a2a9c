"""Whole training runs: swin-train against timm's own train.py, same recipe, alternating A B A B.

Each run is a fresh subprocess (`python -m swin_train.cli.train --config RUN/swin.yaml`, then
`python TIMM_TRAIN ...`) with the same environment and thread settings. Measured per run: wall time,
CPU time (user + system of the trainer and its data workers, from `os.wait4`), peak memory (the largest
sum of PSS over the process tree, sampled from /proc, and the largest single-process RSS), end-to-end
img/s (epochs x train images / wall time) and the best val top-1 (timm: `summary.csv`; swin-train:
`metrics.jsonl`). The speed ratio is timm wall / swin-train wall per pair and its median is reported
(> 1: swin-train is faster), so slow drifts of a shared machine cancel.

    git --git-dir=/path/to/pytorch-image-models/.git show HEAD:train.py > /tmp/timm_train.py
    python scripts/benchmark_trainer.py --timm-train /tmp/timm_train.py            # 3 pairs, default recipe
    python scripts/benchmark_trainer.py --timm-train /tmp/timm_train.py --pairs 1 --epochs 2 --json

Without `--data` the script generates its own set into `--work-dir`/data (once): 10 classes of 32 px
images (5 shapes x solid or striped fill, in random colours, brightness, size and position, on a noisy
background with a brightness ramp), 1,300 train / 497 val images as PNG ImageFolders. Colour says nothing
about the class: it is a shape *and* a texture, which the default recipe learns to well below 100%.

The recipe and how each setting maps onto both trainers (swin-train key / timm train.py flag):

    model       micro Swin: embed 48, depths 2-2-2, heads 3-6-12, patch 2, window 4, img 32, 10 classes
                model.embed_dim ... / --model swin_tiny_patch4_window7_224 --model-kwargs embed_dim=48
                depths='(2,2,2)' num_heads='(3,6,12)' patch_size=2 window_size=4 img_size=32
                --num-classes 10 --input-size 3 32 32
    drop path   0.1: model.drop_path_rate / --drop-path
    precision   fp32 on CPU: amp=none, --device cpu / --device cpu (no --amp)
    batch       64, drop_last: data.batch_size / --batch-size (timm drops the last train batch too)
    workers     1: data.num_workers / --workers (both keep workers alive across epochs)
    optimizer   AdamW, betas 0.9/0.999, eps 1e-8, weight decay 0.05 (not on norms, biases, position
                bias tables): train.weight_decay / --opt adamw --weight-decay 0.05 (timm's
                create_optimizer_v2 skips the same parameters)
    lr          2e-3 at batch 64, unscaled: train.base_lr with train.lr_base_batch = batch size /
                --lr (an absolute lr, so timm's --lr-base scaling does not apply)
    schedule    1 warmup epoch from 1e-5 then cosine to 1e-5, stepped per optimizer step, over `epochs`
                in total: train.warmup_epochs, train.warmup_lr, train.min_lr / --sched cosine
                --sched-on-updates --warmup-epochs 1 --warmup-prefix --epochs (epochs - warmup)
                --warmup-lr --min-lr (with --warmup-prefix timm adds the warmup epochs to --epochs and
                decays over the rest, which is swin-train's schedule)
    clipping    gradient norm 5.0: train.clip_grad / --clip-grad 5.0
    loss        label smoothing 0.1: aug.label_smoothing / --smoothing 0.1
    crop        random-resized crop, scale 0.6-1, ratio 3/4-4/3, bicubic, hflip 0.5: aug.crop_scale,
                data.interpolation / --scale 0.6 1 --train-interpolation bicubic --hflip 0.5
    off         no RandAugment, colour jitter, erasing, mixup, cutmix: aug.auto_augment=null,
                aug.color_jitter=0, aug.reprob=0, aug.mixup=0, aug.cutmix=0 / no --aa,
                --color-jitter 0, --reprob 0, --mixup 0 --cutmix 0
    eval        every epoch, plain 32 px resize (crop pct 1), bicubic, batch 64: eval.crop_pct=1.0 /
                --crop-pct 1.0 --interpolation bicubic --val-split val
    seed        0: seed / --seed 0
    checkpoint  every epoch end: save_freq=1 (last.pth, best.pth, fsynced) / timm's CheckpointSaver
                (last.pth.tar and checkpoint-N.pth.tar every epoch, model_best.pth.tar)
    logging     a line every 50 steps: print_freq / --log-interval 50

Both normalise in the main process (uint8 batches from the workers). Differences that stay: swin-train runs
each CPU batch as parts on threads (train.cpu_split, its default; timm's train.py has no such setting) and
seeds every sample's augmentation for bitwise resume; the models are initialised from different random
streams.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from swin_train.errors import ConfigError, DataError, SwinTrainError

TRAINERS = ("swin", "timm")
SHAPES = ("circle", "square", "triangle", "cross", "star")
FILLS = ("solid", "striped")
DATA_VERSION = 2  # bump when the drawing changes: a generated set with another version is redrawn
# Difficulty of the generated set (sizes as fractions of the image side, colours in 0..255). Set so that the
# default recipe's micro Swin learns it in its 200 steps without reaching 100%: smaller shapes, more
# position jitter, tilt or distractors left it near chance after 10 epochs.
CONTRAST = (90.0, 160.0)  # the shape is brighter than the background by this much
RADIUS = (0.35, 0.42)
JITTER = 0.06  # largest offset of the shape's centre from the image centre
GRADIENT = 12.0  # background brightness ramp, at most +-this
NOISE_STD = (2.0, 5.0)  # per-image range of the per-pixel noise


# ---------------------------------------------------------------------------------------------- recipe


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
    """timm's train.py command line for `recipe` (flag by flag as in the module docstring)."""
    r = recipe
    tup = lambda values: "(" + ",".join(str(v) for v in values) + ")"
    return [
        sys.executable,
        str(timm_train),
        "--data-dir",
        str(data_dir),
        "--train-split",
        "train",
        "--val-split",
        "val",
        "--model",
        "swin_tiny_patch4_window7_224",
        "--model-kwargs",
        f"embed_dim={r.embed_dim}",
        f"depths={tup(r.depths)}",
        f"num_heads={tup(r.num_heads)}",
        f"patch_size={r.patch_size}",
        f"window_size={r.window_size}",
        f"img_size={r.img_size}",
        "--num-classes",
        str(r.num_classes),
        "--input-size",
        "3",
        str(r.img_size),
        str(r.img_size),
        "--drop-path",
        str(r.drop_path),
        "--device",
        "cpu",
        "--batch-size",
        str(r.batch_size),
        "--workers",
        str(r.workers),
        "--opt",
        "adamw",
        "--opt-betas",
        "0.9",
        "0.999",
        "--opt-eps",
        "1e-8",
        "--weight-decay",
        str(r.weight_decay),
        "--lr",
        str(r.lr),
        "--sched",
        "cosine",
        "--sched-on-updates",
        "--epochs",
        str(r.epochs - r.warmup_epochs),
        "--warmup-epochs",
        str(r.warmup_epochs),
        "--warmup-prefix",
        "--warmup-lr",
        str(r.warmup_lr),
        "--min-lr",
        str(r.min_lr),
        "--clip-grad",
        str(r.clip_grad),
        "--smoothing",
        str(r.smoothing),
        "--scale",
        str(r.crop_scale[0]),
        str(r.crop_scale[1]),
        "--hflip",
        str(r.hflip),
        "--train-interpolation",
        "bicubic",
        "--interpolation",
        "bicubic",
        "--crop-pct",
        "1.0",
        "--color-jitter",
        "0",
        "--reprob",
        "0",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--seed",
        str(r.seed),
        "--log-interval",
        str(r.log_interval),
        "--output",
        str(output),
        "--experiment",
        experiment,
    ]


def trainer_env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The same environment for both trainers: unbuffered output and, when given, the thread count."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------- data


def split_counts(total: int, num_classes: int) -> list[int]:
    """`total` images over `num_classes` classes as evenly as possible, the first classes one more."""
    base, extra = divmod(total, num_classes)
    return [base + (1 if i < extra else 0) for i in range(num_classes)]


def class_names() -> list[str]:
    return [f"{shape}_{fill}" for shape in SHAPES for fill in FILLS]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Corners of an axis-aligned `shape` of half-extent about `r` centred at (cx, cy); y grows downwards."""

    def ring(radii: list[float], angle0: float) -> list[tuple[float, float]]:
        n = len(radii)
        return [
            (cx + q * math.cos(angle0 + 2 * math.pi * k / n), cy + q * math.sin(angle0 + 2 * math.pi * k / n))
            for k, q in enumerate(radii)
        ]

    if shape == "square":
        return ring([r * 1.1] * 4, math.pi / 4)
    if shape == "triangle":
        return ring([r * 1.15] * 3, -math.pi / 2)
    if shape == "star":
        return ring([r * 1.1, 0.45 * r] * 5, -math.pi / 2)
    if shape == "cross":  # the 12 corners of a plus sign
        a, b = r, 0.32 * r
        corners = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        return [(cx + x, cy + y) for x, y in corners]
    raise ValueError(f"unknown shape '{shape}'")


def draw_sample(class_id: int, img_size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `class_id` (shape x fill); every random choice comes from `rng`."""
    shape, fill = SHAPES[class_id // len(FILLS)], FILLS[class_id % len(FILLS)]
    ss = 4  # drawn at 4x and box-filtered down: anti-aliased edges
    size = img_size * ss
    # The shape is always the brighter part (a fixed polarity keeps "which pixels are the shape" a linear
    # question, learnable by a micro model in a few hundred steps); colours and contrast vary.
    bg = rng.uniform(0, 160, 3)
    fg = np.clip(bg + CONTRAST[0] + rng.uniform(0, CONTRAST[1] - CONTRAST[0]) + rng.normal(0, 20, 3), 0, 255)
    r = rng.uniform(*RADIUS) * size
    margin = size / 2 - 1.15 * r
    cx, cy = size / 2 + rng.uniform(-1, 1, 2) * min(JITTER * size, margin)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    alpha = np.asarray(mask.resize((img_size, img_size), Image.Resampling.BOX), dtype=np.float32) / 255
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float32)
    if fill == "striped":  # stripes of fg and a colour halfway to the background, random period and angle
        period, angle = rng.uniform(3.0, 5.0), rng.uniform(0, math.pi)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 1)
        alpha = alpha * (0.5 + 0.5 * (np.sin(2 * math.pi * phase) > 0))
    gx, gy = rng.uniform(-GRADIENT, GRADIENT, 2)  # background: a random brightness ramp
    pixels = bg + ((xx / img_size - 0.5) * gx + (yy / img_size - 0.5) * gy)[..., None]
    pixels = pixels * (1 - alpha[..., None]) + fg * alpha[..., None]
    pixels = pixels + rng.normal(0, rng.uniform(*NOISE_STD), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def ensure_dataset(
    root: Path, *, train: int = 1300, val: int = 497, img_size: int = 32, seed: int = 0
) -> Path:
    """`root/{train,val}/<class>/*.png`, generated once; `root/meta.json` (written last) marks it complete."""
    meta = {
        "generator": "benchmark_trainer",
        "version": DATA_VERSION,
        "train": train,
        "val": val,
        "img_size": img_size,
        "seed": seed,
        "classes": class_names(),
    }
    try:
        if json.loads((root / "meta.json").read_text()) == meta:
            return root
    except (OSError, ValueError):
        pass
    if root.exists() and any(root.iterdir()) and not (root / "meta.json").exists():
        raise DataError(f"{root} exists and is not a set generated by this script; choose another --work-dir")
    names = class_names()
    try:
        shutil.rmtree(root, ignore_errors=True)
        for split_id, (split, total) in enumerate((("train", train), ("val", val))):
            for class_id, count in enumerate(split_counts(total, len(names))):
                folder = root / split / names[class_id]
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    rng = np.random.default_rng([seed, DATA_VERSION, split_id, class_id, i])
                    draw_sample(class_id, img_size, rng).save(folder / f"{i:04d}.png")
        (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as e:
        raise DataError(
            f"cannot write the benchmark data set to {root} ({e}); use a writable --work-dir"
        ) from None
    return root


def count_images(split_dir: Path) -> int:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist; --data needs train/<class>/ and val/<class>/ folders")
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
    return sum(1 for p in split_dir.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class Measurement:
    """What one trainer subprocess cost."""

    exit_code: int
    wall_s: float
    cpu_s: float  # user + system of the process and its reaped children (data workers)
    peak_tree_pss_mib: float | None  # largest sampled sum of PSS over the process tree; None: not sampled
    peak_rss_mib: float  # largest RSS of any single process in the tree (kernel's maxrss)
    timed_out: bool = False


def _descendants(pid: int) -> list[int]:
    """`pid` and every descendant, via /proc/<pid>/task/<tid>/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def _pss_kib(pid: int) -> int:
    """Proportional set size of `pid` (shared pages split between their users); RSS where PSS is missing."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemorySampler(threading.Thread):
    """Samples the summed PSS of a process tree every `interval` seconds and keeps the peak (KiB).

    Reading PSS walks the page tables of every process in the tree, CPU time taken from the machine the
    trainer runs on, so the interval is long: the trainers' memory plateaus early and stays."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _descendants(self.pid)))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict,
    cwd: Path,
    log_path: Path,
    timeout: float | None = None,
    memory_interval: float = 5.0,
) -> Measurement:
    """Run `cmd` to completion (output to `log_path`) and measure it; a run past `timeout` is killed.
    `memory_interval`: seconds between samples of the tree's PSS (0: not sampled)."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        sampler = TreeMemorySampler(proc.pid, memory_interval) if memory_interval > 0 else None
        if sampler:
            sampler.start()
        expired = threading.Event()

        def kill_group() -> None:
            expired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill_group) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's rusage includes its reaped workers
        finally:
            if timer:
                timer.cancel()
            if sampler:
                sampler.stop()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return Measurement(
        exit_code=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_tree_pss_mib=sampler.peak_kib / 1024 if sampler else None,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        timed_out=expired.is_set(),
    )


# ------------------------------------------------------------------------------------------------ results


def read_timm_summary(path: Path) -> list[dict]:
    """timm's summary.csv rows as {epoch, train_loss, eval_loss, top1, top5} with top-1/top-5 as fractions."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"cannot read timm's summary {path} ({e.strerror or e}); see the run's log") from None
    try:
        return [
            {
                "epoch": int(r["epoch"]),
                "train_loss": float(r["train_loss"]),
                "eval_loss": float(r["eval_loss"]),
                "top1": float(r["eval_top1"]) / 100,
                "top5": float(r["eval_top5"]) / 100,
            }
            for r in rows
        ]
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} is not a timm summary.csv with eval_top1/eval_top5 columns ({e})") from None


def read_swin_metrics(path: Path) -> list[dict]:
    """swin-train's metrics.jsonl records as {epoch, train_loss, eval_loss, top1, top5, train_img_s}."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(
            f"cannot read swin-train's metrics {path} ({e.strerror or e}); see the run's log"
        ) from None
    try:
        records = [json.loads(line) for line in lines]
        return [
            {
                "epoch": int(r["epoch"]),
                "train_loss": float(r["train_loss"]),
                "eval_loss": float(r["val_loss"]),
                "top1": float(r["val_top1"]),
                "top5": float(r["val_top5"]),
                "train_img_s": float(r["train_img_s"]),
            }
            for r in records
        ]
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a swin-train metrics.jsonl ({type(e).__name__}: {e})") from None


_TIMM_TRAIN_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?\(\s*[\d.]+s,\s*([\d.]+)/s\)")


def timm_train_img_s(log_text: str) -> list[float]:
    """Per epoch, the running-average train img/s of the epoch's last 'Train:' log line of timm."""
    last: dict[int, float] = {}
    for m in _TIMM_TRAIN_LINE.finditer(log_text):
        last[int(m.group(1))] = float(m.group(4))
    return [last[e] for e in sorted(last)]


@dataclass
class RunResult:
    trainer: str
    pair: int
    measurement: Measurement
    epochs: list[dict] = field(default_factory=list)
    images_per_second: float = 0.0  # epochs x train images (full batches) / wall time
    train_img_s: float = float("nan")  # the trainer's own mean train-loop img/s over the epochs
    best_top1: float = float("nan")
    final_top1: float = float("nan")
    log: str = ""
    error: str | None = None


def summarize_trainer(
    trainer: str,
    pair: int,
    m: Measurement,
    epochs: list[dict],
    *,
    train_images: int,
    epochs_planned: int,
    loop_img_s: Sequence[float],
    log: str = "",
) -> RunResult:
    """A RunResult from a measurement and the parsed per-epoch records."""
    result = RunResult(trainer, pair, m, epochs, log=log)
    result.images_per_second = epochs_planned * train_images / m.wall_s if m.wall_s > 0 else 0.0
    if loop_img_s:
        result.train_img_s = statistics.fmean(loop_img_s)
    if epochs:
        result.best_top1 = max(e["top1"] for e in epochs)
        result.final_top1 = epochs[-1]["top1"]
    if m.timed_out:
        result.error = "timed out"
    elif m.exit_code != 0:
        result.error = f"exit status {m.exit_code}"
    elif len(epochs) != epochs_planned:
        result.error = f"{len(epochs)} of {epochs_planned} epochs recorded"
    return result


def pair_order(pairs: int, trainers: Sequence[str]) -> list[tuple[int, str]]:
    """(pair, trainer) in run order: A B A B ..., the first trainer alternating between pairs (A B, B A, ...)
    so neither always runs on a machine warmed (or heated) by the other."""
    order = []
    for p in range(pairs):
        names = list(trainers) if p % 2 == 0 else list(reversed(trainers))
        order += [(p, t) for t in names]
    return order


def _median(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else float("nan")


def compare(results: Sequence[RunResult]) -> dict:
    """Medians per trainer and, over complete pairs (both runs without error), the median of the pairwise
    ratios: speed as timm / swin-train time, memory as swin-train / timm peak, and the top-1 difference."""
    by_trainer: dict[str, list[RunResult]] = {}
    for r in results:
        if r.error is None:
            by_trainer.setdefault(r.trainer, []).append(r)
    medians = {}
    for trainer, runs in by_trainer.items():
        medians[trainer] = {
            "runs": len(runs),
            "wall_s": statistics.median(r.measurement.wall_s for r in runs),
            "cpu_s": statistics.median(r.measurement.cpu_s for r in runs),
            "peak_tree_pss_mib": _median([r.measurement.peak_tree_pss_mib for r in runs]),
            "peak_rss_mib": statistics.median(r.measurement.peak_rss_mib for r in runs),
            "images_per_second": statistics.median(r.images_per_second for r in runs),
            "best_top1": statistics.median(r.best_top1 for r in runs),
            "final_top1": statistics.median(r.final_top1 for r in runs),
        }
    pairs: dict[int, dict[str, RunResult]] = {}
    for r in results:
        if r.error is None:
            pairs.setdefault(r.pair, {})[r.trainer] = r
    complete = [p for p in pairs.values() if set(TRAINERS) <= set(p)]
    ratios = {}
    if complete:

        def median_ratio(get, numerator: str, denominator: str) -> float:
            pairs = [(get(p[numerator]), get(p[denominator])) for p in complete]
            return _median([a / b for a, b in pairs if a is not None and b])

        ratios = {
            "pairs": len(complete),
            # timm / swin-train: > 1 when swin-train is faster
            "speedup_wall": median_ratio(lambda r: r.measurement.wall_s, "timm", "swin"),
            "speedup_cpu": median_ratio(lambda r: r.measurement.cpu_s, "timm", "swin"),
            # swin-train / timm: < 1 when swin-train uses less memory
            "memory_tree_pss": median_ratio(lambda r: r.measurement.peak_tree_pss_mib, "swin", "timm"),
            "memory_rss": median_ratio(lambda r: r.measurement.peak_rss_mib, "swin", "timm"),
            "top1_difference": statistics.median(p["swin"].best_top1 - p["timm"].best_top1 for p in complete),
        }
    return {"medians": medians, "ratios": ratios}


def format_table(results: Sequence[RunResult], comparison: dict) -> str:
    head = (
        "pair",
        "trainer",
        "wall s",
        "cpu s",
        "tree PSS MiB",
        "max RSS MiB",
        "img/s e2e",
        "loop img/s",
        "best top-1",
        "last top-1",
        "status",
    )
    rows = [head]
    for r in results:
        m = r.measurement
        rows.append(
            (
                str(r.pair),
                r.trainer,
                f"{m.wall_s:.1f}",
                f"{m.cpu_s:.1f}",
                "n/a" if m.peak_tree_pss_mib is None else f"{m.peak_tree_pss_mib:.0f}",
                f"{m.peak_rss_mib:.0f}",
                f"{r.images_per_second:.1f}",
                f"{r.train_img_s:.1f}",
                f"{100 * r.best_top1:.2f}%",
                f"{100 * r.final_top1:.2f}%",
                r.error or "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    ratios = comparison["ratios"]
    if ratios:
        lines.append(
            f"median over {ratios['pairs']} pairs: swin-train {ratios['speedup_wall']:.3f}x faster than timm in "
            f"wall time ({ratios['speedup_cpu']:.3f}x in CPU time); memory swin-train/timm "
            f"{ratios['memory_tree_pss']:.3f} (tree PSS), {ratios['memory_rss']:.3f} (max RSS); best top-1 "
            f"swin-train - timm {100 * ratios['top1_difference']:+.2f} points"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver


def run_one(
    trainer: str,
    pair: int,
    *,
    recipe: Recipe,
    data_dir: Path,
    work_dir: Path,
    timm_train: Path | None,
    env: dict,
    train_images: int,
    timeout: float | None,
    memory_interval: float = 5.0,
) -> RunResult:
    """One trainer run in a fresh folder `work_dir/runs/{trainer}-{pair}`; parses its results."""
    run_dir = work_dir / "runs" / f"{trainer}-{pair}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover output folder would make swin-train resume
    run_dir.mkdir(parents=True)
    log_path = run_dir / "log.txt"
    if trainer == "swin":
        config_path = run_dir / "swin.yaml"
        config_path.write_text(
            yaml.safe_dump(swin_config(recipe, data_dir, run_dir / "out"), sort_keys=False)
        )
        cmd = swin_command(config_path)
    else:
        assert timm_train is not None
        cmd = timm_command(recipe, timm_train, data_dir, run_dir, "out")
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    m = run_measured(
        cmd, env=env, cwd=run_dir, log_path=log_path, timeout=timeout, memory_interval=memory_interval
    )
    log = log_path.read_text(errors="replace")
    epochs, loop_img_s = [], []
    try:
        if trainer == "swin":
            epochs = read_swin_metrics(run_dir / "out" / "metrics.jsonl")
            loop_img_s = [e["train_img_s"] for e in epochs]
        else:
            epochs = read_timm_summary(run_dir / "out" / "summary.csv")
            loop_img_s = timm_train_img_s(log)
    except DataError as e:
        if m.exit_code == 0:
            raise
        print(f"{trainer} run {pair} failed ({e})", file=sys.stderr)
    usable = (train_images // recipe.batch_size) * recipe.batch_size  # both drop the last partial batch
    return summarize_trainer(
        trainer,
        pair,
        m,
        epochs,
        train_images=usable,
        epochs_planned=recipe.epochs,
        loop_img_s=loop_img_s,
        log=str(log_path),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark_trainer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--timm-train", type=Path, help="timm's train.py (from a pytorch-image-models checkout)")
    p.add_argument(
        "--trainers",
        nargs="+",
        choices=TRAINERS,
        default=list(TRAINERS),
        help="default: both; 'swin' alone needs no --timm-train",
    )
    p.add_argument("--pairs", type=int, default=3, help="alternating rounds (each runs every trainer once)")
    p.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/; default: generated")
    p.add_argument("--train-images", type=int, default=1300, help="size of the generated train set")
    p.add_argument("--val-images", type=int, default=497, help="size of the generated val set")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("output/benchmark_trainer"),
        help="generated data and one folder per run (logs, outputs)",
    )
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--warmup-epochs", type=int, default=Recipe.warmup_epochs)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--workers", type=int, default=Recipe.workers)
    p.add_argument(
        "--threads", type=int, help="OMP/MKL threads for both trainers; default: torch's own choice"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    p.add_argument(
        "--memory-interval",
        type=float,
        default=5.0,
        help="seconds between samples of the process tree's PSS (0: off; max RSS is always measured)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (every run, medians, ratios, recipe)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    recipe = replace(
        Recipe(),
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    recipe.check()
    if args.pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {args.pairs}")
    if (args.threads is not None and args.threads < 1) or args.timeout <= 0 or args.memory_interval < 0:
        raise ConfigError(
            f"--threads must be >= 1, --timeout > 0 and --memory-interval >= 0, got {args.threads}, "
            f"{args.timeout}, {args.memory_interval}"
        )
    trainers = [t for t in TRAINERS if t in args.trainers]
    timm_train = None
    if "timm" in trainers:
        if args.timm_train is None:
            raise ConfigError("--timm-train PATH is needed to run timm (or pass --trainers swin)")
        timm_train = args.timm_train.expanduser().resolve()
        if not timm_train.is_file():
            raise ConfigError(f"--timm-train {args.timm_train}: no such file; point it at timm's train.py")
    work_dir = args.work_dir.expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.data is not None:
        data_dir = args.data.expanduser().resolve()
    else:
        data_dir = ensure_dataset(work_dir / "data", train=args.train_images, val=args.val_images)
    train_images = count_images(data_dir / "train")
    count_images(data_dir / "val")
    if train_images < recipe.batch_size:
        raise DataError(
            f"{data_dir}/train has {train_images} images, fewer than one batch of {recipe.batch_size}"
        )
    env = trainer_env(args.threads)
    results = []
    for pair, trainer in pair_order(args.pairs, trainers):
        print(f"pair {pair}: {trainer} ...", file=sys.stderr, flush=True)  # stdout holds only the result
        results.append(
            run_one(
                trainer,
                pair,
                recipe=recipe,
                data_dir=data_dir,
                work_dir=work_dir,
                timm_train=timm_train,
                env=env,
                train_images=train_images,
                timeout=args.timeout,
                memory_interval=args.memory_interval,
            )
        )
    comparison = compare(results)
    report = {
        "recipe": asdict(recipe),
        "data": str(data_dir),
        "threads": args.threads,
        "runs": [{**asdict(r), "measurement": asdict(r.measurement)} for r in results],
        **comparison,
    }
    print(json.dumps(report, indent=1) if args.json else format_table(results, comparison))
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with user errors as one line on stderr and exit status 2."""
    try:
        report = main(argv)
    except SwinTrainError as e:
        print(f"benchmark_trainer.py: error: {e}", file=sys.stderr)
        return e.exit_code
    failed = [r for r in report["runs"] if r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli())
