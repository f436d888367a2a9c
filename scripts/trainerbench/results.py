"""What each trainer's run gave: its per-epoch records (timm's summary.csv, swin-train's metrics.jsonl), its
own train-loop img/s, and the run's summary (RunResult) with the reason it counts as failed, if any."""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from swin_train.errors import DataError
from trainerbench.measure import Measurement


def read_timm_summary(path: Path) -> list[dict]:
    """timm's summary.csv rows as {epoch, train_loss, eval_loss, top1, top5} with top-1/top-5 as fractions."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"cannot read timm's summary {path} ({e.strerror or e}); see the run's log") from None
    try:
        return [
            {
                "epoch": int(r["epoch"]),
                "train_loss": float(r["train_loss"]),
                "eval_loss": float(r["eval_loss"]),
                "top1": float(r["eval_top1"]) / 100,
                "top5": float(r["eval_top5"]) / 100,
            }
            for r in rows
        ]
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} is not a timm summary.csv with eval_top1/eval_top5 columns ({e})") from None


def read_swin_metrics(path: Path) -> list[dict]:
    """swin-train's metrics.jsonl records as {epoch, train_loss, eval_loss, top1, top5, train_img_s}."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(
            f"cannot read swin-train's metrics {path} ({e.strerror or e}); see the run's log"
        ) from None
    try:
        records = [json.loads(line) for line in lines]
        return [
            {
                "epoch": int(r["epoch"]),
                "train_loss": float(r["train_loss"]),
                "eval_loss": float(r["val_loss"]),
                "top1": float(r["val_top1"]),
                "top5": float(r["val_top5"]),
                "train_img_s": float(r["train_img_s"]),
            }
            for r in records
        ]
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a swin-train metrics.jsonl ({type(e).__name__}: {e})") from None


_TIMM_TRAIN_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+).*?\(\s*[\d.]+s,\s*([\d.]+)/s\)")


def timm_train_img_s(log_text: str) -> list[float]:
    """Per epoch, the running-average train img/s of the epoch's last 'Train:' log line of timm."""
    last: dict[int, float] = {}
    for m in _TIMM_TRAIN_LINE.finditer(log_text):
        last[int(m.group(1))] = float(m.group(4))
    return [last[e] for e in sorted(last)]


@dataclass
class RunResult:
    trainer: str
    pair: int
    measurement: Measurement
    epochs: list[dict] = field(default_factory=list)
    images_per_second: float = 0.0  # epochs x train images (full batches) / wall time
    train_img_s: float = float("nan")  # the trainer's own mean train-loop img/s over the epochs
    best_top1: float = float("nan")
    final_top1: float = float("nan")
    log: str = ""
    error: str | None = None


def summarize_trainer(
    trainer: str,
    pair: int,
    m: Measurement,
    epochs: list[dict],
    *,
    train_images: int,
    epochs_planned: int,
    loop_img_s: Sequence[float],
    log: str = "",
) -> RunResult:
    """A RunResult from a measurement and the parsed per-epoch records."""
    result = RunResult(trainer, pair, m, epochs, log=log)
    result.images_per_second = epochs_planned * train_images / m.wall_s if m.wall_s > 0 else 0.0
    if loop_img_s:
        result.train_img_s = statistics.fmean(loop_img_s)
    if epochs:
        result.best_top1 = max(e["top1"] for e in epochs)
        result.final_top1 = epochs[-1]["top1"]
    if m.timed_out:
        result.error = "timed out"
    elif m.exit_code != 0:
        result.error = f"exit status {m.exit_code}"
    elif len(epochs) != epochs_planned:
        result.error = f"{len(epochs)} of {epochs_planned} epochs recorded"
    return result
