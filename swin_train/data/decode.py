"""Decode only what a transform needs (`data.fast_decode`): the crop is chosen on the image's header, then
the file is decoded and resized to the output once.

Why our own: timm's train transform decodes every pixel with Pillow, crops, and resizes with Pillow; its
eval transform resizes the whole image before cropping. Here (measured in the loader benchmark, see
README):
- the random-resized crop draws its box with timm's own `get_params` on the header's size (the same
  random draws, so the same boxes as the full path), and the eval transform computes timm's resize and
  center crop on it;
- JPEGs are decoded by libjpeg-turbo through TorchCodec (jpeg.py: the same pixels as Pillow's, without
  Pillow's copy into an array), or, where the crop covers at least four times the output
  size in both directions, by Pillow at a reduced DCT scale (`Image.draft`: 1/2, 1/4 or 1/8) that leaves
  the resize at least a 2x shrink. Measured (README): at ImageNet's bitrates entropy decoding, which no
  DCT scale skips, is most of the time (1/2 saved 11%, 1/4 26% on 2400x1800 photos), and a DCT-scaled
  image followed by a mild resize differs from full decode + bicubic far more (25-36 dB PSNR) than one
  the bicubic filter still shrinks (35-44 dB); ImageNet-sized images never qualify;
- the resize runs on uint8 tensors (`torch.nn.functional.interpolate` with antialias: the same
  Pillow-style filters, vectorised) instead of Pillow's resize.
Other formats, and images already decoded (the decoded-image cache, Hugging Face rows), take the same
crop and resize from their pixels.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from swin_train.data.jpeg import decode_jpeg, jpeg_decoder

# timm's names of the interpolations torch resizes with antialias as Pillow does; others go to Pillow
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic"}
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DCT_SCALES = (8, 4, 2)  # what libjpeg (through Pillow's draft) can divide a JPEG's sides by


class UndecodableImage(Exception):
    """An image whose header was read but whose data cannot be decoded; `cause` is the decoder's error."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class Encoded:
    """An image file's bytes and its parsed header (a Pillow image not yet loaded), decoded only when a
    transform knows which part and size it needs. Used once: decoding loads `header`."""

    data: bytes
    header: Image.Image
    name: str = ""  # the file (or shard member) it came from, for errors raised after the worker

    @property
    def size(self) -> tuple[int, int]:
        return self.header.size


def open_encoded(data: bytes, name: str = "") -> Encoded:
    """Parse the header of an image file's bytes; raises what Image.open raises for a bad file."""
    return Encoded(data, Image.open(io.BytesIO(data)), name)


def dct_scale(image_size: tuple[int, int], need: tuple[float, float]) -> int:
    """The largest factor in DCT_SCALES (or 1) to divide an image of `image_size` (w, h) by, when its region
    is `need` = (w, h) times the output size: the resize after it must still shrink by 2x or more."""
    for s in DCT_SCALES:
        if min(need) >= 2 * s and min(image_size) >= s:
            return s
    return 1


