"""The built-in quick-start data set: coloured shapes on noisy backgrounds, written as PNG files.

Layout (an ordinary ImageFolder tree, read by the same code path as ImageNet)::

    root/train/<class>/<class>_0000.png ...
    root/val/<class>/<class>_0000.png ...
    root/meta.json          # generation parameters; written last, so present <=> complete

Eight classes that stay distinguishable at 32 px and under the usual train augmentation (flips,
rotations up to 30 degrees, crops, colour ops): circle, ring, square, triangle, cross, star,
hbar (horizontal bar), vbar (vertical bar), in random colours (the shape always brighter than the
background), random size and position, on a noisy background with a brightness ramp. Every image is a
pure function of (seed, split, class, index), so the same parameters give byte-identical files on
every machine.

Difficulty is tuned (the knobs below) for the quick start: a micro Swin (img 32, patch 2, embed 32,
depths 2-2, 0.14M params; AdamW batch 64, crop scale 0.5-1, label smoothing 0.1) on the default
500 + 100 images per class reached 96% val top-1 after 620 steps (10 epochs) at lr 1e-3 and 99% at
lr 2e-3 (90% after ~430 / ~310 steps). With twice the position/size jitter and noise it stalled at
~65-70%, so loosen the knobs only together with a longer schedule.

`ensure_shapes_dataset` generates into a temporary sibling folder and renames it into place, so a
killed generation never leaves a half set; later calls reuse the cached set while `meta.json`
matches and regenerate it otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from swin_train.errors import DataError
from swin_train.leftovers import left_by_dead_process, owner_tag

GENERATOR = "swin-train shapes"
VERSION = 2  # bump when the drawing code changes: cached sets with another version are regenerated
CLASSES = ("circle", "ring", "square", "triangle", "cross", "star", "hbar", "vbar")
_SPLITS = ("train", "val")
R_MIN, R_MAX = 0.35, 0.42  # shape half-extent, as a fraction of the image side
CENTER_JITTER = 0.06  # shape centre offset from the image centre, at most this fraction of the side
MAX_TILT_DEG = 0.0  # shapes are axis-aligned; train-time rotation (RandAugment) adds tilt
GRADIENT = 12.0  # background brightness ramp across the image, at most +-this (0..255 scale)
NOISE_STD = (2.0, 5.0)  # per-image range of the per-pixel Gaussian noise std
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: cheap anti-aliasing


def default_shapes_root() -> Path:
    """Cache folder of the quick-start set: $SWIN_TRAIN_CACHE, else $XDG_CACHE_HOME/swin-train, else
    ~/.cache/swin-train; with `shapes-v{VERSION}` appended."""
    if os.environ.get("SWIN_TRAIN_CACHE"):
        base = Path(os.environ["SWIN_TRAIN_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "swin-train"
    return base / f"shapes-v{VERSION}"


def ensure_shapes_dataset(
    root: str | Path | None = None,
    img_size: int = 32,
    train_per_class: int = 500,
    val_per_class: int = 100,
    seed: int = 0,
) -> Path:
    """Return `root` holding the shapes set for these parameters, generating it first if needed.

    Safe to call from several processes at once (e.g. every torchrun rank): each generates into its
    own temporary folder and the first rename wins. Refuses to replace a folder it did not write.
    """
    if img_size < 8:
        raise DataError(f"shapes img_size must be >= 8, got {img_size}")
    if train_per_class < 1 or val_per_class < 1:
        raise DataError(
            f"shapes needs >= 1 image per class, got train {train_per_class}, val {val_per_class}"
        )
    root = Path(root).expanduser() if root is not None else default_shapes_root()
    meta = {
        "generator": GENERATOR,
        "version": VERSION,
        "classes": list(CLASSES),
        "img_size": img_size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        # the drawing knobs too, so that changing one invalidates cached sets
        "drawing": {
            "r": [R_MIN, R_MAX],
            "center_jitter": CENTER_JITTER,
            "max_tilt_deg": MAX_TILT_DEG,
            "gradient": GRADIENT,
            "noise_std": list(NOISE_STD),
        },
    }
    if _read_meta(root) == meta:
        return root
    tmp = root.parent / f".{root.name}.tmp-{owner_tag()}"
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_dirs(root)
        _generate(tmp, meta)
        _install(tmp, root, meta)
    except OSError as e:
        raise DataError(
            f"cannot write the shapes set to {root} ({e.strerror or e}); "
            "point $SWIN_TRAIN_CACHE or the data path at a writable folder"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _generate(out: Path, meta: dict) -> None:
    """Write every image, then meta.json (last: its presence marks a complete set)."""
    counts = {"train": meta["train_per_class"], "val": meta["val_per_class"]}
    jobs = [(split_id, class_id) for split_id in range(len(_SPLITS)) for class_id in range(len(CLASSES))]
    for split_id, class_id in jobs:
        (out / _SPLITS[split_id] / CLASSES[class_id]).mkdir(parents=True)

    stop = threading.Event()  # set on any exception (Ctrl-C included): the other threads quit early

    def write_folder(job: tuple[int, int]) -> None:
        split_id, class_id = job
        name, folder = CLASSES[class_id], out / _SPLITS[split_id] / CLASSES[class_id]
        for i in range(counts[_SPLITS[split_id]]):
            if stop.is_set():
                return
            rng = np.random.default_rng([meta["seed"], VERSION, split_id, class_id, i])
            # optimize=False and no metadata: PNG bytes depend only on the pixels
            draw_shape(name, meta["img_size"], rng).save(folder / f"{name}_{i:04d}.png", optimize=False)

    # Threads overlap file creation and zlib (both release the GIL). Every image has its own RNG, so
    # the output does not depend on scheduling.
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for future in [pool.submit(write_folder, job) for job in jobs]:
            future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _install(tmp: Path, root: Path, meta: dict) -> None:
    """Atomically move the finished set `tmp` to `root`, replacing an outdated set of ours."""
    for _ in range(5):
        try:
            os.rename(tmp, root)  # atomic; fails if root exists and is not empty
            return
        except FileNotFoundError:
            raise
        except OSError:
            if not root.exists():
                continue  # another process moved the old set away in between: retry
        found = _read_meta(root)
        if found == meta:
            return  # another process installed the same set first
        if found is None or found.get("generator") != GENERATOR:
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
                continue
            raise DataError(f"{root} exists and is not a swin-train shapes set; choose another folder")
        old = root.parent / f".{root.name}.old-{owner_tag()}"
        try:
            os.rename(root, old)
        except FileNotFoundError:
            continue  # someone else moved it already
        shutil.rmtree(old, ignore_errors=True)
    raise DataError(f"could not install the shapes set at {root} (concurrent writers?); try again")


def is_shapes_set(root: Path) -> bool:
    """Whether `root` holds a generated shapes set (of any version)."""
    return (_read_meta(root) or {}).get("generator") == GENERATOR


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_temp_dirs(root: Path) -> None:
    """Delete temp/old folders next to `root` left by killed processes of this host."""
    for path in root.parent.glob(f".{root.name}.*-*-*-*"):
        kind, _, tag = path.name[len(root.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and left_by_dead_process(tag):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Drawing


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB colours of random hue, the shape always brighter by > 90 luma.

    A fixed polarity makes "is this pixel part of the shape" a linear function of the pixel, so a
    micro transformer learns the shapes in a few hundred steps instead of first solving an XOR."""
    while True:
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if _luma(fg) - _luma(bg) > 90:
            return bg, fg


