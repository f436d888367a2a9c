"""Pillow's augmentation ops, as timm's RandAugment applies them to an RGB image, as blocks that work on
batches of uint8 tensors with per-sample arguments on any device (`aug.on_device`; device_augment.py runs
them a whole op position of a batch at a time).

Why our own: torchvision's and kornia's tensor ops are different ops (bicubic with a = -0.75 instead of
Pillow's a = -1 in its affine transforms, rounding instead of truncation, other luma weights, blurs with
other borders), so augmenting with them would change the recipe's distribution. Here each op follows
Pillow's C code step by step: the same coordinates (double), the same kernel and clamping at the edges, the
same float32 blends and truncation, the same integer histograms. On a CPU the results are bitwise Pillow's
(tests/test_device_augment.py, every op on photographs); a GPU computes the same expressions, and any
difference there would come from the GPU's float arithmetic (`scripts/gpu_check.py` compares it).

How the ops share launches: a colour op is a 256-level table per channel or a blend. The tables that do not
depend on the image (Invert, Posterize, Solarize, SolarizeAdd, Brightness) are made on the host in numpy's
float32 (the same IEEE operations: `point_tables`); AutoContrast's depends only on a channel's lowest and
highest level, so all 65536 are made once (`auto_contrast_tables`); Equalize's come from the histograms.
Color, Contrast and Sharpness blend with a degenerate image (`luma`, `mean_luma`, `smooth`, `blend`). The
geometric ops resample at per-sample affine coordinates, which do not depend on the pixels (`affine_grid`
once for every op position, then `bicubic` or `bilinear` per position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Pillow's luma (Convert.c L24): (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
_LUMA = (19595, 38470, 7471)
# ImageFilter.SMOOTH: a 3x3 kernel of ones with 5 at the centre, divided by 13 in float32
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
# Pillow's BICUBIC macro (a = -1) as a matrix: (v1, v2, v3, v4) @ _CUBIC = (p1, p2, p3, p4) with p1 = v2,
# p2 = -v1 + v3, p3 = 2 (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4
_CUBIC = ((0, -1, 2, -1), (1, 0, -2, 1), (0, 1, 1, -1), (0, 0, -1, 1))


class Constants(NamedTuple):
    """The small tensors the blocks read, for images of one size (numpy on the host, `host_constants`;
    tensors on the device once uploaded)."""

    xs: torch.Tensor  # (1, 1, 1, W) float64: the output pixels' centres, x + 0.5
    ys: torch.Tensor  # (1, 1, H, 1) float64
    size: torch.Tensor  # (1, 2, 1, 1) float64: W, H
    zero: torch.Tensor  # () int32
    last: torch.Tensor  # (1, 2, 1, 1, 1) int32: W - 1, H - 1
    taps: torch.Tensor  # (4,) int32: the bicubic neighbours' offsets -1, 0, 1, 2
    cubic: torch.Tensor  # (4, 4) float32: _CUBIC
    two_one: torch.Tensor  # (2, 1) float64
    levels: torch.Tensor  # (256,) int64
    one: torch.Tensor  # () int64
    luma_weights: torch.Tensor  # (1, 3, 1, 1) float32
    smooth_kernel: torch.Tensor  # (3, 3) float32
    pixels: torch.Tensor  # () float64: H * W


def host_constants(height: int, width: int) -> Constants:
    smooth = np.array(_SMOOTH, dtype=np.float32) / np.float32(13.0)
    return Constants(
        xs=(np.arange(width, dtype=np.float64) + 0.5).reshape(1, 1, 1, width),
        ys=(np.arange(height, dtype=np.float64) + 0.5).reshape(1, 1, height, 1),
        size=np.array([width, height], dtype=np.float64).reshape(1, 2, 1, 1),
        zero=np.array(0, dtype=np.int32),
        last=np.array([width - 1, height - 1], dtype=np.int32).reshape(1, 2, 1, 1, 1),
        taps=np.array([-1, 0, 1, 2], dtype=np.int32),
        cubic=np.array(_CUBIC, dtype=np.float32),
        two_one=np.array([[2.0], [1.0]]),
        levels=np.arange(256, dtype=np.int64),
        one=np.array(1, dtype=np.int64),
        luma_weights=np.array(_LUMA, dtype=np.float32).reshape(1, 3, 1, 1),
        smooth_kernel=smooth[::-1].copy(),  # [u]: the window's line u from the top, Pillow's row 2 - u
        pixels=np.array(height * width, dtype=np.float64),
    )


# --- tables (the point ops) -------------------------------------------------------------------------------


def point_tables(kinds: Sequence[str], args: np.ndarray) -> np.ndarray:
    """(n, 256) float32: each sample's table for its op `kinds[i]` when that table does not depend on the
    image (invert, posterize, solarize, solarize_add, brightness), else the identity; `args` (n, >= 2)."""
    levels = np.arange(256, dtype=np.int64)
    tables = np.tile(levels.astype(np.float32), (len(kinds), 1))
    kinds = np.asarray(kinds)
    for kind, table in _POINT.items():
        rows = np.flatnonzero(kinds == kind)
        if rows.size:
            tables[rows] = table(levels, args[rows, 0:1], args[rows, 1:2])
    return tables


def _posterize(levels, bits, _):
    """Keep the high `bits` of each level; 0 bits is black (timm's patched op), >= 8 the image."""
    keep = np.clip(bits.astype(np.int64), 0, 8)  # the draws are integers; as torch's .long() would
    return levels & ((255 << (8 - keep)) & 255)


def _brightness(levels, factor, _):
    """ImageEnhance.Brightness: `blend` with black, in float32 as Pillow's Blend.c."""
    alpha, base = factor.astype(np.float32), np.float32(0.0)
    return np.trunc(np.clip(base + alpha * (levels.astype(np.float32) - base), 0, 255))


_POINT = {
    "invert": lambda levels, _, __: 255 - levels,
    "posterize": _posterize,
    # ImageOps.solarize: levels >= threshold are inverted
    "solarize": lambda levels, threshold, _: np.where(levels < threshold, levels, 255 - levels),
    # timm's solarize_add: levels below the threshold get `add` more, at most 255
    "solarize_add": lambda levels, add, threshold: np.where(
        levels < threshold, np.minimum(levels + add.astype(np.int64), 255), levels
    ),
    "brightness": _brightness,
}


def auto_contrast_tables(device: torch.device) -> torch.Tensor:
    """(256, 256, 256) uint8 [lo, hi, level]: ImageOps.autocontrast's table for a channel whose levels run
    from lo to hi: int(level * scale + offset) in double, clipped, with scale = 255 / (hi - lo) and
    offset = -lo * scale; a channel with one level (hi <= lo) keeps it."""
    lo = torch.arange(256, device=device).view(256, 1, 1)
    hi = torch.arange(256, device=device).view(1, 256, 1)
    # a tensor numerator: torch computes number / tensor as a reciprocal times the number (not IEEE division)
    scale = torch.full((), 255.0, dtype=torch.float64, device=device) / (hi - lo).clamp(min=1)
    offset = -lo.double() * scale
    levels = torch.arange(256, dtype=torch.float64, device=device)
    table = (levels * scale).add_(offset).trunc_().clamp_(0, 255)
    return torch.where(hi <= lo, levels, table).to(torch.uint8)


def equalize_tables(levels: torch.Tensor, top: torch.Tensor, c: Constants) -> torch.Tensor:
    """ImageOps.equalize's tables (n, 3, 256) int64 for `levels` (n, 3, H*W) int64 whose highest level per
    channel is `top` (n, 3): step = (pixels - count of the top level) // 255; level i maps to
    (step // 2 + pixels below i) // step, which can pass 255 (Image.point clips it; so does the caller);
    one level in use or step 0: unchanged (one level in use means step 0)."""
    n, channels, _ = levels.shape
    hist = torch.zeros(n, channels, 256, dtype=torch.int64, device=levels.device)
    hist.scatter_add_(2, levels, c.one.expand_as(levels))
    below = F.pad(hist[..., :-1], (1, 0)).cumsum(2)  # pixels below each level
    step = below.gather(2, top.unsqueeze(2)) // 255  # below the top level: all pixels but the top's
    table = (below + step // 2) // step.clamp(min=1)
    return torch.where(step == 0, c.levels, table)


# --- blends (Color, Contrast, Sharpness) ---------------------------------------------------------------------


def luma(images: torch.Tensor, c: Constants) -> torch.Tensor:
    """(n, 1, H, W) float32 levels: Image.convert("L") of RGB `images` (n, 3, H, W) float32 levels. Every
    product and sum is an integer below 2**24, so float32 holds it exactly, summed in any order."""
    weighted = (images * c.luma_weights).sum(1, keepdim=True)
    return torch.div(weighted + 0x8000, 0x10000, rounding_mode="floor")


def mean_luma(luma_levels: torch.Tensor, c: Constants) -> torch.Tensor:
    """(n, 1, 1, 1) float32: ImageEnhance.Contrast's degenerate level, int(mean luma + 0.5) (a positive
    number); the division is tensor / tensor: IEEE."""
    mean = luma_levels.sum((1, 2, 3), keepdim=True, dtype=torch.float64) / c.pixels
    return (mean + 0.5).floor_().float()


def smooth(images: torch.Tensor, c: Constants) -> torch.Tensor:
    """image.filter(ImageFilter.SMOOTH) of (n, 3, H, W) float32 levels, as Filter.c's 3x3 filter: float32
    weights k / 13, each line's three products summed left to right, the lines below, at and above the pixel
    added in that order onto 0.5, truncated; the border rows and columns are copied."""
    out = images.clone()
    if images.shape[2] < 3 or images.shape[3] < 3:
        return out
    windows = images.unfold(2, 3, 1).unfold(3, 3, 1)  # (n, 3, H-2, W-2, line u, column v): views
    products = windows * c.smooth_kernel
    lines = (products[..., 0] + products[..., 1]) + products[..., 2]  # (n, 3, H-2, W-2, u)
    total = out[:, :, 1:-1, 1:-1]
    torch.add(lines[..., 2], 0.5, out=total)  # Pillow adds the kernel's first row times the line below
    total.add_(lines[..., 1]).add_(lines[..., 0])
    total.clamp_(0, 255).trunc_()
    return out


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, images, factor) (the ImageEnhance ops) of float32 levels: degenerate +
    factor * (images - degenerate) in float32 (two roundings, as Blend.c), clipped to 0..255 and truncated
    to uint8. `factor` (n, 1, 1, 1) float32; with factor 1 the result is `images` clipped, exactly (integer
    levels: both roundings are exact)."""
    out = (images - degenerate).mul_(factor).add_(degenerate)
    return out.clamp_(0, 255).to(torch.uint8)


# --- geometric ops (Image.transform AFFINE) ----------------------------------------------------------------


class AffineGrid(NamedTuple):
    """Where each output pixel of N (sample, op) pairs reads its input. `index` (N, H, W, 4, 4) int32: the
    4 x 4 neighbours Pillow's bicubic filter reads (rows, then columns; clamped to the image as Pillow
    repeats its edges), as positions in `pixel_words`, or all the fill colour's word for a pixel whose source
    falls outside the image; `frac` (N, 2, H, W) float64: the x and y fractions of the source position."""

    index: torch.Tensor
    frac: torch.Tensor


def affine_grid(
    matrices: torch.Tensor, rows: torch.Tensor, fill_index: torch.Tensor, c: Constants
) -> AffineGrid:
    """The grid of Image.transform(size, AFFINE, matrix) for `matrices` (N, 6) float64 of the batch's images
    `rows` (N, 1, 1, 1, 1) int32 (their first pixel in `pixel_words`): output pixel (x, y) samples the input
    at matrix . (x + 0.5, y + 0.5, 1), as Geometry.c's affine_transform; `fill_index` () int32: the fill's word."""
    n = matrices.shape[0]
    a = matrices.view(n, 2, 3, 1, 1)
    source = a[:, :, 0] * c.xs + a[:, :, 1] * c.ys  # (N, 2, H, W): x then y
    source += a[:, :, 2]
    inside = ((source >= 0) & (source < c.size)).all(1)  # Pillow fills the others
    source -= 0.5
    whole = source.floor()
    frac = source.sub_(whole)
    taps = (whole.int().unsqueeze(4) + c.taps).clamp_(c.zero, c.last)  # (N, 2, H, W, 4)
    index = taps[:, 1].unsqueeze(4) * c.xs.shape[3] + taps[:, 0].unsqueeze(3)  # (N, H, W, 4, 4)
    index += rows
    return AffineGrid(torch.where(inside.view(*inside.shape, 1, 1), index, fill_index), frac)


def pixel_words(images: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B*H*W + 1,) int32: each pixel's three levels (padded to four bytes) as one word, so one gather reads
    a pixel, then the fill colour's word. `images` (B, 3, H, W) uint8, `fill` (1,) int32."""
    words = F.pad(images.permute(0, 2, 3, 1), (0, 1)).contiguous().view(torch.int32)
    return torch.cat([words.view(-1), fill])


