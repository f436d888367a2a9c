"""Pillow's augmentation ops, as timm's RandAugment applies them to an RGB image, on batches of uint8
tensors with per-sample parameters, on any device (`aug.on_device`).

Why our own: torchvision's and kornia's tensor ops are different ops (bicubic with a = -0.75 instead of
Pillow's a = -1 in its affine transforms, rounding instead of truncation, other luma weights, blurs with
other borders), so augmenting with them would change the recipe's distribution. Here each op follows
Pillow's C code step by step: the same coordinates (double), the same kernel and clamping at the edges, the
same float32 blends and truncation, the same integer histograms. On a CPU the results are bitwise Pillow's
(tests/test_device_augment.py, every op on photographs); a GPU computes the same expressions, and any
difference there would come from the GPU's float arithmetic (`scripts/gpu_check.py` compares it).

Every function takes `images` (n, 3, H, W) uint8 and per-sample arguments as (n,) or (n, k) tensors on the
images' device, and returns a new (n, 3, H, W) uint8 tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Pillow's luma (Convert.c L24): (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16
_LUMA = (19595, 38470, 7471)
# ImageFilter.SMOOTH: a 3x3 kernel of ones with 5 at the centre, divided by 13 in float32
_SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))


def _taps(
    images: torch.Tensor, rows: list[torch.Tensor], cols: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """taps[j][i]: the pixels at (rows[j], cols[i]) as (n, H, W, 3) int32, from (n, H, W) int64 row and
    column indices, clamped (Pillow repeats the edge pixels beyond the image). A pixel's three levels are
    gathered as one 32-bit word (channels last, padded to four)."""
    n, c, h, w = images.shape
    words = F.pad(images.permute(0, 2, 3, 1), (0, 4 - c)).contiguous().view(torch.int32).view(n, h * w)
    offsets = [r.clamp(0, h - 1) * w for r in rows]
    cols = [x.clamp(0, w - 1) for x in cols]

    def levels(index: torch.Tensor) -> torch.Tensor:
        gathered = words.gather(1, index.view(n, h * w))  # (n, H*W) words
        return gathered.view(torch.uint8).view(n, h, w, 4)[..., :c].int()

    return [[levels(o + x) for x in cols] for o in offsets]


def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC macro (a = -1): p1 + d * (p2 + d * (p3 + d * p4)) with p2 = -v1 + v3,
    p3 = 2 (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4, in its order of operations (in place, one
    rounding per operation as in C). From pixel values the p's are exact integers, converted once."""
    p2 = v3 - v1
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    p4 = (v2 - v1).sub_(v3).add_(v4)
    p1 = v2
    if not p1.is_floating_point():
        p1, p2, p3, p4 = p1.double(), p2.double(), p3.double(), p4.double()
    return p4.mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(p1)


def _bicubic(images, x, y, dx, dy):
    taps = _taps(images, [y + j for j in (-1, 0, 1, 2)], [x + i for i in (-1, 0, 1, 2)])
    return _cubic(*(_cubic(*row, dx) for row in taps), dy)


def _bilinear(images, x, y, dx, dy):
    def lerp(a, b, d):
        return a + (b - a) * d  # a and b: the pixels' exact values or doubles, as in Pillow's macro

    (a, b), (c, e) = _taps(images, [y, y + 1], [x, x + 1])
    return lerp(lerp(a, b, dx), lerp(c, e, dx), dy)


def affine(
    images: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor, interpolation: str
) -> torch.Tensor:
    """Image.transform(size, AFFINE, matrix, resample, fillcolor=fill) per sample: output pixel (x, y)
    samples the input at matrix . (x + 0.5, y + 0.5, 1); samples that land outside the image take `fill`.
    `matrix` (n, 6) float64, `fill` (3,) uint8, `interpolation` "bicubic" or "bilinear"."""
    n, _, h, w = images.shape
    a = matrix.view(n, 6, 1, 1)
    xs = torch.arange(w, dtype=torch.float64, device=images.device).view(1, 1, w) + 0.5  # (1, 1, W)
    ys = torch.arange(h, dtype=torch.float64, device=images.device).view(1, h, 1) + 0.5  # (1, H, 1)
    xin = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]  # (n, H, W), as Geometry.c's affine_transform
    yin = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x, y = xin.floor(), yin.floor()
    dx, dy = (xin - x).unsqueeze(3), (yin - y).unsqueeze(3)  # (n, H, W, 1): channels last
    x, y = x.long(), y.long()
    sample = _bicubic if interpolation == "bicubic" else _bilinear
    values = sample(images, x, y, dx, dy).clamp_(0, 255).to(torch.uint8)  # truncation, as Pillow's cast
    out = torch.where(inside.unsqueeze(3), values, fill.view(1, 1, 1, 3))  # (n, H, W, 3)
    return out.permute(0, 3, 1, 2).contiguous()


def apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Image.point: `lut` (n, 3, 256) of values in 0..255 maps every channel's levels."""
    n, c, h, w = images.shape
    out = lut.to(torch.uint8).gather(2, images.reshape(n, c, h * w).long())
    return out.view(n, c, h, w)


