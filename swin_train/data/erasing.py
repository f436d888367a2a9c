"""Random erasing on the device, as a pure function of a seed key, for a whole batch at once.

Why not timm's RandomErasing as it is: it draws from the global generators (a resumed run would erase
differently, and in prefetch.py's feeder thread they are the training thread's too) and writes box by box
(three launches a box). Here the boxes come from the same sequence of `random` calls as its `_erase`, made
on the host from a `random.Random` seeded as `seeding.seeded_rng` seeds the global one; each box's noise
comes from the same `normal_` call of the same size, in the same order, on a generator seeded as
`seeded_rng` seeds the device's; then every box is written with one masked op per box slot (the k-th box of
each image; later slots overwrite earlier ones, as timm's later boxes do). The batches are bitwise those of
timm's RandomErasing under `seeded_rng(key)` (tests/test_prefetch.py), whichever thread runs it.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing

from swin_train.data.host_arrays import HostArrays
from swin_train.data.seeding import derive_seed


class Box(NamedTuple):
    image: int
    slot: int  # the box's place among its image's boxes
    top: int
    left: int
    height: int
    width: int


class SeededErasing:
    """timm's RandomErasing(probability, mode, max_count) (the worker pipeline's settings: timm's
    create_transform) applied to (B, C, H, W) float batches in place, seeded by a key of ints."""

    def __init__(self, probability: float, mode: str = "pixel", max_count: int = 1):
        self.settings = RandomErasing(probability, mode=mode, max_count=max_count, device="cpu")

    def boxes(self, rng: random.Random, batch: int, height: int, width: int) -> list[Box]:
        """The boxes RandomErasing._erase draws for `batch` images, image by image, from `rng`."""
        s = self.settings
        boxes = []
        for image in range(batch):
            if rng.random() > s.probability:
                continue
            count = s.min_count if s.min_count == s.max_count else rng.randint(s.min_count, s.max_count)
            slot = 0
            for _ in range(count):
                for _attempt in range(10):
                    target_area = rng.uniform(s.min_area, s.max_area) * height * width / count
                    aspect_ratio = math.exp(rng.uniform(*s.log_aspect_ratio))
                    h = int(round(math.sqrt(target_area * aspect_ratio)))
                    w = int(round(math.sqrt(target_area / aspect_ratio)))
                    if w < width and h < height:
                        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                        boxes.append(Box(image, slot, top, left, h, w))
                        slot += 1
                        break
        return boxes

    def __call__(self, images: torch.Tensor, *key: int) -> torch.Tensor:
        """`images` (B, C, H, W) with their boxes erased, as a pure function of `key` (non-negative ints)."""
        batch, channels, height, width = images.shape
        seed, _ = derive_seed(*key)
        boxes = self.boxes(random.Random(seed), batch, height, width)
        if not boxes:
            return images
        layout = sorted(boxes, key=lambda box: (box.slot, box.image))  # the order the masked writes read
        host = HostArrays()
        rows, columns = (host.add(a) for a in _slot_masks(layout, batch, height, width))
        areas = host.add(np.repeat([box.height * box.width for box in layout], channels))  # "rand"
        t = host.upload(images.device)
        masks = t[rows] & t[columns]  # (slots, B, 1, H, W)
        s = self.settings
        if not (s.per_pixel or s.rand_color):  # "const": zeros
            return images.masked_fill_(masks.any(0), 0.0)
        noise = self._noise(boxes, layout, channels, seed, images)
        pixels = [channels * box.height * box.width for box in layout]
        if s.rand_color:  # one level per channel and box, repeated over the box
            noise = noise.repeat_interleave(t[areas], output_size=sum(pixels))
        start = 0
        for slot, mask in enumerate(masks):
            size = sum(n for box, n in zip(layout, pixels) if box.slot == slot)
            images.masked_scatter_(mask, noise[start : start + size])
            start += size
        return images

    def _noise(self, boxes: list[Box], layout: list[Box], channels: int, seed: int, images) -> torch.Tensor:
        """Every box's noise in `layout` order, each drawn as timm's _get_pixels draws it (per pixel or per
        channel), in timm's order of boxes, on a generator of the images' device seeded with `seed`."""

        def size(box: Box) -> int:
            return channels if self.settings.rand_color else channels * box.height * box.width

        starts = dict(zip(layout, np.cumsum([0] + [size(box) for box in layout]).tolist()))
        noise = torch.empty(sum(size(box) for box in layout), dtype=images.dtype, device=images.device)
        generator = torch.Generator(images.device).manual_seed(seed)
        for box in boxes:
            noise[starts[box] : starts[box] + size(box)].normal_(generator=generator)
        return noise

    def __repr__(self) -> str:
        return f"SeededErasing({self.settings!r})"


def _slot_masks(boxes: list[Box], batch: int, height: int, width: int):
    """(rows (slots, B, 1, H, 1), columns (slots, B, 1, 1, W)) bool: the rows and the columns each slot's
    box covers in each image (a slot holds an image's k-th box); their product is the slot's mask."""
    slots = 1 + max(box.slot for box in boxes)
    rows = np.zeros((slots, batch, 1, height, 1), dtype=bool)
    columns = np.zeros((slots, batch, 1, 1, width), dtype=bool)
    for box in boxes:
        rows[box.slot, box.image, 0, box.top : box.top + box.height, 0] = True
        columns[box.slot, box.image, 0, 0, box.left : box.left + box.width] = True
    return rows, columns
