"""Batches on the device: copies and device work prefetched by a feeder thread on its own stream, uint8 ->
normalised float and seeded random erasing on the device.

`prefetch(loader, device, transform)` yields a loader's (images, targets) on `device`. On CUDA a feeder
thread copies batch i+1 (pinned memory, `non_blocking=True`) and runs its `transform` (decoding,
augmentation, normalisation, erasing) on its own stream while batch i is in use (prefetch depth 1): the
launches, and the waits of torchvision's JPEG decoder, stay off the training thread. On CPU a batch is
fetched when asked for, as a plain loop would, except batches the device decodes, which take the feeder
thread as on a GPU.

`DeviceTransform` is the device half of the uint8 pipeline (`transforms.build_train_transform(uint8=True)`):
it converts and normalises exactly as ToTensor + Normalize do in the workers (bitwise), then, for train
batches, applies timm's RandomErasing seeded from (seed, rank, epoch, batch index) (erasing.py). Its
generators are its own, so erasing never moves the RNG streams that mixup, drop path and the checkpoints
use: a resumed run erases and mixes exactly as an uninterrupted one, whichever batch the prefetcher had
already prepared when the checkpoint was written.

Why not timm's PrefetchLoader as is: it draws random erasing from the global RNGs (not resumable), it
has no batch index to seed from, and it normalises as (x - 255 mean) / (255 std), which differs from
the worker pipeline in the last bit. Its stream handling is the model for the one here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from swin_train.data.augment_draws import Augmented
from swin_train.data.device_augment import DeviceAugment
from swin_train.data.device_decode import DeviceDecode, Undecoded
from swin_train.data.erasing import SeededErasing

Batch = tuple[torch.Tensor, torch.Tensor]

# First element of every erasing seed key: keeps these seeds apart from other seeded_rng(seed, rank, ...) users.
_ERASING_KEY = 0x45524153  # "ERAS"


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 (x / 255 - mean) / std, with mean/std shaped (C, 1, 1).

    The same three roundings as torchvision's ToTensor (x.float().div(255)) and Normalize (sub_, div_),
    so the result is bitwise the worker pipeline's; one more pass than timm's two, over memory that is
    read at GPU bandwidth, for batches that do not depend on where they were normalised. 255 is a
    tensor on the device: CUDA divides by a Python number as a multiplication by its reciprocal, which
    is not always the correctly rounded quotient the CPU computes.
    """
    scale = torch.full((), 255.0, dtype=torch.float32, device=images.device)
    return images.float().div_(scale).sub_(mean).div_(std)


