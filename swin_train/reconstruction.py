"""Watching SimMIM learn: the masked reconstruction loss over the whole validation set, and a picture of a few
validation images (original | masked | reconstruction) per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from swin_train.data.prefetch import DeviceTransform, prefetch
from swin_train.device import Amp
from swin_train.distributed import all_reduce_sum
from swin_train.models.simmim import SimMIM

PICTURES = "reconstructions"  # the run folder's sub-folder of per-epoch pictures


@torch.no_grad()
def reconstruction_loss(
    model: SimMIM,
    loader,
    *,
    device: torch.device,
    amp: Amp,
    device_transform: DeviceTransform | None = None,
    keep: int = 0,
) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None]:
    """({"loss", "num_samples", "num_skipped"}, the first `keep` (images, masks) of this process or None;
    images evaluation left out are not kept: they have no pixels to picture).

    The loss is the official one over the whole set, summed over processes: the L1 over every masked pixel
    / the masked pixels / the channels (not a mean of per-batch losses, which would weigh a short last batch
    as a full one). Images evaluation left out (data.skip_bad_images) come with empty masks and count nowhere.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # L1 sum, masked pixels, images, left out
    transform = None if device_transform is None else (lambda images, _: device_transform(images))
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images, masks in prefetch(loader, device, transform):
        with amp.autocast():
            l1_sum, masked = model.loss_sums(images, masks)
        counted = masks.flatten(1).bool().any(1)
        totals += torch.stack([l1_sum, masked, counted.sum(), (~counted).sum()]).to(totals.dtype)
        wanted = keep - sum(len(m) for _, m in kept)
        if wanted > 0 and counted.any():
            chosen = counted.nonzero().flatten()[:wanted]
            kept.append((images[chosen], masks[chosen]))
    l1_sum, masked, count, skipped = all_reduce_sum(totals).tolist()
    loss = l1_sum / (masked + 1e-5) / model.in_chans if count else float("nan")
    pictured = (torch.cat([i for i, _ in kept]), torch.cat([m for _, m in kept])) if kept else None
    return {"loss": loss, "num_samples": int(count), "num_skipped": int(skipped)}, pictured


@torch.no_grad()
def reconstruction_picture(
    model: SimMIM,
    images: torch.Tensor,
    masks: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    amp: Amp,
) -> torch.Tensor:
    """(3, H', W') uint8: one row per image, original | masked (grey where masked) | reconstruction (the
    decoder's pixels where masked, the original elsewhere), in image colours.

    All three are in the loss's units, what the decoder is asked for: with a normalised target (norm_target)
    the "original" is the image standardised per window (its edges and textures, contrast evened out). Turning
    the decoder's output back into pixels would take each window's mean and variance from the original, hidden
    pixels included, and paint their blur into the holes, as if the model had seen them."""
    model.eval()
    with amp.autocast():
        output = model.reconstruct(images, masks).float()
    mean_ = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_ = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    original = (model.target(images.float()) * std_ + mean_).clamp(0, 1)
    reconstruction = (output * std_ + mean_).clamp(0, 1)
    hidden = model.pixel_mask(masks).float()  # (B, 1, H, W), 1 where masked
    masked = original * (1 - hidden) + 0.5 * hidden
    pasted = original * (1 - hidden) + reconstruction * hidden
    rows = torch.stack([original, masked, pasted], dim=1).flatten(0, 1)  # (3B, 3, H, W): a row per image
    return (make_grid(rows, nrow=3, padding=2, pad_value=1.0) * 255).round().to(torch.uint8).cpu()


def save_picture(picture: torch.Tensor, out: Path, epoch: int) -> Path:
    """The picture as OUT/reconstructions/epoch_NNNN.png (`epoch` counted from 1), written whole or not at all."""
    from swin_train.checkpoint import write_atomically

    path = out / PICTURES / f"epoch_{epoch:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(picture.permute(1, 2, 0).numpy())
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
