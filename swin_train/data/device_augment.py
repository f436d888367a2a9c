"""The device's half of `aug.on_device`: a batch's flips and RandAugment/AutoAugment ops applied to its uint8
images where the batch is (the GPU), from the draws the workers made (augment_draws.py), in the order each
sample drew them, with Pillow's semantics (pillow_ops.py).

Few launches whatever the batch size, so that the host stays ahead of the device: the host plans the batch
(`plan_batch`: which samples take which op at each position, and the point ops' tables; numpy only, no
wait for the device) and sends the plan in one copy. The device flips every flipped sample at once, finds
where every geometric op of every position reads its input at once (the coordinates do not depend on the
pixels), then per op position runs one resampling for the samples whose op there is geometric (one per
interpolation) and one colour pass for those whose op is a colour op: one table lookup (the point ops,
AutoContrast, Equalize) followed by one blend (Color, Contrast, Sharpness). The colour pass computes only
what the position's ops need (a histogram if one sample equalizes, say).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swin_train.data import pillow_ops as ops
from swin_train.data.augment_draws import INTERPOLATION_CODES, KINDS, ROW, Augmented
from swin_train.data.host_arrays import HostArrays

_GEOMETRIC = KINDS.index("affine") + 1  # the kind code of the geometric ops


@dataclass
class AffineGroup:
    """The samples `rows` whose op at `position` is geometric with `interpolation`, with their Pillow affine
    coefficients `matrices` (n, 6) float64."""

    position: int
    interpolation: str
    rows: np.ndarray
    matrices: np.ndarray


@dataclass
class ColourGroup:
    """The samples `rows` whose op at `position` is a colour op: `kinds` their op names, `tables` (n, 256)
    float32 their point ops' tables (pillow_ops.point_tables), `factors` (n,) the blend factors (1: the
    table's result as it is)."""

    position: int
    rows: np.ndarray
    kinds: np.ndarray
    tables: np.ndarray
    factors: np.ndarray

    def has(self, *kinds: str) -> bool:
        return bool(np.isin(self.kinds, kinds).any())


@dataclass
class Plan:
    """A batch's draws grouped for the device: `flipped` (B,) bool; the geometric groups in the order of
    their positions; at most one colour group per position; `positions` ops per sample at most."""

    flipped: np.ndarray
    affine: list[AffineGroup]
    colour: list[ColourGroup]
    positions: int

    @property
    def empty(self) -> bool:
        return not (self.flipped.any() or self.affine or self.colour)


def plan_batch(params: torch.Tensor) -> Plan:
    """The plan that applies a batch's draws `params` (B, 1 + ROW * layers) float64 (host memory)."""
    p = params.numpy()
    positions = (p.shape[1] - 1) // ROW
    affine, colour = [], []
    for position in range(positions):
        block = p[:, 1 + ROW * position : 1 + ROW * (position + 1)]
        codes = block[:, 0].astype(np.int64)
        geometric = codes == _GEOMETRIC
        for interpolation in np.unique(block[geometric, 1].astype(np.int64)):
            rows = np.flatnonzero(geometric & (block[:, 1] == interpolation))
            affine.append(AffineGroup(position, INTERPOLATION_CODES[interpolation], rows, block[rows, 2:]))
        rows = np.flatnonzero((codes > 0) & ~geometric)
        if rows.size:
            kinds = np.asarray(KINDS)[codes[rows] - 1]
            blends = np.isin(kinds, ("color", "contrast", "sharpness"))
            factors = np.where(blends, block[rows, 2], 1.0).astype(np.float32)
            tables = ops.point_tables(kinds, block[rows, 2:])
            colour.append(ColourGroup(position, rows, kinds, tables, factors))
    return Plan(p[:, 0] != 0, affine, colour, positions)


class DeviceAugment:
    """Applies `Augmented` batches' draws on their pixels' device; `fill` (3 levels) is the colour the
    geometric ops fill with (timm's: the mean in 0..255)."""

    def __init__(self, fill: Sequence[int]):
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, batch: Augmented) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the pixels' device; the pixels tensor may be overwritten."""
        return self.apply(batch.pixels, plan_batch(batch.params))

    def apply(self, images: torch.Tensor, plan: Plan) -> torch.Tensor:
        if plan.empty:
            return images
        up = _upload(plan, self.fill, images)
        if plan.flipped.any():
            images = torch.where(up.flipped, images.flip(-1), images)
        grid = None
        if plan.affine:  # every position's at once: the coordinates do not depend on the pixels
            grid = ops.affine_grid(up.matrices, up.first_pixels, up.fill_index, up.c)
        for position in range(plan.positions):
            _geometric(images, plan, up, grid, position)
            for group, tensors in zip(plan.colour, up.colour):
                if group.position == position:
                    _colour(images, group, tensors, up.c)
        return images

    def __repr__(self) -> str:
        return f"DeviceAugment(fill={self.fill})"


@dataclass
class _Colour:
    """A ColourGroup on the device: `rows` (n,) int64, `tables` (n, 1, 256) float32, `factors`
    (n, 1, 1, 1) float32, and which samples take the image-dependent ops (bool masks)."""

    rows: torch.Tensor
    tables: torch.Tensor
    factors: torch.Tensor
    auto_contrast: torch.Tensor  # (n, 1, 1)
    equalize: torch.Tensor  # (n, 1, 1)
    contrast: torch.Tensor  # (n, 1, 1, 1)
    sharpness: torch.Tensor  # (n, 1, 1, 1)


