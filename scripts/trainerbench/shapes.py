"""The generated data set: 10 classes of 32 px images (5 shapes x solid or striped fill) in random colours,
brightness, size and position on a noisy background, as PNG ImageFolders written once."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from swin_train.errors import DataError

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
