import pytest
import torch

MICRO = dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def micro_arch():
    """A micro Swin: 16x16 tokens, two stages, windows of 4 (stage 1 at 8x8 still shifts)."""
    return dict(MICRO)
