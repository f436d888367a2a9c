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
from swin_train.data.prefetch import DeviceTransform, prefetch
from swin_train.device import Amp
from swin_train.distributed import all_reduce_sum
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

    With an exact (non-padding) sampler, every image counts once whatever the number of processes.
    `device_transform` normalises uint8 batches on the device (no erasing in evaluation). `cpu_split` runs
    each batch's forward in parts at once, one thread each (cpu_split.py).
    """
    model.eval()
    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-k hits, loss sum, count
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
            hits = logits.topk(k, dim=-1).indices == targets[:, None]  # (B, k)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            count = torch.tensor(len(targets), device=device)
            totals += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum(), loss, count]).to(totals.dtype)
    top1, topk, loss, count = all_reduce_sum(totals).tolist()
    count = int(count)
    if count == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "num_samples": 0, "topk": k}
    return {"top1": top1 / count, "top5": topk / count, "loss": loss / count, "num_samples": count, "topk": k}


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