class DeviceTransform:
    """What the uint8 pipeline does on the device: decoding `Undecoded` batches (data.decode: cuda),
    `augment` (aug.on_device: the flips and RandAugment draws of `Augmented` and `Undecoded` batches),
    uint8 -> normalised float32, then (train batches only) timm RandomErasing
    seeded per batch. Float batches are taken as already normalised."""

    def __init__(
        self,
        device: torch.device | str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        reprob: float = 0.0,
        remode: str = "pixel",
        recount: int = 1,
        seed: int = 0,
        rank: int = 0,
        augment: DeviceAugment | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.augment = augment
        self.decode = DeviceDecode(self.device, augment)  # for Undecoded batches (data.decode: cuda)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        # the worker pipeline's settings (timm create_transform): max_count=recount, no clean splits
        self.erasing = SeededErasing(reprob, mode=remode, max_count=recount) if reprob > 0 else None
        self.seed, self.rank = seed, rank

    def __call__(
        self, images: torch.Tensor, epoch: int | None = None, batch: int | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) on `device` -> normalised float32. With an `epoch` and this rank's `batch` index
        in that epoch, random erasing runs too, as a pure function of (seed, rank, epoch, batch)."""
        if isinstance(images, Undecoded):
            images = self.decode(images)
        if isinstance(images, Augmented):
            if self.augment is None:
                raise ValueError("an Augmented batch needs a DeviceTransform with an augment")
            images = self.augment(images)
        if images.dtype == torch.uint8:
            images = normalize_uint8(images, self.mean, self.std)
        if self.erasing is not None and batch is not None:
            if epoch is None:
                raise ValueError("random erasing needs the epoch as well as the batch index")
            images = self.erasing(images, _ERASING_KEY, self.seed, self.rank, epoch, batch)  # in place
        return images


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One feeder stream per device for the whole process: the caching allocator pools blocks per stream,
    so a fresh stream per epoch would strand every earlier one's cached blocks."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def prefetch(
    loader: Iterable,
    device: torch.device | str,
    transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    *,
    start: int = 0,
    limit: int | None = None,
) -> Iterator[Batch]:
    """(images, targets) of `loader` on `device`, images passed through `transform(images, i)` where i is
    the batch's index: start, start + 1, ... At most `limit` batches are read from the loader.

    CUDA: a feeder thread copies and transforms batch i+1 on its own stream while batch i is in use, so
    the copies, decoding and augmentation launch off the training thread (`_fed`).
    Batch i is handed out once the current stream waits for its event, and is `record_stream`ed there, so
    the allocator does not recycle it for the feeder's stream before the current stream is done with it.
    The batches must be used on the stream that is current when they are asked for.
    CPU: batches the device decodes (data.decode: cuda) take the same feeder thread (no streams), the
    path a GPU runs; other batches are fetched when asked for, as a plain loop would.
    """
    device = torch.device(device)
    batches = enumerate(itertools.islice(loader, limit), start)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        yield from _fed(batches, device, transform)
        return
    first = next(batches, None)
    if first is None:
        return
    batches = itertools.chain([first], batches)
    if isinstance(first[1][0], Undecoded):
        yield from _fed(batches, device, transform)
        return
    for i, (images, targets) in batches:
        yield _to_device(images, targets, device, transform, i)


FEEDER = "swin-train device feeder"  # the feeder thread's name


def _fed(batches: Iterable, device: torch.device, transform) -> Iterator[Batch]:
    """`batches` (read here, on the loop's thread) copied to `device` and transformed by a feeder thread,
    one batch ahead: batch i+1 is handed to the feeder before batch i is handed out.

    The loader stays on the loop's thread because a loader without workers transforms its samples there
    under the global generators, which the training step draws from too. The feeder runs only what
    reads no global generator (decoding, augmentation, normalisation, erasing): the batches are those of
    the loop alone. On CUDA the feeder works on its own stream and records an event after each batch. An
    exception of the feeder's (a file that does not decode, say) is raised when its batch is asked for;
    closing the iterator (the loop stops early) waits for the batch the feeder is on.
    """
    stream = _side_stream(device) if device.type == "cuda" else None
    if stream is not None:
        # what the current stream produced before (the transform's mean/std, say) is ready for the feeder
        stream.wait_stream(torch.cuda.current_stream(device))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=FEEDER) as feeder:
        pending = None
        for i, (images, targets) in batches:
            queued = feeder.submit(_prepare, images, targets, device, transform, i, stream)
            if pending is not None:
                yield _handed_out(*pending.result(), device)
            pending = queued
        if pending is not None:
            yield _handed_out(*pending.result(), device)


def _prepare(images, targets, device: torch.device, transform, i: int, stream):
    """(batch i on `device`, the event after its work or None): the feeder thread's job."""
    if stream is None:
        return _to_device(images, targets, device, transform, i), None
    with torch.cuda.device(device), torch.cuda.stream(stream):  # both thread-local in torch
        batch = _to_device(images, targets, device, transform, i)
        done = torch.cuda.Event()
        done.record(stream)
    return batch, done


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device, transform, i: int) -> Batch:
    images = images.to(device, non_blocking=True)  # async from pinned memory
    targets = targets.to(device, non_blocking=True)
    if transform is not None:
        images = transform(images, i)
    return images, targets


def _handed_out(batch: Batch, done: torch.cuda.Event | None, device: torch.device) -> Batch:
    if done is None:
        return batch
    consumer = torch.cuda.current_stream(device)
    consumer.wait_event(done)  # this batch only; the next one's work keeps running on the feeder's stream
    for t in batch:
        t.record_stream(consumer)  # allocated on the feeder's stream, used and freed on this one
    return batch


__all__ = ["DeviceTransform", "normalize_uint8", "prefetch"]
