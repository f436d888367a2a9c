"""SimMIM (Xie et al., 2022): masked image modelling on the Swin skeleton, as the official models/simmim.py.

    SimMIM = MaskedSwinEncoder -> decoder (1x1 conv to stride^2 x 3 channels -> PixelShuffle(stride)) -> L1 loss
    MaskedSwinEncoder = PatchEmbed -> masked patches replaced by the learned `mask_token` -> SwinLayer x stages
                        -> LayerNorm, the final map (B, C, H/32, W/32)
    loss = mean over masked pixels of |target - reconstruction|, divided by the channel count; the target is
           the normalised image, or with `norm_target` (patch p, odd) each pixel standardised by the mean and
           variance of the p x p window around it (SimMIM v2 / SwinV2's recipe, p = 47)

The encoder is the classifier's SwinTransformer without a head, plus the mask token: the same stages, the same
names, so the state dict is the official one minus its derived buffers (`encoder.*`, `encoder.mask_token`,
`decoder.0.weight`, `decoder.0.bias`). `mask` is what the official MaskGenerator returns per image: 0/1 at the
patch grid, (B, H / patch_size, W / patch_size).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .convert import unwrap_state_dict
from .swin import SwinTransformer

ENCODER_STRIDE = 32  # the official decoder's upsampling: the final stage's stride for 4 stages of patch 4
NORM_TARGET_PATCH = 47  # the official NORM_TARGET.PATCH_SIZE
# buffers the official state dicts hold and ours rebuild from the architecture
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def local_statistics(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of the patch_size x patch_size window around each pixel, per channel, windows
    cut at the border: each (B, C, H, W), as the official norm_targets computes them."""
    if patch_size < 3 or patch_size % 2 != 1:  # a 1-pixel window has no variance: every target would be NaN
        raise ValueError(f"the normalised target's patch must be odd and >= 3, got {patch_size}")
    pool = dict(kernel_size=patch_size, stride=1, padding=patch_size // 2)
    mean = F.avg_pool2d(images, count_include_pad=False, **pool)
    square_mean = F.avg_pool2d(images**2.0, count_include_pad=False, **pool)
    # pixels in each window (fewer at the border): the unbiased variance's n / (n - 1)
    count = F.avg_pool2d(torch.ones_like(images), count_include_pad=True, **pool) * patch_size**2
    return mean, ((square_mean - mean**2.0) * (count / (count - 1))).clamp(min=0.0)


def norm_targets(targets: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each pixel standardised by the mean and variance of the window around it (`local_statistics`):
    (B, C, H, W) -> (B, C, H, W), the official norm_targets."""
    mean, var = local_statistics(targets, patch_size)
    return (targets - mean) / (var + 1.0e-6) ** 0.5


class MaskedSwinEncoder(SwinTransformer):
    """The Swin classifier's skeleton without a head, whose masked patch tokens are replaced by `mask_token`
    after the patch embedding (before the absolute position embedding, as official)."""

    def __init__(self, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) images and (B, H/p, W/p) 0/1 masks -> the final map (B, C, H/32, W/32)."""
        self.check_input(x)
        x = self.patch_embed(x)  # (B, H/p, W/p, C)
        if mask.shape != x.shape[:3]:
            raise ValueError(
                f"the mask must be (B, H/{self.patch_size}, W/{self.patch_size}) = {tuple(x.shape[:3])} for "
                f"these images, got {tuple(mask.shape)}"
            )
        w = mask.unsqueeze(-1).type_as(x)  # (B, H/p, W/p, 1): 1 where the token is masked
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w  # under autocast: the embedding's dtype
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_position_embedding(x.shape[1], x.shape[2])
        x = self.pos_drop(x)
        for layer in self.layers:
            _, x = layer(x)
        return self.norm(x).permute(0, 3, 1, 2)  # (B, C, H/32, W/32)


class SimMIM(nn.Module):
    """The masked encoder, a linear decoder to pixels and the official L1 loss on the masked pixels.
    `norm_target`: None, or the (odd) patch of the normalised target (official: 47)."""

    def __init__(self, encoder: MaskedSwinEncoder, norm_target: int | None = None):
        super().__init__()
        if norm_target is not None and (norm_target < 3 or norm_target % 2 != 1):
            raise ValueError(f"norm_target must be None or an odd patch size >= 3, got {norm_target}")
        stride = encoder.patch_size * 2 ** (len(encoder.layers) - 1)
        if stride != ENCODER_STRIDE:  # the decoder's pixel shuffle would give images of another size
            raise ValueError(
                f"SimMIM decodes from stride {ENCODER_STRIDE}, but this encoder's patch {encoder.patch_size} x "
                f"2^{len(encoder.layers) - 1} merges is stride {stride}; use patch 4 and 4 stages (or patch 8 and 3)"
            )
        self.encoder, self.norm_target = encoder, norm_target
        self.version = encoder.version
        self.encoder_stride = ENCODER_STRIDE
        self.in_chans, self.patch_size = encoder.in_chans, encoder.patch_size
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, ENCODER_STRIDE**2 * 3, kernel_size=1),
            nn.PixelShuffle(ENCODER_STRIDE),
        )

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's pixels (B, 3, H, W), in the target's units (normalised, or per-window standardised
        with norm_target)."""
        return self.decoder(self.encoder(x, mask))

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H/p, W/p) patch mask -> (B, 1, H, W) pixel mask."""
        p = self.patch_size
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).contiguous()

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder learns to output: the image, or its per-window standardisation (norm_target)."""
        return x if self.norm_target is None else norm_targets(x, self.norm_target)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The official loss: L1 over the masked pixels / (masked pixels + 1e-5) / in_chans (a scalar)."""
        l1_sum, masked = self.loss_sums(x, mask)
        return l1_sum / (masked + 1e-5) / self.in_chans

    def loss_sums(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of |target - reconstruction| over the masked pixels and channels, count of masked pixels), in
        float32: what the loss divides, and what a whole validation set sums."""
        reconstruction = self.reconstruct(x, mask).float()
        pixels = self.pixel_mask(mask).to(reconstruction.dtype)
        l1 = F.l1_loss(self.target(x.float()), reconstruction, reduction="none")
        return (l1 * pixels).sum(), pixels.sum()


def simmim_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """A SimMIM checkpoint's tensors (`{'model': sd}`, `sd`, DDP/compile prefixes) in our layout: the official
    derived buffers dropped, V2's old `rpe_mlp` named `cpb_mlp` (as the official remap does)."""
    return {
        key.replace(".rpe_mlp.", ".cpb_mlp."): value
        for key, value in unwrap_state_dict(obj).items()
        if not key.endswith(_DERIVED_BUFFERS)
    }
