"""Evaluation: exact top-1/top-k and loss over a whole split, summed over processes; inference throughput."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from swin_train.cpu_split import CpuSplit
from swin_train.data.folder import SKIPPED_LABEL
from swin_train.data.prefetch import DeviceTransform, prefetch
from swin_train.device import Amp
from swin_train.distributed import all_gather_objects, all_reduce_sum
from swin_train.models.swin import image_size


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    amp: Amp,
    num_classes: int,
    show_progress: bool = False,
    device_transform: DeviceTransform | None = None,
    cpu_split: CpuSplit | None = None,
) -> dict:
    """Top-1, top-k (k = min(5, classes)) and mean cross-entropy over the whole set, summed over ranks.

    With an exact (non-padding) sampler, every image counts once whatever the number of processes. A file
    the data set could not read (data.skip_bad_images) comes as SKIPPED_LABEL and counts nowhere:
    `num_samples` is the number of images evaluated, `num_skipped` and `skipped_files` what was left out.
    `device_transform` normalises uint8 batches on the device (no erasing in evaluation). `cpu_split` runs
    each batch's forward in parts at once, one thread each (cpu_split.py).
    """
    model.eval()
    k = min(5, num_classes)
    # top-1 hits, top-k hits, loss sum, images evaluated, images skipped
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    transform = None if device_transform is None else (lambda images, _: device_transform(images))
    bar = tqdm(
        prefetch(loader, device, transform),
        total=len(loader),
        desc="eval",
        disable=not (show_progress and sys.stderr.isatty()),
        leave=False,
        mininterval=1.0,
    )

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), amp.autocast():  # both are per thread: set again in cpu_split's threads
            return model(images)

    with cpu_split.main_thread_share() if cpu_split is not None else nullcontext():
        for images, targets in bar:
            logits = torch.cat(cpu_split.map(forward, images)) if cpu_split is not None else forward(images)
            hits = logits.topk(k, dim=-1).indices == targets[:, None]  # (B, k); never for SKIPPED_LABEL
            loss = F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=SKIPPED_LABEL)
            counted = targets != SKIPPED_LABEL
            sums = [hits[:, 0].sum(), hits.any(dim=-1).sum(), loss, counted.sum(), (~counted).sum()]
            totals += torch.stack(sums).to(totals.dtype)
    top1, topk, loss, count, skipped = all_reduce_sum(totals).tolist()
    count, skipped = int(count), int(skipped)
    files = [f for part in all_gather_objects(skipped_files(loader.dataset)) for f in part] if skipped else []
    per_image = count or float("nan")  # no image evaluated: every mean is NaN
    return {
        "top1": top1 / per_image,
        "top5": topk / per_image,
        "loss": loss / per_image,
        "num_samples": count,
        "topk": k,
        "num_skipped": skipped,  # the same on every rank: all of them gathered the files, or none
        "skipped_files": sorted(files),
    }


def skipped_files(dataset) -> list[str]:
    """The files this process's latest pass over `dataset` left out (an image folder's; others skip none)."""
    method = getattr(dataset, "skipped_files", None)
    return method() if method is not None else []


def throughput(
    model: nn.Module,
    *,
    batch_size: int,
    in_chans: int,
    img_size: int | Sequence[int],
    device: torch.device,
    amp: Amp,
    batches: int = 10,
    warmup: int = 3,
) -> float:
    """Inference images per second on random input (no data, no loader)."""
    x = torch.randn(batch_size, in_chans, *image_size(img_size), device=device)
    model.eval()
    with torch.inference_mode(), amp.autocast():
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)
