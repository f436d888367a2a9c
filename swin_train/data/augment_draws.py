"""The workers' half of `aug.on_device`: each sample's flip and RandAugment/AutoAugment draws, made by
timm's own objects, handed over with the uint8 crop as numbers for the device to apply (device_augment.py).

Why this way: timm's ops draw their random numbers (op choice, probability, magnitude noise, random
negation, a random interpolation) in Python before they touch the image, in `AugmentOp.__call__` and the
level functions. Copies of timm's ops whose image function is replaced by a recorder make exactly those
draws, from the same seeded generators, and return the image untouched; the flip draws `torch.rand(1)` as
torchvision's RandomHorizontalFlip does. So a sample's draws, and every generator's state after them, are
those of the worker pipeline (tests/test_device_augment.py).

A sample's numbers (`params`, float64): [flipped, then `ROW` numbers per op it applies: kind code (0: no op),
interpolation code, up to six arguments (Pillow's affine coefficients for the geometric ops)].
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Sequence
from typing import NamedTuple

import torch
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment

from swin_train.data.decode import pil_pixels

KINDS = (
    "affine",
    "auto_contrast",
    "equalize",
    "invert",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
)
ROW = 8  # numbers per applied op: kind code (index in KINDS + 1), interpolation code, six arguments
RESAMPLE_NAMES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
INTERPOLATION_CODES = ("bilinear", "bicubic")


def rotate_matrix(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """The affine coefficients Image.rotate(degrees) transforms with (about the centre, no expand), computed
    in Pillow's order of operations so the doubles are the same."""
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    c, d = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return a, b, a * -cx + b * -cy + 0.0 + cx, c, d, c * -cx + d * -cy + 0.0 + cy


# timm's geometric ops (the ones that draw a random interpolation) -> their affine coefficients
_AFFINE = {
    "ShearX": lambda v, w, h: (1.0, v, 0.0, 0.0, 1.0, 0.0),
    "ShearY": lambda v, w, h: (1.0, 0.0, 0.0, v, 1.0, 0.0),
    "TranslateX": lambda v, w, h: (1.0, 0.0, v, 0.0, 1.0, 0.0),
    "TranslateY": lambda v, w, h: (1.0, 0.0, 0.0, 0.0, 1.0, v),
    "TranslateXRel": lambda v, w, h: (1.0, 0.0, v * w, 0.0, 1.0, 0.0),
    "TranslateYRel": lambda v, w, h: (1.0, 0.0, 0.0, 0.0, 1.0, v * h),
    "Rotate": rotate_matrix,
}
# timm's colour ops -> (our kind, their arguments from timm's level arguments)
_COLOUR = {
    "AutoContrast": ("auto_contrast", lambda: ()),
    "Equalize": ("equalize", lambda: ()),
    "Invert": ("invert", lambda: ()),
    "Posterize": ("posterize", lambda bits: (bits,)),
    "PosterizeIncreasing": ("posterize", lambda bits: (bits,)),
    "PosterizeOriginal": ("posterize", lambda bits: (bits,)),
    "Solarize": ("solarize", lambda thresh: (thresh,)),
    "SolarizeIncreasing": ("solarize", lambda thresh: (thresh,)),
    "SolarizeAdd": ("solarize_add", lambda add, thresh=128: (add, thresh)),  # timm's default threshold
    "Color": ("color", lambda f: (f,)),
    "ColorIncreasing": ("color", lambda f: (f,)),
    "Contrast": ("contrast", lambda f: (f,)),
    "ContrastIncreasing": ("contrast", lambda f: (f,)),
    "Brightness": ("brightness", lambda f: (f,)),
    "BrightnessIncreasing": ("brightness", lambda f: (f,)),
    "Sharpness": ("sharpness", lambda f: (f,)),
    "SharpnessIncreasing": ("sharpness", lambda f: (f,)),
    "Desaturate": ("color", lambda f: (min(1.0, max(0.0, 1.0 - f)),)),  # timm's desaturate, as it computes it
}
SUPPORTED_OPS = frozenset(_AFFINE) | frozenset(_COLOUR)


class UnsupportedOnDevice(ValueError):
    """A train transform whose augmentation the device does not apply; the message says which step."""


class Augmented(NamedTuple):
    """A sample (or, collated, a batch) for the device to finish: uint8 pixels (3, H, W) or (B, 3, H, W) and
    the draws to apply to them, (P,) or (B, P) float64."""

    pixels: torch.Tensor
    params: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Augmented:
        """The pixels on `device`; the params stay in host memory, where the device half reads them to
        group the samples by op without waiting for the device."""
        return Augmented(self.pixels.to(device, non_blocking=non_blocking), self.params)