def bicubic(words: torch.Tensor, grid: AffineGrid, c: Constants) -> torch.Tensor:
    """(n, H, W, 3) uint8: Pillow's bicubic filter (a = -1) at `grid`, clipped and truncated as Pillow's
    cast; the 4 x 4 neighbours of every pixel are read in one gather. The first pass (along x) takes the
    p's of the BICUBIC macro from a matrix product (integers below 2**11 and their sums: exact in float32,
    even with TF32); the rest follows the macro's order of operations in double."""
    n, h, w = grid.index.shape[:3]
    taps = words.index_select(0, grid.index.view(-1)).view(torch.uint8).view(n, h, w, 4, 4, 4)
    v = taps[..., :3].permute(0, 1, 2, 3, 5, 4).to(torch.float32, memory_format=torch.contiguous_format)
    p = (v.view(-1, 4) @ c.cubic).view(n, h, w, 4, 3, 4)  # (N, H, W, row, channel, p1..p4)
    dx, dy = grid.frac[:, 0].view(n, h, w, 1, 1), grid.frac[:, 1].view(n, h, w, 1)
    # p1 + d * (p2 + d * (p3 + d * p4)), one rounding per operation as in C
    rows = (p[..., 3] * dx).add_(p[..., 2]).mul_(dx).add_(p[..., 1]).mul_(dx).add_(p[..., 0])  # (n,H,W,4,3)
    return _cubic_doubles(rows, dy, c).clamp_(0, 255).to(torch.uint8)


