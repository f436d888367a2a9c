"""Which library decodes JPEGs into tensors, decided in one place for every path that wants one (the fast
path: training, evaluation and `swin-predict`, from folders, shards and Hugging Face rows; the device's
batches with `data.decode: cuda`): TorchCodec (`torchcodec.decoders.decode_jpeg`, libjpeg-turbo on the CPU,
nvjpeg on a GPU), else torchvision's decoders (deprecated since torchvision 0.29 for TorchCodec; kept for an
environment without it), else Pillow (`jpeg_decoder() == "pillow"`: the fast path decodes with Pillow and
the workers decode every file with `data.decode: cuda`). The environment variable
SWIN_TRAIN_JPEG_DECODER=torchvision or =pillow starts the choice there (to compare them, as the loader
benchmark does, or to step around a library's bug). Whole images wanted as Pillow images
(`data.fast_decode: false`, the decoded-image cache: folder.decode_image) stay with Pillow's own decoder:
the same pixels, and a tensor from here costs one more copy into Pillow's pixel layout (that path measured
slower through TorchCodec: docs/performance.md).

On the CPU all three give the same pixels: libjpeg-turbo's defaults (the islow IDCT, fancy upsampling),
grayscale and CMYK files converted to RGB as Pillow converts them (tests/test_jpeg.py, on photographs).
Two differences are handled here:
- TorchCodec always turns an image by its EXIF orientation; torchvision (by default) and Pillow do not,
  and swin-train never has (a turned photo would change every recorded result), so TorchCodec gets the
  file with its APP1 (EXIF) segments renamed APP15, which libjpeg and TorchCodec's nvjpeg path skip.
- A library is chosen only once it imports and decodes a small noise JPEG to Pillow's pixels (checked
  once per process, on first use): TorchCodec's wheel needs the CUDA build of torch it was built for
  and fails to load with a CPU-only torch, and torchvision may lack its image extension.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from swin_train.errors import ConfigError

DECODER_ENV = "SWIN_TRAIN_JPEG_DECODER"
LIBRARIES = ("torchcodec", "torchvision", "pillow")  # in the order they are tried
# torchvision's per-call warning, silenced only around its calls as the fallback (pyproject's pytest
# filterwarnings turns it into an error everywhere else)
TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
_APP1, _APP15 = 0xE1, 0xEF
_NO_LENGTH = {0x00, 0x01, *range(0xD0, 0xD8)}  # a stuffed zero, TEM and RSTn: markers without a segment
_ENDS_HEADER = {0xDA, 0xD9}  # start of scan, end of image

Decoder = Callable[[Sequence[torch.Tensor], torch.device], list[torch.Tensor]]


def decode_jpegs(files: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """JPEG files (1-D uint8 CPU tensors of their bytes) -> (3, H, W) uint8 RGB tensors on `device`, by the
    library jpeg_decoder() names (not "pillow"). A file that does not decode raises the library's
    RuntimeError, "<function>, <source file>:<line>, <libjpeg's message>"."""
    decode = _choice()[1]
    if decode is None:
        raise RuntimeError("no JPEG decoder: neither TorchCodec nor torchvision's decoders load here")
    return decode(files, torch.device(device))


def decode_jpeg(data: bytes) -> torch.Tensor:
    """One JPEG file's bytes -> (3, H, W) uint8 RGB on the CPU (see decode_jpegs)."""
    # bytearray: torch wants a writable buffer; the copy is cheap beside decoding
    return decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)])[0]


def jpeg_decoder() -> str:
    """The library that decodes JPEGs in this process: "torchcodec", "torchvision" or "pillow"."""
    return _choice()[0]


def skipped_decoders() -> dict[str, str]:
    """The libraries passed over, each with the one-line reason (for the benchmark and bug reports)."""
    return dict(_choice()[2])


def _choice() -> tuple[str, Decoder | None, tuple[tuple[str, str], ...]]:
    return _choose(os.environ.get(DECODER_ENV) or LIBRARIES[0])


@functools.cache
def _choose(first: str) -> tuple[str, Decoder | None, tuple[tuple[str, str], ...]]:
    if first not in LIBRARIES:
        raise ConfigError(f"{DECODER_ENV}={first!r}: expected one of {', '.join(LIBRARIES)} (or unset)")
    start = LIBRARIES.index(first)
    skipped = [(name, f"skipped: {DECODER_ENV}={first}") for name in LIBRARIES[:start]]
    for name in LIBRARIES[start:-1]:
        try:
            decode = {"torchcodec": _load_torchcodec, "torchvision": _load_torchvision}[name]()
            _check(decode)
        except Exception as e:  # a wheel that does not load raises OSError or RuntimeError, not ImportError
            skipped.append((name, " ".join(f"{type(e).__name__}: {e}".split())))
            continue
        return name, decode, tuple(skipped)
    return "pillow", None, tuple(skipped)


def _load_torchcodec() -> Decoder:
    from torchcodec.decoders import decode_jpeg

    def decode(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg([exif_hidden(f) for f in files], mode="RGB", device=device)

    return decode


def _load_torchvision() -> Decoder:
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(files: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", TORCHVISION_DEPRECATION, DeprecationWarning)
            if device.type == "cpu":  # its CPU list call is a loop over the same single-image op
                return [decode_jpeg(f, mode=ImageReadMode.RGB) for f in files]
            return decode_jpeg(list(files), mode=ImageReadMode.RGB, device=device)

    return decode


def _check(decode: Decoder) -> None:
    """Raises unless `decode` gives Pillow's pixels for a small noise JPEG (4:2:0, as most photographs)."""
    noise = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    expected = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    if not torch.equal(decode([data], torch.device("cpu"))[0], expected):
        raise ValueError("its pixels differ from Pillow's (another libjpeg build?)")


def exif_hidden(data: torch.Tensor) -> torch.Tensor:
    """A JPEG file (1-D uint8 tensor) with its APP1 segments renamed APP15, which decoders skip; `data`
    itself when it has none. Walks the segments before the first scan as libjpeg reads them (bytes
    between segments skipped, as libjpeg does), where cameras and editors write EXIF."""
    view = memoryview(data.numpy())
    found, i, end = [], 2, len(view) - 3
    while i < end:
        if view[i] != 0xFF:  # bytes between segments
            i += 1
            continue
        while i < end and view[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i >= end:
            break
        marker = view[i + 1]
        if marker in _ENDS_HEADER:
            break
        if marker in _NO_LENGTH:
            i += 2
            continue
        if marker == _APP1:
            found.append(i + 1)
        i += 2 + (view[i + 2] << 8 | view[i + 3])
    if not found:
        return data
    data = data.clone()
    data[found] = _APP15
    return data
