"""The loader benchmark's input: real photographs cut and rescaled to ImageNet's size spread, as JPEGs.

Generated shapes compress and decode unlike photographs (flat areas, few bytes), so the loader is timed on
the colour photographs scikit-image ships (`skimage.data`: astronaut, chelsea, coffee, rocket and the two
views of stereo_motorcycle; `pip install 'swin-train[bench]'`). Each image is a pure function of (seed,
split, index):

- a source photo (in turn), an aspect ratio log-uniform in [3/4, 4/3], a shorter side uniform in
  [300, 500] px and a box of that aspect covering 75-100% of the largest one the photo holds, at a random
  place; the box is resized to the target size (Lanczos) and mirrored half of the time;
- sensor grain: Gaussian noise of a standard deviation uniform in GRAIN (luminance) plus half of it per
  channel. The bundled photos are clean (denoised or downsampled), so at these sizes and qualities they
  compress to about 40 KB, where ImageNet's photos average about 110 KB; the grain restores the entropy
  coder's share of the decoding work, which no DCT scaling saves (`grain=0` turns it off);
- a baseline JPEG (4:2:0, Pillow's defaults) of quality uniform in QUALITY.

Layout: `root/{train,val}/<photo>/<photo>_NNNN.jpg` (the photo a crop came from is its class) and
`root/photos.json` (the parameters), written last: present means complete.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from swin_train.errors import DataError

SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")
SHORT_SIDE = (300, 500)
ASPECT = (3 / 4, 4 / 3)
BOX_FRACTION = (0.75, 1.0)  # side of the cut box against the largest box of its aspect in the photo
QUALITY = (75, 95)
GRAIN = (8.0, 16.0)  # luminance noise std in 0..255 levels; each channel gets half of it on top
VERSION = 1  # bump when the recipe changes: sets of another version are rebuilt
_SPLIT_KEYS = {"train": 0, "val": 1}


def load_sources() -> dict[str, np.ndarray]:
    """The bundled colour photographs as (H, W, 3) uint8 arrays."""
    try:
        import skimage.data
    except ImportError:
        raise DataError(
            "the benchmark's photo set is cut from scikit-image's bundled photographs: "
            "pip install 'swin-train[bench]' (or scikit-image)"
        ) from None
    left, right, _ = skimage.data.stereo_motorcycle()
    photos = dict(
        astronaut=skimage.data.astronaut(),
        chelsea=skimage.data.chelsea(),
        coffee=skimage.data.coffee(),
        rocket=skimage.data.rocket(),
        motorcycle_left=left,
        motorcycle_right=right,
    )
    return {name: photos[name] for name in SOURCES}


def cut_photo(source: np.ndarray, rng: np.random.Generator, grain: bool) -> tuple[Image.Image, int]:
    """(image, JPEG quality) of one sample: a box of `source` at ImageNet's sizes (see the module doc)."""
    height, width = source.shape[:2]
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))  # width / height
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    quality = int(rng.integers(QUALITY[0], QUALITY[1] + 1))
    box_w = min(width, height * aspect) * rng.uniform(*BOX_FRACTION)
    box_h = box_w / aspect
    left, top = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
    size = (short, round(short / aspect)) if aspect < 1 else (round(short * aspect), short)
    image = Image.fromarray(source).resize(
        size, Image.Resampling.LANCZOS, box=(left, top, left + box_w, top + box_h)
    )
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sigma = rng.uniform(*GRAIN)
    if grain:
        pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
        noise = rng.normal(0.0, sigma, pixels.shape[:2] + (1,)) + rng.normal(0.0, sigma / 2, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))
    return image, quality


def photo_params(train: int, val: int, seed: int, grain: bool) -> dict:
    return dict(version=VERSION, train=train, val=val, seed=seed, grain=grain, sources=list(SOURCES))


def make_photo_set(root: str | Path, *, train: int, val: int, seed: int = 0, grain: bool = True) -> Path:
    """Write the set into `root` (see the module doc) unless a complete one with these parameters is
    there; returns `root`. The same parameters give the same bytes on every machine with the same
    Pillow and scikit-image."""
    root = Path(root)
    params = photo_params(train, val, seed, grain)
    meta = root / "photos.json"
    if meta.is_file() and json.loads(meta.read_text()) == params:
        return root
    if root.exists():
        if not meta.is_file() and any(root.iterdir()):
            raise DataError(
                f"{root} exists and is not a photo set made by the benchmark; pick another folder"
            )
        shutil.rmtree(root)
    sources = load_sources()
    for split, count in (("train", train), ("val", val)):
        for index in range(count):
            name = SOURCES[index % len(SOURCES)]
            rng = np.random.default_rng([seed, _SPLIT_KEYS[split], index])
            image, quality = cut_photo(sources[name], rng, grain)
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{name}_{index:04d}.jpg", "JPEG", quality=quality)
    meta.write_text(json.dumps(params, indent=1) + "\n")
    return root


def describe(root: str | Path) -> dict:
    """Sizes of the set's JPEGs: count, median and 10th/90th percentile KB and shorter side."""
    files = sorted(Path(root).rglob("*.jpg"))
    kb = np.array([f.stat().st_size / 1024 for f in files])
    short = []
    for f in files:
        with Image.open(f) as image:
            short.append(min(image.size))
    pct = lambda a, q: round(float(np.percentile(a, q)), 1)
    return {
        "images": len(files),
        "kb_median": pct(kb, 50),
        "kb_p10_p90": [pct(kb, 10), pct(kb, 90)],
        "short_side_p10_p90": [pct(short, 10), pct(short, 90)],
    }