def histogram(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, 256) int64: how many pixels of each channel have each level."""
    n, c, h, w = images.shape
    counts = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device)
    levels = images.reshape(n * c, h * w).long()
    return counts.scatter_add_(1, levels, torch.ones_like(levels)).view(n, c, 256)


def _levels(images: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=images.device)


def invert(images: torch.Tensor) -> torch.Tensor:
    return 255 - images


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the `bits` (n,) high bits of each level; 0 bits is black (timm's patched op), >= 8 the image."""
    keep = bits.long().clamp(0, 8).view(-1, 1, 1, 1)
    mask = (255 << (8 - keep)) & 255  # 0 bits: mask 0
    return images & mask.to(torch.uint8)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Levels >= threshold (n,) are inverted (ImageOps.solarize)."""
    return torch.where(images.long() < threshold.view(-1, 1, 1, 1), images, 255 - images)


def solarize_add(images: torch.Tensor, add: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: levels below threshold get `add` more, at most 255."""
    levels = images.long()
    added = (levels + add.long().view(-1, 1, 1, 1)).clamp(max=255)
    return torch.where(levels < threshold.view(-1, 1, 1, 1), added, levels).to(torch.uint8)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast(image): each channel's used range stretched to 0..255 by a lookup table of
    int(level * scale + offset) in double, clipped; a channel with one level stays as it is."""
    hist = histogram(images)  # (n, 3, 256)
    used = hist > 0
    lo = used.int().argmax(2)  # (n, 3): the first level in use
    hi = 255 - used.flip(2).int().argmax(2)
    # a tensor numerator: torch computes number / tensor as a reciprocal times the number (not IEEE division)
    scale = torch.full(hi.shape, 255.0, dtype=torch.float64, device=hi.device) / (hi - lo).clamp(min=1)
    offset = -lo.double() * scale
    levels = _levels(images).double()
    lut = (levels * scale.unsqueeze(2) + offset.unsqueeze(2)).trunc().clamp(0, 255)
    identity = (hi <= lo).unsqueeze(2)
    return apply_lut(images, torch.where(identity, levels, lut))


def equalize(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize(image): per channel, step = (pixels - count of the highest level in use) // 255;
    level i maps to (step // 2 + pixels below i) // step; one level in use or step 0: unchanged."""
    hist = histogram(images)  # (n, 3, 256)
    used = hist > 0
    top = 255 - used.flip(2).int().argmax(2, keepdim=True)  # the highest level in use
    step = (hist.sum(2, keepdim=True) - hist.gather(2, top)) // 255  # (n, 3, 1)
    below = hist.cumsum(2) - hist  # pixels below each level
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    unchanged = (used.sum(2, keepdim=True) <= 1) | (step == 0)
    return apply_lut(images, torch.where(unchanged, _levels(images).expand_as(lut), lut))


def luma(images: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) uint8: Image.convert("L") of RGB images (integer weights, rounded)."""
    r, g, b = images.int().unbind(1)
    return ((r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, images, factor) (the ImageEnhance ops): degenerate + factor * (images -
    degenerate) in float32 with factor rounded to float32, clipped to 0..255 and truncated. `degenerate`
    broadcasts to images; `factor` (n,)."""
    alpha = factor.float().view(-1, 1, 1, 1)
    base = degenerate.float()
    out = base + alpha * (images.float() - base)  # two float32 roundings, as Blend.c
    return out.clamp_(0, 255).to(torch.uint8)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the image's luma."""
    return blend(luma(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the mean luma, int(mean + 0.5)."""
    n, _, h, w = images.shape
    pixels = torch.full(
        (n,), float(h * w), dtype=torch.float64, device=images.device
    )  # tensor / tensor: IEEE
    mean = luma(images).view(n, -1).sum(1).double() / pixels
    degenerate = (mean + 0.5).floor().view(n, 1, 1, 1)  # int() of a positive number
    return blend(degenerate, images, factor)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return blend(torch.zeros((), dtype=torch.uint8, device=images.device), images, factor)


def smooth(images: torch.Tensor) -> torch.Tensor:
    """image.filter(ImageFilter.SMOOTH), as Filter.c's 3x3 filter: float32 weights k / 13, each row's three
    products summed left to right onto 0.5 (rows below, at, above the pixel), truncated; the border rows
    and columns are copied."""
    n, c, h, w = images.shape
    if h < 3 or w < 3:
        return images.clone()
    weights = torch.tensor(_SMOOTH, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    x = images.float()
    total = torch.full((n, c, h - 2, w - 2), 0.5, dtype=torch.float32, device=images.device)
    for row, dy in enumerate((2, 1, 0)):  # Pillow adds the kernel's first row times the line below
        line = x[:, :, dy : dy + h - 2]
        k = [float(v) for v in weights[row]]
        total += line[..., 0 : w - 2] * k[0] + line[..., 1 : w - 1] * k[1] + line[..., 2:w] * k[2]
    out = images.clone()
    out[:, :, 1:-1, 1:-1] = total.clamp_(0, 255).to(torch.uint8)
    return out


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
    return blend(smooth(images), images, factor)
