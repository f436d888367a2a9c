"""`data.decode: cuda`: JPEGs decoded, cropped and resized on the training device, a batch at a time.

The workers read a file and its header and make every random draw of the CPU path (the crop box with
timm's get_params, the interpolation, the flip and RandAugment draws: decode.FastRandomResizedCrop.draw and
augment_draws.AugmentDraws), and hand over the file's bytes with the box (`Undecoded`). The device decodes
the batch's JPEGs at once (`jpeg.decode_jpegs(list, device)`: nvjpeg on a GPU), crops each
box and resizes it with torch's antialiased bicubic/bilinear filters in float, one direction at a time
(Pillow's filters; the CPU path resizes with torch's uint8 kernels of the same filters, so a few pixels
differ by a level: the bound is in tests/test_device_decode.py), then flips and augments the batch (device_augment.py).
Evaluation hands over the resize and center crop the CPU path computes.

Files the device does not decode (other formats, CMYK JPEGs, images already decoded by the decoded-image
cache or a Hugging Face dataset) are cropped and resized in the worker by the CPU fast path and travel as
pixels in the same batch. A file whose header reads but whose data does not decode stops the run with the
one-line `cannot decode image NAME`; the device cannot replace it as data.skip_bad_images does in the
workers (the message says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from swin_train.data.augment_draws import AugmentDraws, UnsupportedOnDevice
from swin_train.data.decode import (
    Encoded,
    FastRandomResizedCrop,
    FastResizeCenterCrop,
    interpolation_name,
    resized_size,
)
from swin_train.data.device_augment import DeviceAugment, plan_batch
from swin_train.data.jpeg import decode_jpegs, jpeg_decoder
from swin_train.errors import DataError

# geometry: what the device does with a sample, GEOMETRY float64 numbers
# [source (1: JPEG bytes, 0: the worker's pixels), mode (0: crop then resize, 1: resize then crop),
#  interpolation (0 bilinear, 1 bicubic), a, b, c, d, output height, output width]
# crop then resize: a, b, c, d = top, left, height, width of the crop box in the file's pixels;
# resize then crop: a, b = the resized height, width; c, d = the top, left of the crop in it
GEOMETRY = 9
INTERPOLATIONS = ("bilinear", "bicubic")


class Undecoded(NamedTuple):
    """A sample for the device to decode (collated: a batch, fields as lists and stacked tensors): `data`
    the JPEG file's bytes, or the worker's (3, H, W) uint8 pixels as raw bytes; `geometry` (GEOMETRY,)
    float64; `params` the flip and RandAugment draws ((0,) for evaluation); `name` the file, for errors."""

    data: bytes
    geometry: torch.Tensor
    params: torch.Tensor
    name: str

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Undecoded:
        """Stays in host memory: the device decoder reads the bytes from there."""
        return self


def decodes_on_device(image: Encoded | Image.Image) -> bool:
    """Whether the device decodes `image`: an undecoded baseline/progressive RGB or grayscale JPEG."""
    return (
        jpeg_decoder() != "pillow"
        and isinstance(image, Encoded)
        and image.header.format == "JPEG"
        and image.header.mode in ("RGB", "L")
    )


def _pixels_sample(pixels: torch.Tensor, params: torch.Tensor, name: str) -> Undecoded:
    geometry = torch.zeros(GEOMETRY, dtype=torch.float64)
    geometry[-2:] = torch.tensor(pixels.shape[1:], dtype=torch.float64)
    return Undecoded(pixels.contiguous().numpy().tobytes(), geometry, params, name)


def _jpeg_sample(image: Encoded, mode: int, interpolation: str, box, size, params) -> Undecoded:
    geometry = torch.tensor([1, mode, INTERPOLATIONS.index(interpolation), *box, *size], dtype=torch.float64)
    return Undecoded(image.data, geometry, params, image.name)


class TrainDecodeDraws:
    """The whole train chain in a worker with data.decode=cuda: the crop box (`crop`, a
    FastRandomResizedCrop) and the flip/RandAugment draws (`draws`) for the device; non-JPEGs are cropped
    and resized here."""

    takes_encoded = True

    def __init__(self, crop: FastRandomResizedCrop, draws: AugmentDraws):
        modes = crop.rrc.interpolation
        modes = modes if isinstance(modes, list | tuple) else [modes]
        if not all(interpolation_name(m) in INTERPOLATIONS for m in modes):
            raise UnsupportedOnDevice(f"data.decode=cuda resizes {' or '.join(INTERPOLATIONS)} only")
        self.crop, self.draws = crop, draws
        self.size = crop.size  # (H, W)

    def __call__(self, image: Encoded | Image.Image) -> Undecoded:
        name = image.name if isinstance(image, Encoded) else ""
        if not decodes_on_device(image):
            pixels = FastRandomResizedCrop(self.crop.rrc, as_tensor=True)(image)
            return _pixels_sample(pixels, self.draws.draw(self.size[1], self.size[0]), name)
        box, interpolation = self.crop.draw(image.header)
        params = self.draws.draw(self.size[1], self.size[0])
        return _jpeg_sample(image, 0, interpolation, box, self.size, params)

    def __repr__(self) -> str:
        return f"TrainDecodeDraws({self.crop!r}, {self.draws!r})"


class EvalDecodeDraws:
    """The eval chain in a worker with data.decode=cuda: the resize and center crop the CPU path computes,
    for the device; non-JPEGs are resized and cropped here."""

    takes_encoded = True

    def __init__(self, resize: int | Sequence[int], crop: Sequence[int], interpolation: str):
        if interpolation not in INTERPOLATIONS:
            raise UnsupportedOnDevice(f"data.decode=cuda resizes {' or '.join(INTERPOLATIONS)} only")
        self.cpu = FastResizeCenterCrop(resize, crop, interpolation, as_tensor=True)

    def __call__(self, image: Encoded | Image.Image) -> Undecoded:
        no_draws = torch.zeros(0, dtype=torch.float64)
        if not decodes_on_device(image):
            return _pixels_sample(self.cpu(image), no_draws, getattr(image, "name", ""))
        width, height = image.size
        new_h, new_w = resized_size(width, height, self.cpu.resize)
        top, left = self.cpu.offsets(new_h, new_w)
        box = (new_h, new_w, top, left)
        return _jpeg_sample(image, 1, self.cpu.interpolation, box, self.cpu.crop, no_draws)

    def __repr__(self) -> str:
        return f"EvalDecodeDraws({self.cpu!r})"


class DeviceDecode:
    """Turns an `Undecoded` batch into (B, 3, H, W) uint8 on `device`, then applies its draws (`augment`,
    for training)."""

    def __init__(self, device: torch.device | str, augment: DeviceAugment | None = None):
        self.device = torch.device(device)
        self.augment = augment

    def __call__(self, batch: Undecoded) -> torch.Tensor:
        geometry = batch.geometry.tolist()
        size = (int(geometry[0][7]), int(geometry[0][8]))  # every sample's output size
        jpegs = [i for i, g in enumerate(geometry) if g[0] == 1]
        pixels = [i for i, g in enumerate(geometry) if g[0] == 0]  # the workers'
        images: list[torch.Tensor] = [None] * len(geometry)  # (3, H, W) float32 levels
        if jpegs:
            decoded = self.decode([batch.data[i] for i in jpegs], batch.name, jpegs)
            for i, image in zip(jpegs, crop_and_resize(decoded, [geometry[i] for i in jpegs], size)):
                images[i] = image
        if pixels:
            for i, image in zip(pixels, self._worker_pixels([batch.data[i] for i in pixels], size)):
                images[i] = image
        out = torch.stack(images).to(torch.uint8)  # (B, 3, H, W)
        if self.augment is not None and batch.params.shape[1] > 0:
            out = self.augment.apply(out, plan_batch(batch.params))
        return out

    def _worker_pixels(self, data: list[bytes], size: tuple[int, int]) -> torch.Tensor:
        """(n, 3, H, W) float32: the workers' pixels, in one copy from pinned memory (a copy from pageable
        memory may wait for everything queued on the stream before it)."""
        host = torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8).view(len(data), 3, *size)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True).float()

    def decode(self, files: list[bytes], names: list[str], rows: list[int]) -> list[torch.Tensor]:
        """The JPEGs `files` as (3, H, W) uint8 on the device; a file that fails is a DataError naming it."""
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
        try:
            return self._decode_ordered(tensors)
        except RuntimeError:  # the batch call names no file: decode one at a time to find it
            pass
        out = []
        for tensor, row in zip(tensors, rows):
            try:
                out.append(self._decode_ordered([tensor])[0])
            except RuntimeError as e:
                reason = " ".join(str(e).split(", ", 2)[-1].split())
                raise DataError(
                    f"cannot decode image {names[row]} ({reason}); delete or replace it (data.decode=cuda cannot "
                    "skip it: set data.decode=cpu and data.skip_bad_images=true to skip such files)"
                ) from None
        return out

    def _decode_ordered(self, files: list[torch.Tensor]) -> list[torch.Tensor]:
        """decode_jpegs(files), safe to use on the current stream. On CUDA the decoder allocates the
        outputs on the current stream and nvjpeg writes them from a stream of its own without waiting
        for the current one, so a block freed there while queued kernels still read it (the previous
        batch's) could be overwritten under them. Allocated on a stream that runs nothing, and
        record_stream'ed on the current one, a block is reused only once the current stream's uses of it
        have completed."""
        if self.device.type != "cuda":
            return decode_jpegs(files, self.device)
        current, stream = torch.cuda.current_stream(self.device), _decode_stream(self.device)
        with torch.cuda.stream(stream):
            images = decode_jpegs(files, self.device)
            if jpeg_decoder() != "torchvision":
                # torchvision makes the current stream wait for nvjpeg's; TorchCodec's ordering is not
                # documented, so wait here: a host wait on the feeder thread, never the training loop's
                stream.synchronize()
        current.wait_stream(stream)
        for image in images:
            image.record_stream(current)
        return images


_decode_streams: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device that only ever allocates decoded images (see _decode_ordered)."""
    if device not in _decode_streams:
        _decode_streams[device] = torch.cuda.Stream(device=device)
    return _decode_streams[device]


def crop_and_resize(
    images: list[torch.Tensor], geometry: list[list[float]], size: tuple[int, int]
) -> list[torch.Tensor]:
    """(3, H, W) float32 levels for each decoded image (3, h, w) uint8, cropped and resized as its geometry
    row says with torch's antialiased bicubic/bilinear filter in float32 (CUDA has no uint8 antialiased
    kernels; the CPU takes the same path so that tests see what a GPU computes): the width first, rounded
    to levels, then the height, as Pillow and torch's uint8 kernels do, which leaves the result within a
    level of theirs. Images whose crop, target size and filter agree are resized together and each pass's
    roundings run once over all, so a batch takes two interpolations per distinct crop instead of eight
    launches per image: the same pixels (every row and every image is resized by itself)."""
    jobs: dict[tuple, list[int]] = {}
    sources, crops = [], []
    for i, (pixels, g) in enumerate(zip(images, geometry)):
        source, target, crop = _source(pixels, g, size)
        sources.append(source)
        crops.append(crop)
        jobs.setdefault((tuple(source.shape[1:]), target, INTERPOLATIONS[int(g[2])]), []).append(i)
    x = [
        (
            torch.stack([sources[i] for i in members]) if len(members) > 1 else sources[members[0]][None]
        ).float()
        for members in jobs.values()
    ]
    for step in (0, 1):  # the width, then the height
        resized = []
        for k, ((height, _), (new_h, new_w), interpolation) in enumerate(jobs):
            shape = (height, new_w) if step == 0 else (new_h, new_w)
            if tuple(x[k].shape[2:]) != shape:
                x[k] = F.interpolate(x[k], size=shape, mode=interpolation, antialias=True)
                resized.append(x[k])
        if resized:
            torch._foreach_round_(resized)
            torch._foreach_clamp_min_(resized, 0.0)
            torch._foreach_clamp_max_(resized, 255.0)
    out: list[torch.Tensor] = [None] * len(images)
    for k, members in enumerate(jobs.values()):
        for j, i in enumerate(members):
            top, left = crops[i]
            out[i] = x[k][j, :, top : top + size[0], left : left + size[1]]
    return out


def _source(pixels: torch.Tensor, g: list[float], size: tuple[int, int]):
    """(what of the decoded (3, h, w) `pixels` is resized, to what size, then the crop's top and left) for
    geometry row `g`."""
    a, b, c, d = (int(v) for v in g[3:7])
    if g[1] == 0:  # crop (top a, left b, height c, width d), then resize
        return pixels[:, a : max(a + c, a + 1), b : max(b + d, b + 1)], tuple(size), (0, 0)
    return pixels, (a, b), (c, d)  # resize to (a, b), then crop at (c, d)
