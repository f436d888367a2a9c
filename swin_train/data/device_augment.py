"""The device's half of `aug.on_device`: a batch's flips and RandAugment/AutoAugment ops applied to its uint8
images where the batch is (the GPU), from the draws the workers made (augment_draws.py), in the order each
sample drew them, with Pillow's semantics (pillow_ops.py).

The plan (which samples take which op at each position) is read from the params in host memory, so the
device never waits for the host: per position, one batched affine resampling for every sample whose op
there is geometric (per-sample matrices), one vectorised call per colour op over the samples that drew it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from swin_train.data import pillow_ops as ops
from swin_train.data.augment_draws import INTERPOLATION_CODES, KINDS, ROW, Augmented


@dataclass
class Step:
    """One op for a group of samples: `kind` ("flip" or one of KINDS), `rows` their batch indices, `args`
    (len(rows), 6) float64 arguments, `interpolation` for "affine"."""

    kind: str
    rows: np.ndarray
    args: np.ndarray
    interpolation: str = ""


def plan_batch(params: torch.Tensor) -> list[Step]:
    """The steps that apply a batch's draws `params` (B, 1 + ROW * layers) float64 (host memory), in order:
    the flips, then each op position, samples grouped by op."""
    p = params.numpy()
    steps = []
    flipped = np.flatnonzero(p[:, 0])
    if flipped.size:
        steps.append(Step("flip", flipped, p[flipped, :0]))
    for first in range(1, p.shape[1], ROW):
        block = p[:, first : first + ROW]
        codes = block[:, 0].astype(np.int64)
        interpolations = block[:, 1].astype(np.int64)
        for code in np.unique(codes[codes > 0]):
            kind, chosen = KINDS[code - 1], codes == code
            if kind != "affine":
                rows = np.flatnonzero(chosen)
                steps.append(Step(kind, rows, block[rows, 2:]))
                continue
            for interp in np.unique(interpolations[chosen]):  # one resampling per interpolation
                rows = np.flatnonzero(chosen & (interpolations == interp))
                steps.append(Step(kind, rows, block[rows, 2:], INTERPOLATION_CODES[interp]))
    return steps


class DeviceAugment:
    """Applies `Augmented` batches' draws on their pixels' device; `fill` (3 levels) is the colour the
    geometric ops fill with (timm's: the mean in 0..255)."""

    def __init__(self, fill: Sequence[int]):
        self.fill = tuple(int(v) for v in fill)

    def __call__(self, batch: Augmented) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the pixels' device; the pixels tensor is overwritten."""
        return self.apply(batch.pixels, plan_batch(batch.params))

    def apply(self, images: torch.Tensor, steps: list[Step]) -> torch.Tensor:
        if not steps:
            return images
        fill, uploaded = _upload(self.fill, steps, images.device)
        for step, (rows, args) in zip(steps, uploaded):
            subset = images.index_select(0, rows)
            images.index_copy_(0, rows, _run(step, subset, args, fill))
        return images

    def __repr__(self) -> str:
        return f"DeviceAugment(fill={self.fill})"


def _upload(fill: Sequence[int], steps: list[Step], device: torch.device):
    """(fill (3,) uint8, [(rows (n,) int64, args (n, 6) float64) per step]) on `device`, copied in one
    transfer from pinned memory: a copy from pageable memory may wait for everything queued on the stream
    before it, which would stall the host behind the device."""
    parts = [np.asarray(fill, dtype=np.float64)]
    for step in steps:
        parts += [step.rows.astype(np.float64), np.ascontiguousarray(step.args, dtype=np.float64).ravel()]
    host = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    out, at = [], 3
    for step in steps:
        n, width = len(step.rows), step.args.shape[1]
        rows, at = flat[at : at + n].long(), at + n
        args, at = flat[at : at + n * width].view(n, width), at + n * width
        out.append((rows, args))
    return flat[:3].to(torch.uint8), out


def _run(step: Step, x: torch.Tensor, args: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    kind = step.kind
    if kind == "flip":
        return x.flip(-1)
    if kind == "affine":
        return ops.affine(x, args, fill, step.interpolation)
    if kind in ("auto_contrast", "equalize", "invert"):
        return getattr(ops, kind)(x)
    if kind == "solarize_add":
        return ops.solarize_add(x, args[:, 0], args[:, 1])
    return getattr(ops, kind)(x, args[:, 0])  # posterize, solarize, color, contrast, brightness, sharpness