@dataclass
class _Uploaded:
    """A Plan's numbers on the device (one copy): `flipped` (B, 1, 1, 1) bool; the fill colour's word
    `fill_word` (1,) int32 and its place `fill_index` () int32 in pillow_ops.pixel_words; the geometric
    groups' N (sample, op) pairs: `matrices` (N, 6) float64 and `first_pixels` (N, 1, 1, 1, 1) int32
    (the place of the sample's first pixel in pixel_words), each group's `affine_rows` (its samples) and
    `affine_pairs` (its slice of the N pairs); the colour groups; the constants `c`."""

    c: ops.Constants
    flipped: torch.Tensor
    fill_word: torch.Tensor
    fill_index: torch.Tensor
    matrices: torch.Tensor
    first_pixels: torch.Tensor
    affine_rows: list[torch.Tensor]
    affine_pairs: list[slice]
    colour: list[_Colour]


def _upload(plan: Plan, fill: Sequence[int], images: torch.Tensor) -> _Uploaded:
    batch, _, height, width = images.shape
    host = HostArrays()
    constants = [host.add(a) for a in ops.host_constants(height, width)]
    flipped = host.add(plan.flipped.reshape(-1, 1, 1, 1))
    fill_word = host.add(np.array([*fill, 0], dtype=np.uint8).view(np.int32))
    fill_index = host.add(np.array(batch * height * width, dtype=np.int32))
    rows = [g.rows for g in plan.affine]
    pairs = np.cumsum([0] + [len(r) for r in rows])
    matrices = host.add(np.concatenate([g.matrices for g in plan.affine] or [np.zeros((0, 6))]))
    first = np.concatenate(rows or [np.zeros(0, np.int64)]) * (height * width)
    first_pixels = host.add(first.astype(np.int32).reshape(-1, 1, 1, 1, 1))
    affine_rows = [host.add(r) for r in rows]
    colour = [[host.add(a) for a in _colour_arrays(g)] for g in plan.colour]
    t = host.upload(images.device)
    return _Uploaded(
        c=ops.Constants(*(t[i] for i in constants)),
        flipped=t[flipped],
        fill_word=t[fill_word],
        fill_index=t[fill_index],
        matrices=t[matrices],
        first_pixels=t[first_pixels],
        affine_rows=[t[i] for i in affine_rows],
        affine_pairs=[slice(a, b) for a, b in zip(pairs[:-1], pairs[1:])],
        colour=[_Colour(*(t[i] for i in arrays)) for arrays in colour],
    )


def _colour_arrays(group: ColourGroup) -> list[np.ndarray]:
    """_Colour's fields on the host, in its order."""
    n = len(group.rows)
    kinds = group.kinds
    return [
        group.rows,
        group.tables.reshape(n, 1, 256),
        group.factors.reshape(n, 1, 1, 1),
        (kinds == "auto_contrast").reshape(n, 1, 1),
        (kinds == "equalize").reshape(n, 1, 1),
        (kinds == "contrast").reshape(n, 1, 1, 1),
        (kinds == "sharpness").reshape(n, 1, 1, 1),
    ]


def _geometric(images: torch.Tensor, plan: Plan, up: _Uploaded, grid, position: int) -> None:
    """The geometric ops at `position`: one resampling per interpolation, from the pixels as they were
    before it (every group reads and writes its own samples only)."""
    words = None
    for group, rows, pairs in zip(plan.affine, up.affine_rows, up.affine_pairs):
        if group.position != position:
            continue
        if words is None:
            words = ops.pixel_words(images, up.fill_word)
        part = ops.AffineGrid(grid.index[pairs], grid.frac[pairs])
        if group.interpolation == "bicubic":
            out = ops.bicubic(words, part, up.c)
        else:
            out = ops.bilinear(words, part)
        images.index_copy_(0, rows, out.permute(0, 3, 1, 2))


def _colour(images: torch.Tensor, group: ColourGroup, t: _Colour, c: ops.Constants) -> None:
    """The colour ops at one position, for all their samples at once: y = each sample's table applied to
    its levels (point ops, AutoContrast, Equalize; the identity for the blends), then blend(degenerate, y,
    factor), whose degenerate is the luma (Color), the mean luma (Contrast) or the smoothed image
    (Sharpness); the table ops have factor 1, which leaves y (clipped) whatever the degenerate."""
    x = images.index_select(0, t.rows)
    n, channels, height, width = x.shape
    levels = x.view(n, channels, height * width).long()
    tables = t.tables.expand(n, channels, 256)
    if group.has("auto_contrast", "equalize"):
        low, high = torch.aminmax(levels, dim=2)
        if group.has("auto_contrast"):
            tables = torch.where(t.auto_contrast, _auto_contrast_tables(x.device)[low, high], tables)
        if group.has("equalize"):
            tables = torch.where(t.equalize, ops.equalize_tables(levels, high, c), tables)
    y = tables.gather(2, levels).view(n, channels, height, width)  # float32 levels
    degenerate = ops.luma(y, c) if group.has("color", "contrast") else y
    if group.has("contrast"):
        degenerate = torch.where(t.contrast, ops.mean_luma(degenerate, c), degenerate)
    if group.has("sharpness"):
        degenerate = torch.where(t.sharpness, ops.smooth(y, c), degenerate)
    images.index_copy_(0, t.rows, ops.blend(degenerate, y, t.factors))


_auto_contrast: dict[torch.device, torch.Tensor] = {}
_auto_contrast_lock = threading.Lock()  # the feeder thread (prefetch.py) and the main thread may both ask


def _auto_contrast_tables(device: torch.device) -> torch.Tensor:
    """pillow_ops.auto_contrast_tables on `device`, made once per process (16 MiB)."""
    with _auto_contrast_lock:
        if device not in _auto_contrast:
            _auto_contrast[device] = ops.auto_contrast_tables(device)
            if device.type == "cuda":  # made on this thread's stream, read from any stream later: once
                torch.cuda.current_stream(device).synchronize()
        return _auto_contrast[device]
