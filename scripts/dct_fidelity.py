"""How close data.fast_decode's reduced-scale JPEG decode (decode.py: `Image.draft` at 1/2, 1/4 or 1/8, for crops
at least four times the output) lands to the full path (Pillow's whole decode, timm's crop and resize), on
content made to break it: pixel noise, a zone plate (every frequency), stripes of 3-24 px periods, a one-pixel
checkerboard, text, 8x8 random blocks and hard edges, saved as JPEGs at two qualities, at a size that is not
a multiple of the DCT block (the last reduced pixel is partial).

Prints, per image and quality, the lowest and median PSNR over `--draws` random-resized crops (timm's train
crop, no flip or augmentation) and the PSNR of the eval resize + center crop, then the floor over all.
`--timing`: instead, the milliseconds of a train crop plus an eval crop of the benchmark's photographs
(scripts/bench/photos.py, scaled to the size; one thread) with the DCT scales as they are and without them.

    python scripts/dct_fidelity.py [--width 2003 --height 1501 --draws 12 --img-size 224] [--timing]
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRIPE_PERIODS = (3, 4, 6, 8, 12, 16, 24)
QUALITIES = (75, 95)


def adversarial_images(width: int, height: int, seed: int = 0) -> Iterator[tuple[str, Image.Image]]:
    """(name, RGB image) of content where a reduced-scale decode differs most from a full one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)

    def gray(values: np.ndarray) -> Image.Image:
        return Image.fromarray(np.repeat(np.clip(values, 0, 255).astype(np.uint8)[..., None], 3, 2))

    yield "noise", Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    yield (
        "zone plate",
        gray(127.5 + 127.5 * np.cos(np.pi * ((x - width / 2) ** 2 + (y - height / 2) ** 2) / (2 * width))),
    )
    yield "checkerboard 1px", gray((x + y) % 2 * 255)
    for period in STRIPE_PERIODS:
        yield f"stripes {period}px", gray((x // (period / 2)) % 2 * 255)
    text = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(text)
    for top in range(0, height, 14):
        draw.text(
            (0, top),
            "The quick brown fox jumps over the lazy dog 0123456789 " * (width // 300 + 1),
            fill="black",
        )
    yield "text", text
    blocks = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    yield "8x8 blocks", Image.fromarray(blocks.repeat(8, 0).repeat(8, 1)[:height, :width])
    yield "edges", gray(((x // 37) + (y // 29)) % 2 * 255)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def fidelity(data: bytes, img_size: int, draws: int) -> tuple[list[float], float]:
    """(PSNR of each of `draws` train crops, PSNR of the eval crop): fast path against full path."""
    from swin_train.config import AugConfig, DataConfig
    from swin_train.data.decode import open_encoded
    from swin_train.data.seeding import run_seeded
    from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform

    aug = AugConfig(auto_augment=None, color_jitter=0, hflip=0)
    full = build_train_transform(DataConfig(img_size=img_size, fast_decode=False), aug, uint8=True)
    fast = build_train_transform(DataConfig(img_size=img_size, fast_decode=True), aug, uint8=True)
    pre = Preprocess(img_size, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    full_eval, fast_eval = (
        build_eval_transform(pre, uint8=True),
        build_eval_transform(pre, uint8=True, fast_decode=True),
    )
    whole = Image.open(io.BytesIO(data)).convert("RGB")
    train = [psnr(run_seeded(full, whole, s), run_seeded(fast, open_encoded(data), s)) for s in range(draws)]
    return train, psnr(full_eval(whole), fast_eval(open_encoded(data)))


def timing(width: int, height: int, img_size: int, rounds: int = 7) -> dict[str, float]:
    """{"dct": ms, "no dct": ms}: the median over `rounds` of a train + eval crop of each bundled photo."""
    import random
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench.photos import load_sources
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from swin_train.data import decode

    torch.set_num_threads(1)
    files = []
    for pixels in load_sources().values():
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS).save(
            buffer, "JPEG", quality=90
        )
        files.append(buffer.getvalue())
    train = decode.FastRandomResizedCrop(RandomResizedCropAndInterpolation(img_size), as_tensor=True)
    evaluation = decode.FastResizeCenterCrop(
        int(img_size / 0.875), (img_size, img_size), "bicubic", as_tensor=True
    )
    scales, times = decode.DCT_SCALES, {"dct": [], "no dct": []}
    for round_ in range(rounds):
        for name, decode.DCT_SCALES in (("dct", scales), ("no dct", ())):
            random.seed(round_)
            start = time.perf_counter()
            for data in files:
                train(decode.open_encoded(data)), evaluation(decode.open_encoded(data))
            times[name].append((time.perf_counter() - start) * 1000 / len(files))
    decode.DCT_SCALES = scales
    return {name: float(np.median(ms)) for name, ms in times.items()}


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=2003)
    p.add_argument("--height", type=int, default=1501)
    p.add_argument("--draws", type=int, default=12, help="random-resized crops per image")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--timing", action="store_true", help="time the DCT path against none instead")
    args = p.parse_args(argv)
    if args.timing:
        ms = timing(args.width, args.height, args.img_size)
        print(
            f"{args.width}x{args.height}: train + eval crop {ms['dct']:.1f} ms, without DCT scaling {ms['no dct']:.1f} ms"
        )
        return ms["dct"]
    floor = float("inf")
    for name, image in adversarial_images(args.width, args.height):
        for quality in QUALITIES:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            train, evaluation = fidelity(buffer.getvalue(), args.img_size, args.draws)
            floor = min(floor, *train, evaluation)
            print(
                f"{name:17s} q{quality}: train crops min {min(train):6.2f} median {np.median(train):6.2f} dB"
                f" | eval {evaluation:6.2f} dB",
                flush=True,
            )
    print(f"floor: {floor:.2f} dB")
    return floor


if __name__ == "__main__":
    main()
