"""In-memory random images: measures the training loop without decoding (`data.synthetic: true`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from swin_train.data.folder import SampleKey, split_key
from swin_train.models.swin import image_size


class SyntheticDataset(Dataset):
    """Random normalised images (3, H, W) of `img_size` (one side, or (H, W)) with deterministic labels. Holds a pool of at most `pool_size`
    distinct images (memory stays small at 224+); sample i shows pool image i % pool_size."""

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        img_size: int | Sequence[int],
        seed: int = 0,
        pool_size: int = 64,
    ):
        g = torch.Generator().manual_seed(seed)
        self.num_samples = num_samples
        self.images = torch.randn(min(pool_size, num_samples), 3, *image_size(img_size), generator=g)
        self.labels = torch.randint(num_classes, (num_samples,), generator=g)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        index, _ = split_key(key)
        return self.images[index % len(self.images)], int(self.labels[index])
