"""The model at any H x W (issue 31): the configured square size keeps its pinned outputs bit for bit, other
sizes pad and mask as the official detection backbone does."""

import hashlib

import pytest
import torch

from swin_train.models.swin import SwinTransformer

# Three stages of 16x16, 8x8 and 4x4 tokens with windows of 4: stages 0 and 1 shift (and mask), stage 2 is one
# unshifted window (the classification rule).
PINNED_ARCH = dict(
    img_size=32,
    patch_size=2,
    embed_dim=24,
    depths=(2, 2, 2),
    num_heads=(2, 4, 8),
    window_size=4,
    num_classes=3,
)

# Logits (8 images x 3 classes, float32 as hex), the training loss and a sha256 of every parameter's gradient,
# computed with the model as it was before arbitrary sizes (torch 2.14.1, CPU, one thread). V1 with an absolute
# position embedding, V2 without; drop path 0.2 in training, so the kept-samples path of Residual runs.
PINNED = {
    1: (
        [
            "0x1.591b2ap-3", "-0x1.29c8e2p-2", "-0x1.0570c8p-2", "0x1.58ec1ep-3", "-0x1.2a0ebp-2", "-0x1.0550bep-2",
            "0x1.58d836p-3", "-0x1.29edaap-2", "-0x1.05a2c8p-2", "0x1.58e658p-3", "-0x1.29ee44p-2", "-0x1.05656p-2",
            "0x1.590d22p-3", "-0x1.2a0792p-2", "-0x1.054f0ep-2", "0x1.592da8p-3", "-0x1.29de5cp-2", "-0x1.05742p-2",
            "0x1.58df16p-3", "-0x1.29e23p-2", "-0x1.055f94p-2", "0x1.58c8f4p-3", "-0x1.29edecp-2", "-0x1.056ff6p-2",
        ],
        "0x1.e3b63p-5",
        "6211aa1290e6140e1feb0b9bde09c519fbbfbee83598e4fee0cd12c7a503de4c",
    ),
    2: (
        [
            "-0x1.7de63cp-2", "0x1.4867ep-1", "0x1.2d7d34p-2", "-0x1.7d19c4p-2", "0x1.485dfp-1", "0x1.2cecb8p-2",
            "-0x1.7d4ce2p-2", "0x1.480becp-1", "0x1.2da872p-2", "-0x1.7e0094p-2", "0x1.480804p-1", "0x1.2cc1e8p-2",
            "-0x1.7cf21ap-2", "0x1.485436p-1", "0x1.2c27eep-2", "-0x1.7c953cp-2", "0x1.484e4ap-1", "0x1.2c36a6p-2",
            "-0x1.7e6312p-2", "0x1.47b4c4p-1", "0x1.2d11e8p-2", "-0x1.7c975p-2", "0x1.48320ep-1", "0x1.2e0d6cp-2",
        ],
        "0x1.bdba9ep-3",
        "99ee4e9790e18129eb1e6c650dbdf3e3e6ec0632d85d92c5e7f1f65f9e46556a",
    ),
}  # fmt: skip


def pinned_model(version: int) -> SwinTransformer:
    """The pinned micro model: seed 0, drop path 0.2, every norm, bias and logit scale drawn from N(0, 0.5) so
    that no parameter sits at an initial value that would hide it."""
    torch.manual_seed(0)
    model = SwinTransformer(**PINNED_ARCH, version=version, drop_path_rate=0.2, ape=version == 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1 or "logit_scale" in name:
                param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("version", [1, 2])
def test_the_configured_size_gives_the_pinned_logits_loss_and_gradients_bit_for_bit(version):
    logits_hex, loss_hex, grads_sha = PINNED[version]
    model = pinned_model(version)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 8 x 256 rows: oneDNN linears
    with torch.no_grad():
        logits = model.eval()(x)
    expected = torch.tensor([float.fromhex(v) for v in logits_hex]).view(8, 3)
    assert torch.equal(logits, expected), (logits - expected).abs().max()
    model.train()
    torch.manual_seed(2)
    loss = model(x).square().mean()
    loss.backward()
    assert float(loss.detach()).hex() == float.fromhex(loss_hex).hex()
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.grad.numpy().tobytes())
    assert digest.hexdigest() == grads_sha