def _polygon(cx: float, cy: float, radii: list[float], angle0: float) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles from `angle0` (radians, 0 = right, y grows downwards)."""
    n = len(radii)
    return [
        (cx + r * math.cos(angle0 + 2 * math.pi * k / n), cy + r * math.sin(angle0 + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _rotated_rect(
    cx: float, cy: float, half_w: float, half_h: float, angle: float
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def draw_shape(name: str, img_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of shape class `name`, all randomness drawn from `rng`."""
    bg, fg = _contrasting_colours(rng)
    size = img_size * _SUPERSAMPLE
    r = rng.uniform(R_MIN, R_MAX) * size  # half-extent of the shape
    # centre within CENTER_JITTER of the middle (and fully inside): crops of >= half the area keep it
    cx, cy = size / 2 + rng.uniform(-1, 1, 2) * min(CENTER_JITTER * size, size / 2 - r)
    tilt = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(canvas)
    colour = tuple(int(v) for v in fg)
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(1, round(0.38 * r)))
    elif name == "square":
        draw.polygon(_rotated_rect(cx, cy, 0.82 * r, 0.82 * r, tilt), fill=colour)
    elif name == "triangle":
        # pointing up; centroid shifted down so the triangle's box is centred
        draw.polygon(_polygon(cx, cy + 0.25 * r, [r] * 3, -math.pi / 2 + tilt), fill=colour)
    elif name == "cross":
        draw.polygon(_rotated_rect(cx, cy, r, 0.3 * r, tilt), fill=colour)
        draw.polygon(_rotated_rect(cx, cy, 0.3 * r, r, tilt), fill=colour)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.4 * r] * 5, -math.pi / 2 + tilt), fill=colour)
    elif name == "hbar":
        draw.polygon(_rotated_rect(cx, cy, r, 0.2 * r, tilt), fill=colour)
    elif name == "vbar":
        draw.polygon(_rotated_rect(cx, cy, 0.2 * r, r, tilt), fill=colour)
    else:
        raise ValueError(f"unknown shape '{name}'; known: {', '.join(CLASSES)}")
    small = np.asarray(canvas.resize((img_size, img_size), Image.Resampling.BOX), dtype=np.float32)
    # background clutter: a random linear gradient plus per-pixel Gaussian noise
    yy, xx = np.mgrid[0:img_size, 0:img_size] / max(1, img_size - 1) - 0.5
    gx, gy = rng.uniform(-GRADIENT, GRADIENT, 2)
    noise = rng.normal(0.0, rng.uniform(*NOISE_STD), (img_size, img_size, 3))
    pixels = small + (gx * xx + gy * yy)[..., None] + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