def _cubic_doubles(v: torch.Tensor, d: torch.Tensor, c: Constants) -> torch.Tensor:
    """The BICUBIC macro along axis -2 of doubles `v` (..., 4, C) with Pillow's roundings: p2 = v3 - v1,
    p3 = (2 (v1 - v2) + v3) - v4, p4 = ((v2 - v1) - v3) + v4, then p1 + d (p2 + d (p3 + d p4)). Negation is
    exact, so with e = v1 - v2: p4 = -((e + v3) - v4), p3 + d p4 = p3 - d (-p4) and p2 + t = t - (v1 - v3):
    the same roundings from fewer launches."""
    differences = v[..., :1, :] - v[..., 1:3, :]  # (..., 2, C): e, and v1 - v3 = -p2
    sums = differences[..., :1, :] * c.two_one  # 2e, e
    sums += v[..., 2:3, :]
    sums -= v[..., 3:4, :]  # p3, -p4
    inner = sums[..., 0, :] - sums[..., 1, :] * d  # p3 + d p4
    return inner.mul_(d).sub_(differences[..., 1, :]).mul_(d).add_(v[..., 1, :])


def bilinear(words: torch.Tensor, grid: AffineGrid) -> torch.Tensor:
    """(n, H, W, 3) uint8: Pillow's bilinear filter at `grid` (its middle 2 x 2 neighbours): a + (b - a) d
    along x, then along y, in double."""
    n, h, w = grid.index.shape[:3]
    index = grid.index[..., 1:3, 1:3].reshape(-1)
    taps = words.index_select(0, index).view(torch.uint8).view(n, h, w, 2, 2, 4)[..., :3].double()
    dx, dy = grid.frac[:, 0].view(n, h, w, 1, 1), grid.frac[:, 1].view(n, h, w, 1)
    rows = (taps[..., 1, :] - taps[..., 0, :]).mul_(dx).add_(taps[..., 0, :])  # (n, H, W, 2, 3)
    out = (rows[..., 1, :] - rows[..., 0, :]).mul_(dy).add_(rows[..., 0, :])
    return out.clamp_(0, 255).to(torch.uint8)
