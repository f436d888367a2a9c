"""A small real-data set with a held-out split: scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, 10
classes, bundled with scikit-learn) as an ImageFolder root, upscaled to --size px RGB images.

    pip install scikit-learn
    python scripts/digits_set.py /tmp/digits --size 64 --format jpeg
    swin-train --config configs/quickstart.yaml --data-path /tmp/digits data.dataset=imagefolder \
        model.num_classes=10 data.img_size=32 --output output/digits

The split is fixed by --seed and stratified: a quarter of each class is held out in val/ and never trained on.
Real scans (unlike the generated shapes) make accuracy comparisons between trainers or settings meaningful;
upscaled JPEGs exercise the decoder as photographs do, at a size a CPU trains on in minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

VAL_FRACTION = 0.25


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the ImageFolder root to write (train/ and val/)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (bicubic upscaling of 8x8)")
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--seed", type=int, default=0, help="fixes the held-out split")
    return p


def held_out_split(labels: np.ndarray, seed: int) -> np.ndarray:
    """A bool mask of the val images: VAL_FRACTION of each class (rounded), chosen by `seed`."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        val[members[: round(len(members) * VAL_FRACTION)]] = True
    return val


def write_set(out: Path, size: int, fmt: str, quality: int, seed: int) -> dict[str, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)  # (N, 8, 8), 0..16 scanner levels
    val = held_out_split(digits.target, seed)
    counts = {"train": 0, "val": 0}
    suffix = ".jpg" if fmt == "jpeg" else ".png"
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        split = "val" if val[i] else "train"
        folder = out / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = Image.fromarray(255 - image).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        options = {"quality": quality} if fmt == "jpeg" else {}
        rgb.save(folder / f"{i:04d}{suffix}", **options)
        counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = write_set(args.out, args.size, args.format, args.quality, args.seed)
    except ImportError:
        print("scripts/digits_set.py needs scikit-learn: pip install scikit-learn", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
