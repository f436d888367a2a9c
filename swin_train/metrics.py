"""What a run reports: a line per `print_freq` steps, a line and a record per epoch (metrics.jsonl and
TensorBoard, rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from swin_train.checkpoint import write_atomically

log = logging.getLogger("swin_train")

# epoch-record keys that measure the machine, not the training (they differ between identical runs)
TIMING_KEYS = ("train_img_s", "train_epoch_time")


class Metrics:
    """metrics.jsonl (one record per epoch) and TensorBoard scalars, written by rank 0 only.

    On resume, records of epochs that will be trained again are dropped, and TensorBoard purges events
    after the resumed step, so both read as if the run had never stopped.
    """

    def __init__(self, out: Path, enabled: bool, *, epoch: int, global_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _epoch_of(line) < epoch]
            # atomically: a kill mid-rewrite must not lose the records of finished epochs
            write_atomically(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=global_step or None)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        if self.tb is not None:
            self.tb.close()

    def epoch(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, int | float) and key != "epoch" and math.isfinite(value):
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)
        self.tb.flush()

    def image(self, tag: str, picture, step: int) -> None:
        """A (3, H, W) uint8 picture to TensorBoard."""
        if self.enabled:
            self.tb.add_image(tag, picture, step)
            self.tb.flush()


def _epoch_of(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line cut off by a crash (its epoch is trained again)."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class StepMeter:
    """Images per second of this process: over the epoch so far (from when its first batch is asked for,
    after a resume too) and over the window since the previous step line, which is what a user compares
    from line to line."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start = self.window_start = clock()
        self.images = self.window_images = 0

    def add(self, images: int) -> None:
        self.images += images
        self.window_images += images

    def window_rate(self) -> float:
        """Images per second since the previous call (or the start); then a new window starts."""
        now = self.clock()
        rate = self.window_images / (now - self.window_start) if now > self.window_start else 0.0
        self.window_images, self.window_start = 0, now
        return rate

    @property
    def seconds(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        seconds = self.seconds
        return self.images / seconds if seconds > 0 else 0.0


def step_line(
    epoch: int, step: int, steps: int, loss: float, lr: float, grad_norm: float, img_s: float
) -> str:
    """A step's line; `epoch` 0-based as the state counts it, shown from 1 as the epoch lines show it."""
    return f"epoch {epoch + 1} step {step}/{steps}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, {img_s:.1f} img/s"


def epoch_line(r: dict, epochs: int) -> str:
    k = r["val_topk"]
    line = (
        f"{_training_part(r, epochs)} | val top-1 {100 * r['val_top1']:.2f}%, top-{k} {100 * r['val_top5']:.2f}%, "
        f"loss {r['val_loss']:.4f}"
    )
    if "ema_top1" in r:
        line += f" | ema top-1 {100 * r['ema_top1']:.2f}%, top-{k} {100 * r['ema_top5']:.2f}%"
    return line + _skipped_part(r) + f" | best {100 * r['best_top1']:.2f}%"


def reconstruction_epoch_line(r: dict, epochs: int) -> str:
    """A pre-training epoch's line (task: simmim): the masked reconstruction losses."""
    line = f"{_training_part(r, epochs)} | val masked loss {r['val_loss']:.4f}"
    if "ema_loss" in r:
        line += f" | ema masked loss {r['ema_loss']:.4f}"
    return line + _skipped_part(r) + f" | best {r['best_loss']:.4f}"


def _training_part(r: dict, epochs: int) -> str:
    """What every task's epoch line starts with: the epoch (from 1) and its training numbers."""
    return (
        f"epoch {r['epoch'] + 1}/{epochs}: loss {r['train_loss']:.4f}, lr {r['train_lr']:.2e}, "
        f"{r['train_img_s']:.1f} img/s, {r['train_epoch_time']:.1f}s"
    )


def _skipped_part(r: dict) -> str:
    skipped = r["train_nonfinite_steps"]
    return f" | {skipped} non-finite steps skipped" if skipped else ""