def _record(log: list, name: str, image, *args, **kwargs):
    """Stands in for a timm op's image function: logs what it was called with, makes the one draw the
    geometric ops make inside (a random interpolation), returns the image untouched."""
    resample = kwargs.get("resample")
    if name in _AFFINE and isinstance(resample, list | tuple):  # timm's _interpolation()
        resample = random.choice(resample)
    log.append((name, args, resample))
    return image


def op_row(name: str, args: Sequence[float], resample, width: int, height: int) -> list[float]:
    """The ROW numbers the device applies for one recorded op."""
    if name in _AFFINE:
        coefficients = _AFFINE[name](args[0], width, height)
        return [1.0, float(INTERPOLATION_CODES.index(RESAMPLE_NAMES[resample])), *coefficients]
    kind, arguments = _COLOUR[name]
    values = arguments(*args)
    return [float(KINDS.index(kind) + 1), 0.0, *values] + [0.0] * (ROW - 2 - len(values))


def _augment_ops(augment) -> list:
    if isinstance(augment, RandAugment):
        return list(augment.ops)
    return [op for sub_policy in augment.policy for op in sub_policy]


def check_augment(augment) -> None:
    """Raise UnsupportedOnDevice unless every op of a timm RandAugment/AutoAugment is one the device
    applies, with a bilinear or bicubic interpolation and one fill colour."""
    if not isinstance(augment, RandAugment | AutoAugment):
        raise UnsupportedOnDevice(f"{type(augment).__name__} is not applied on the device")
    ops = _augment_ops(augment)
    unknown = sorted({op.name for op in ops} - SUPPORTED_OPS)
    if unknown:
        raise UnsupportedOnDevice(f"the device does not apply the augmentation op(s) {', '.join(unknown)}")
    for op in ops:
        resample = op.kwargs.get("resample")
        choices = resample if isinstance(resample, list | tuple) else [resample]
        if op.name in _AFFINE and not all(r in RESAMPLE_NAMES for r in choices):
            raise UnsupportedOnDevice("the device's geometric ops interpolate bilinear or bicubic only")
    if len({tuple(op.kwargs.get("fillcolor", ())) for op in ops}) > 1:
        raise UnsupportedOnDevice("the augmentation ops fill with different colours")


class AugmentDraws:
    """The last step of a train chain with `aug.on_device`: a uint8 (3, H, W) tensor or an RGB Pillow image
    in, `Augmented(pixels, params)` out, params holding this sample's flip and `augment` draws.

    `flip`: torchvision's RandomHorizontalFlip (or None); `augment`: timm's RandAugment/AutoAugment (or
    None), left untouched: its ops are copied with their image functions replaced by a recorder."""

    def __init__(self, flip=None, augment=None):
        self.flip_p = None if flip is None else float(flip.p)
        self.log: list = []
        self.augment = None
        self.layers, self.fill = 0, (0, 0, 0)
        if augment is not None:
            check_augment(augment)
            self.augment = copy.copy(augment)
            recorded = {}
            for op in _augment_ops(augment):
                twin = recorded[id(op)] = copy.copy(op)
                twin.aug_fn = functools.partial(_record, self.log, op.name)
            if isinstance(augment, RandAugment):
                self.augment.ops = [recorded[id(op)] for op in augment.ops]
                self.layers = augment.num_layers
            else:
                self.augment.policy = [[recorded[id(op)] for op in sp] for sp in augment.policy]
                self.layers = max(len(sp) for sp in augment.policy)
            self.fill = tuple(int(v) for v in _augment_ops(augment)[0].kwargs["fillcolor"])

    @property
    def num_params(self) -> int:
        return 1 + ROW * self.layers

    def draw(self, width: int, height: int) -> torch.Tensor:
        """This sample's (num_params,) float64 draws for an image of `width` x `height`, drawn from the
        global generators in the order the worker pipeline draws them."""
        params = [0.0]
        if self.flip_p is not None:
            params[0] = float(torch.rand(1) < self.flip_p)  # torchvision's RandomHorizontalFlip
        if self.augment is not None:
            self.log.clear()
            self.augment(None)  # the recorders ignore the image
            for name, args, resample in self.log:
                params += op_row(name, args, resample, width, height)
        params += [0.0] * (self.num_params - len(params))  # ops skipped by their probability
        return torch.tensor(params, dtype=torch.float64)

    def __call__(self, image: torch.Tensor | Image.Image) -> Augmented:
        if isinstance(image, Image.Image):
            image = pil_pixels(image)
        return Augmented(image, self.draw(image.shape[2], image.shape[1]))

    def __repr__(self) -> str:
        return (
            f"AugmentDraws(flip={self.flip_p}, augment={type(self.augment).__name__}, layers={self.layers})"
        )