# 16-bit grayscale as Pillow opens it: PNG and TIFF as I;16 (any byte order), 16-bit PGM as I
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` in RGB, as every reader of files hands it over. 16-bit grayscale keeps the high byte of each
    value, as Pillow reads 16-bit RGB PNGs and torchvision converts uint16 to uint8: Pillow's own
    convert("RGB") clips its values at 255, which turns such an image white. Decodes a lazy image (a
    truncated file fails here), so the result no longer needs its file."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)  # uint16 (I;16*) or int32 (I)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def pil_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 view of an RGB copy of `image` (channels-last memory)."""
    image = rgb_image(image)
    # a writable buffer (np.asarray of a Pillow image is read-only, which torch warns about)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.size[1], image.size[0], 3).permute(2, 0, 1)


def decode_pixels(image: Encoded | Image.Image, scale: int = 1) -> tuple[torch.Tensor, float]:
    """((3, H, W) uint8 RGB pixels, the factor the full-size sides were divided by). `scale` > 1 asks a
    JPEG for a reduced DCT scale. Decoding errors raise UndecodableImage."""
    if isinstance(image, Image.Image):
        return pil_pixels(image), 1.0
    header = image.header
    try:
        if header.format == "JPEG" and scale > 1:
            width, height = header.size
            drafted = header.draft("RGB", (width // scale, height // scale))
            # draft's box is the full image in reduced coordinates: width / its width is the factor
            return pil_pixels(header), 1.0 if drafted is None else width / drafted[1][2]
        if header.format == "JPEG" and jpeg_decoder() != "pillow":
            return decode_jpeg(image.data), 1.0
        return pil_pixels(header), 1.0
    except RuntimeError as e:  # "<function>, <source file>:<line>, <libjpeg's message>" (jpeg.py)
        raise UndecodableImage(ValueError(str(e).split(", ", 2)[-1])) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImage(e) from None


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, H, W) uint8 with `size` = (H, W): torch's antialiased uint8 kernels for
    bilinear and bicubic (Pillow's filters), Pillow itself for the other interpolations."""
    if tuple(pixels.shape[1:]) == tuple(size):
        return pixels
    mode = _TORCH_MODES.get(interpolation)
    if mode is not None:
        batch = pixels.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # (1, 3, h, w)
        return F.interpolate(batch, size=size, mode=mode, antialias=True)[0]
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
    resized = image.resize((size[1], size[0]), _PIL_FILTERS[interpolation])
    return torch.from_numpy(np.asarray(resized)).permute(2, 0, 1)


def crop_resize(
    pixels: torch.Tensor,
    box: tuple[int, int, int, int],
    factor: float,
    size: tuple[int, int],
    interpolation: str,
) -> torch.Tensor:
    """The full-size `box` (top, left, height, width) of an image decoded at 1/`factor` of its size, resized
    to `size` (H, W). At full size, the box's pixels (resize_pixels). Reduced, where the box falls between
    pixels: Pillow's resize reads exactly the box's region (fractional), as the full path's crop does; a box
    rounded to whole reduced pixels shifts the content by up to factor / 2 full-size pixels, far from the
    full path on fine periodic detail (stripes, text; docs/design.md)."""
    top, left, height, width = box
    if height < 1 or width < 1:  # timm's draw on a 1 px side: its full path resizes the empty crop to black
        return torch.zeros((pixels.shape[0], *size), dtype=torch.uint8)
    if factor == 1.0:
        return resize_pixels(pixels[:, top : top + height, left : left + width], size, interpolation)
    region = tuple(v / factor for v in (left, top, left + width, top + height))
    resized = to_pil(pixels).resize((size[1], size[0]), _PIL_FILTERS[interpolation], box=region)
    return pil_pixels(resized)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 -> an RGB Pillow image (for the ops after the crop: flip, RandAugment)."""
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def interpolation_name(mode) -> str:
    return mode.value if hasattr(mode, "value") else str(mode)


class FastRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation (`rrc`, whose settings and get_params are used as they
    are), decoding only what the crop needs. Input: an Encoded file or a decoded image; output: an RGB
    Pillow image of rrc.size, or with `as_tensor` the (3, H, W) uint8 tensor itself."""

    def __init__(self, rrc, *, as_tensor: bool = False):
        self.rrc = rrc
        self.size = tuple(rrc.size)  # (H, W)
        self.as_tensor = as_tensor

    def draw(self, header: Image.Image) -> tuple[tuple[int, int, int, int], str]:
        """((top, left, height, width), interpolation) for an image (only its size is read, so a header
        will do): the draws of timm's __call__, in its order."""
        top, left, height, width = self.rrc.get_params(header, self.rrc.scale, self.rrc.ratio)
        interpolation = self.rrc.interpolation
        if isinstance(interpolation, list | tuple):  # timm's "random": one more draw, as its __call__
            interpolation = random.choice(interpolation)
        return (top, left, height, width), interpolation_name(interpolation)

    def __call__(self, image: Encoded | Image.Image) -> Image.Image | torch.Tensor:
        header = image.header if isinstance(image, Encoded) else image
        (top, left, height, width), interpolation = self.draw(header)
        scale = dct_scale(header.size, (width / self.size[1], height / self.size[0]))
        pixels, factor = decode_pixels(image, scale)
        resized = crop_resize(pixels, (top, left, height, width), factor, self.size, interpolation)
        return resized if self.as_tensor else to_pil(resized)

    def __repr__(self) -> str:
        return f"FastRandomResizedCrop({self.rrc!r})"


class CoverSize(tuple):
    """(height, width) that a resize keeping the aspect ratio must cover: timm's eval ResizeKeepRatio for a
    non-square image size (the smaller of the two scale factors, each side rounded)."""

    def __new__(cls, height: int, width: int):
        return super().__new__(cls, (int(height), int(width)))


def resized_size(width: int, height: int, size: int | Sequence[int] | CoverSize) -> tuple[int, int]:
    """(H, W) after torchvision's Resize(size) of a (width, height) image: an int scales the shorter side
    to it (the longer one truncated), a pair is the size itself; after timm's ResizeKeepRatio(size) for a
    CoverSize: both sides scaled by the factor that makes the image just cover it, rounded."""
    if isinstance(size, CoverSize):
        ratio = min(height / size[0], width / size[1])
        return round(height / ratio), round(width / ratio)
    if not isinstance(size, int) and len(size) == 2:
        return int(size[0]), int(size[1])
    size = size if isinstance(size, int) else int(size[0])
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


class FastResizeCenterCrop:
    """torchvision's Resize(resize) then CenterCrop(crop), as timm's eval transform builds them, decoding a
    JPEG at the smallest DCT scale that still holds the resized size. Output: an RGB Pillow image, or with
    `as_tensor` the (3, H, W) uint8 tensor itself (for a uint8 hand-over: no round trip through Pillow)."""

    def __init__(
        self, resize: int | Sequence[int], crop: Sequence[int], interpolation: str, *, as_tensor: bool = False
    ):
        self.resize, self.crop, self.interpolation = resize, (int(crop[0]), int(crop[1])), interpolation
        self.as_tensor = as_tensor

    def __call__(self, image: Encoded | Image.Image) -> Image.Image | torch.Tensor:
        width, height = image.size
        new_h, new_w = resized_size(width, height, self.resize)
        scale = dct_scale((width, height), (width / new_w, height / new_h))
        pixels, factor = decode_pixels(image, scale)
        resized = crop_resize(pixels, (0, 0, height, width), factor, (new_h, new_w), self.interpolation)
        top, left = self.offsets(new_h, new_w)
        cropped = resized[:, top : top + self.crop[0], left : left + self.crop[1]]
        return cropped if self.as_tensor else to_pil(cropped)

    def offsets(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the crop in the resized image: torchvision's center_crop offsets (the crop never
        exceeds the resized image here)."""
        return int(round((height - self.crop[0]) / 2.0)), int(round((width - self.crop[1]) / 2.0))

    def __repr__(self) -> str:
        return f"FastResizeCenterCrop(resize={self.resize}, crop={self.crop}, {self.interpolation})"


class PILToUint8:
    """An RGB Pillow image -> (3, H, W) uint8 tensor, as timm's MaybePILToTensor but as a view of one copy
    (the batch collation copies it into the batch anyway)."""

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        return pil_pixels(image)

    def __repr__(self) -> str:
        return "PILToUint8()"


class FastCompose:
    """A transform chain whose first step takes Encoded files (datasets hand it undecoded bytes)."""

    takes_encoded = True

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image):
        for t in self.transforms:
            image = t(image)
        return image

    def __repr__(self) -> str:
        return "FastCompose(\n" + "".join(f"    {t!r}\n" for t in self.transforms) + ")"


def takes_encoded(transform: Callable | None) -> bool:
    """Whether `transform` wants undecoded files (Encoded) rather than decoded images."""
    return bool(getattr(transform, "takes_encoded", False))
