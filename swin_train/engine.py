"""The training loop and evaluation. Distributed, AMP and checkpoint details live behind small helpers."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from swin_train.distributed import all_reduce_sum
from swin_train.prefetch import DeviceTransform, prefetch

log = logging.getLogger("swin_train")


@dataclass
class Amp:
    """Mixed precision: an autocast dtype (None = fp32) and, for fp16, a GradScaler."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_amp(mode: str, device: torch.device) -> Amp:
    """'auto' is bf16 on a CUDA device that supports it, else none (fp32); fp16 gets a GradScaler."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return Amp(device.type, dtype, scaler)


@dataclass
class TrainState:
    """Counters that must survive a resume (saved in every checkpoint), including the running sums of
    the current epoch, so an epoch's reported loss is the same whether or not it was interrupted."""

    epoch: int = 0  # the epoch being trained (0-based)
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    epoch_loss_sum: float = 0.0  # sum of micro-batch losses in this epoch
    epoch_grad_norm_sum: float = 0.0  # sum of finite gradient norms in this epoch
    epoch_nonfinite: int = 0  # skipped steps in this epoch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = self.epoch_grad_norm_sum = 0.0
        self.epoch_nonfinite = 0


@dataclass
class EpochStats:
    loss: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    images: int = 0  # seen by this process since (re)start, for img/s
    seconds: float = 0.0
    nonfinite: int = 0
    stopped: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def clip_and_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Total gradient norm (clipping to max_norm when given); inf/nan if any gradient is non-finite."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf, foreach=True)


def train_one_epoch(
    model: nn.Module,
    loader,
    state: TrainState,
    *,
    optimizer: torch.optim.Optimizer,
    schedule,
    criterion: nn.Module,
    amp: Amp,
    device: torch.device,
    steps_per_epoch: int,
    accumulation_steps: int = 1,
    clip_grad: float | None = None,
    mixup: Callable | None = None,
    ema=None,
    after_step: Callable[[TrainState], bool] | None = None,
    show_progress: bool = True,
    print_freq: int = 50,
    device_transform: DeviceTransform | None = None,
) -> EpochStats:
    """Train from `state.step_in_epoch` to the end of the epoch (or until `after_step` returns True).

    A step whose gradient norm is not finite is skipped (no optimizer/EMA update) and counted in `state`.
    Batches are copied ahead on a side stream on CUDA (`prefetch`); `device_transform` (the uint8
    pipeline) normalises them there and erases per micro-batch, seeded by (epoch, micro-batch index).
    The loader must start at micro-batch `state.step_in_epoch * accumulation_steps` of the epoch.
    """
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    # The bar is for terminals; logs and CI get a plain line every `print_freq` steps instead.
    bar = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch}",
               disable=not (show_progress and sys.stderr.isatty()), dynamic_ncols=True, mininterval=1.0,
               leave=False)  # fmt: skip
    transform = None
    if device_transform is not None:
        epoch = state.epoch
        transform = lambda images, i: device_transform(images, epoch, i)  # i: micro-batch index in the epoch
    first = state.step_in_epoch * accumulation_steps
    batches = prefetch(loader, device, transform, start=first,
                       limit=steps_per_epoch * accumulation_steps - first)  # fmt: skip
    while state.step_in_epoch < steps_per_epoch:
        step_loss = torch.zeros((), device=device)
        for micro in range(accumulation_steps):
            images, targets = next(batches)  # on `device`, float
            if mixup is not None:
                images, targets = mixup(images, targets)
            last = micro == accumulation_steps - 1
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with amp.autocast():
                    loss = criterion(model(images), targets)
                scaled = loss / accumulation_steps
                (amp.scaler.scale(scaled) if amp.scaler else scaled).backward()
            step_loss += loss.detach().float()
            stats.images += images.shape[0]
        if amp.scaler:
            amp.scaler.unscale_(optimizer)
        grad_norm = clip_and_norm(model, clip_grad)
        if torch.isfinite(grad_norm):  # waits for the backward pass, so the .item()s below cost nothing more
            (amp.scaler.step(optimizer) if amp.scaler else optimizer.step())
            if ema is not None:
                ema.update(model)
            state.nonfinite_in_a_row = 0
            state.epoch_grad_norm_sum += grad_norm.item()
        else:
            state.nonfinite_total += 1
            state.nonfinite_in_a_row += 1
            state.epoch_nonfinite += 1
        if amp.scaler:
            amp.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        stats.lr = schedule.lr  # the (unscaled) lr of the step just taken
        schedule.step()
        state.epoch_loss_sum += step_loss.item()
        state.step_in_epoch += 1
        state.global_step += 1
        bar.update(1)
        if state.step_in_epoch % print_freq == 0 or state.step_in_epoch == steps_per_epoch:
            img_s = stats.images / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{stats.lr:.2e}", img_s=f"{img_s:.1f}")
            if show_progress:
                log.info("epoch %d step %d/%d: loss %.4f, lr %.2e, grad norm %.3f, %.1f img/s", state.epoch,
                         state.step_in_epoch, steps_per_epoch, loss.item(), stats.lr, grad_norm.item(), img_s)  # fmt: skip
        if after_step is not None and after_step(state):
            stats.stopped = True
            break
    bar.close()
    stats.seconds = time.perf_counter() - start
    done = state.step_in_epoch
    if done:
        stats.loss = state.epoch_loss_sum / (done * accumulation_steps)
        finite = done - state.epoch_nonfinite
        stats.grad_norm = state.epoch_grad_norm_sum / finite if finite else float("nan")
    stats.nonfinite = state.epoch_nonfinite
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, amp: Amp, num_classes: int,
             show_progress: bool = False, device_transform: DeviceTransform | None = None) -> dict:  # fmt: skip
    """Top-1, top-k (k = min(5, classes)) and mean cross-entropy over the whole set, summed over ranks.

    With an exact (non-padding) sampler, every image counts once whatever the number of processes.
    `device_transform` normalises uint8 batches on the device (no erasing in evaluation).
    """
    model.eval()
    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-k hits, loss sum, count
    transform = None if device_transform is None else (lambda images, _: device_transform(images))
    bar = tqdm(prefetch(loader, device, transform), total=len(loader), desc="eval",
               disable=not (show_progress and sys.stderr.isatty()), leave=False, mininterval=1.0)  # fmt: skip
    for images, targets in bar:
        with amp.autocast():
            logits = model(images)
        hits = logits.topk(k, dim=-1).indices == targets[:, None]  # (B, k)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        count = torch.tensor(len(targets), device=device)
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum(), loss, count]).to(totals.dtype)
    top1, topk, loss, count = all_reduce_sum(totals).tolist()
    count = int(count)
    if count == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "num_samples": 0, "topk": k}
    return {"top1": top1 / count, "top5": topk / count, "loss": loss / count, "num_samples": count, "topk": k}
