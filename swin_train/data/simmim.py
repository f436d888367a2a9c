"""SimMIM pre-training data (the official data/data_simmim_pt.py): the random patch mask, and the transform that
gives each image with its mask.

The mask is drawn as the official MaskGenerator draws it, from numpy's global generator, which every data set
here reseeds per sample from the sampler's key (`seeding.transform_sample`): a sample's mask is a pure function
of (seed, epoch, index), whichever worker draws it, and a resumed run sees the same masks. The image side is the
project's train transform (`transforms.build_train_transform`: fast decode, uint8 batches normalised on the
device) with the official SimMIM settings.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import default_collate

from swin_train.config import AugConfig, DataConfig
from swin_train.data.decode import takes_encoded
from swin_train.data.folder import SKIPPED_LABEL
from swin_train.data.transforms import build_train_transform
from swin_train.errors import ConfigError

# The official SimMIMTransform: RandomResizedCrop(scale=(0.67, 1), ratio=(3/4, 4/3)), RandomHorizontalFlip, no
# colour jitter, RandAugment or erasing (timm's ratio default is the same (3/4, 4/3)).
SIMMIM_AUG = AugConfig(
    auto_augment=None, color_jitter=0.0, reprob=0.0, hflip=0.5, crop_scale=[0.67, 1.0], mixup=0.0, cutmix=0.0
)
SIMMIM_INTERPOLATION = (
    "bilinear"  # torchvision RandomResizedCrop's default, which the official transform keeps
)


class MaskGenerator:
    """The official MaskGenerator: ceil(mask_ratio x N) of the N mask patches (mask_patch_size pixels square)
    chosen at random, as a 0/1 map at the model's patch resolution, (H / model_patch_size, W / model_patch_size)
    uint8 (the official returns the same values as int64). `input_size`: the image side, or (H, W)."""

    def __init__(
        self,
        input_size: int | Sequence[int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else map(int, input_size)
        if min(height, width, mask_patch_size, model_patch_size) < 1:
            raise ConfigError(
                f"SimMIM masks need positive sizes, got image {height}x{width}, mask patch {mask_patch_size}, "
                f"model patch {model_patch_size}"
            )
        if height % mask_patch_size or width % mask_patch_size:
            raise ConfigError(
                f"the mask patch {mask_patch_size} does not divide the image size {height}x{width}; use an "
                f"image size that is a multiple of {mask_patch_size} or another mask patch size"
            )
        if mask_patch_size % model_patch_size:
            raise ConfigError(
                f"the mask patch {mask_patch_size} is not a multiple of the model's patch {model_patch_size}; "
                f"use a multiple of {model_patch_size}"
            )
        if not 0 < mask_ratio < 1:
            raise ConfigError(f"the mask ratio must be in (0, 1), got {mask_ratio}")
        self.input_size = (height, width)
        self.mask_patch_size, self.model_patch_size, self.mask_ratio = (
            mask_patch_size,
            model_patch_size,
            mask_ratio,
        )
        self.rand_size = (height // mask_patch_size, width // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size[0] * self.rand_size[1]
        self.mask_count = int(np.ceil(self.token_count * self.mask_ratio))

    def __call__(self, rng: np.random.RandomState | None = None) -> torch.Tensor:
        """A new mask, drawn from `rng` (default: numpy's global generator, as the official code draws it)."""
        mask_idx = (np.random if rng is None else rng).permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=np.uint8)
        mask[mask_idx] = 1
        mask = mask.reshape(self.rand_size).repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return torch.from_numpy(mask)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )


class SimMIMTransform:
    """image -> (image, mask), as the official SimMIMTransform: the image transform's draws, then the mask's.
    Takes undecoded files when its image transform does (decode.takes_encoded)."""

    def __init__(self, image_transform: Callable, mask_generator: MaskGenerator) -> None:
        self.image_transform, self.mask_generator = image_transform, mask_generator

    @property
    def takes_encoded(self) -> bool:
        return takes_encoded(self.image_transform)

    def __call__(self, image) -> tuple[object, torch.Tensor]:
        return self.image_transform(image), self.mask_generator()

    def __repr__(self) -> str:
        return f"SimMIMTransform({self.image_transform!r}, {self.mask_generator!r})"


def build_simmim_transform(
    data: DataConfig,
    *,
    model_patch_size: int,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    uint8: bool = False,
) -> SimMIMTransform:
    """The official SimMIM pre-training transform at data.img_size with data.mean/std (random-resized crop
    of 67-100% of the image, bilinear, flip, normalise), then the mask (MaskGenerator). `uint8`: the image
    stops at a uint8 tensor, normalised on the device (data.prefetch.DeviceTransform). data.fast_decode
    decodes only the crop, as for classification."""
    image = build_train_transform(replace(data, interpolation=SIMMIM_INTERPOLATION), SIMMIM_AUG, uint8=uint8)
    return SimMIMTransform(image, MaskGenerator(data.img_size, mask_patch_size, model_patch_size, mask_ratio))


class FixedMaskTransform:
    """image -> (image, mask) for validation: the eval transform, then a mask drawn from a generator seeded by
    the transformed image's bytes (crc32). Each validation image has one mask whatever its position, the
    number of processes or workers, or the epoch, from any data source, so epochs compare like for like."""

    def __init__(self, image_transform: Callable, mask_generator: MaskGenerator) -> None:
        self.image_transform, self.mask_generator = image_transform, mask_generator

    @property
    def takes_encoded(self) -> bool:
        return takes_encoded(self.image_transform)

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.image_transform(image)
        seed = zlib.crc32(pixels.numpy().tobytes())
        return pixels, self.mask_generator(np.random.RandomState(seed))

    def __repr__(self) -> str:
        return f"FixedMaskTransform({self.image_transform!r}, {self.mask_generator!r})"


def masked_batch(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The loaders' collate for SimMIM: ((image, mask), label) samples -> (images, masks), the labels dropped.
    An image evaluation left out (SKIPPED_LABEL: a file that did not decode) gets an empty mask, so that it
    counts in no loss."""
    images = default_collate([image for (image, _), _ in samples])
    masks = torch.stack([mask for (_, mask), _ in samples])
    skipped = torch.tensor([label == SKIPPED_LABEL for _, label in samples])
    masks[skipped] = 0
    return images, masks
