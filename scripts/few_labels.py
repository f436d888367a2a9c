"""A few-label copy of an ImageFolder root: a stratified --fraction of each class of train/ (at least one image
per class, chosen by --seed), and all of val/, hard-linked (copied where links fail) into OUT.

    python scripts/digits_set.py /tmp/digits --size 32
    python scripts/few_labels.py /tmp/digits /tmp/digits10 --fraction 0.1

The pre-training reads every train image of the full root without labels; the fine-tuning the few labelled
ones; both are evaluated on the same val/ (docs/performance.md, pre-training then fine-tuning with few labels).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="an ImageFolder root with train/ and val/")
    p.add_argument("out", type=Path, help="the few-label root to write (must not exist)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of each class's train images kept")
    p.add_argument("--seed", type=int, default=0, help="fixes which images are kept")
    return p


def kept(files: list[Path], fraction: float, rng: np.random.Generator) -> list[Path]:
    """round(fraction * n) of `files` (at least one), chosen by `rng`, in their sorted order."""
    count = max(1, round(fraction * len(files)))
    return sorted(files[i] for i in rng.permutation(len(files))[:count])


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)


def write_few_labels(root: Path, out: Path, fraction: float, seed: int) -> dict[str, int]:
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    train = root / "train"
    classes = sorted(d for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    if not classes or not (root / "val").is_dir():
        raise ValueError(f"{root} is not an ImageFolder root with train/<class>/ and val/")
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for folder in classes:
        for src in kept(sorted(f for f in folder.iterdir() if f.is_file()), fraction, rng):
            _link(src, out / "train" / folder.name / src.name)
            counts["train"] += 1
    for src in sorted(f for f in (root / "val").rglob("*") if f.is_file()):
        _link(src, out / "val" / src.relative_to(root / "val"))
        counts["val"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists():
        print(f"few_labels.py: {args.out} exists; choose another OUT", file=sys.stderr)
        return 2
    try:
        counts = write_few_labels(args.root, args.out, args.fraction, args.seed)
    except (ValueError, OSError) as e:
        print(f"few_labels.py: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} labelled train and {counts['val']} val images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
