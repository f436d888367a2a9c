"""The model at any H x W (issue 31): the configured square size keeps its pinned outputs bit for bit, other
sizes pad and mask as the official detection backbone does."""

import hashlib

import pytest
import torch
import torch.nn.functional as F
from test_model import _official_mask
from timm.models.swin_transformer import SwinTransformer as TimmSwinV1
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

from swin_train.loading import load_pretrained
from swin_train.models import swin
from swin_train.models.convert import convert_state_dict
from swin_train.models.flex import flex_window_attention
from swin_train.models.swin import SwinBlock, SwinTransformer, sdpa_windows
from swin_train.models.windows import GatherTokens, window_layout, window_partition

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


# ---------------------------------------------------------------------------------------------------
# The detection rule written out: pad, roll, partition, the official mask (test_model._official_mask)


def reference_block(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The official detection backbone's SwinTransformerBlock on our block's modules, window and shift: the
    map padded at the bottom and right (after norm1 in V1), rolled, cut into windows, attended with the mask of
    the padded map, reversed, rolled back and cropped. (B, H, W, C) -> (B, H, W, C), eval mode."""
    B, H, W, C = x.shape
    window, shift = block.window, block.shift
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    h = F.pad(x if block.post_norm else block.norm1(x), (0, 0, 0, Wp - W, 0, Hp - H))
    h = torch.roll(h, (-shift, -shift), (1, 2)) if shift else h
    mask = _official_mask(Hp, Wp, window, shift) if shift else None
    out = block.attn(window_partition(h, window), mask)  # (B * nW, N, C)
    out = out.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(B, Hp, Wp, C)
    out = (torch.roll(out, (shift, shift), (1, 2)) if shift else out)[:, :H, :W]
    x = x + (block.norm1(out) if block.post_norm else out)
    return x + (block.norm2(block.mlp(x)) if block.post_norm else block.mlp(block.norm2(x)))


def reference_stages(model: SwinTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """The official detection backbone's forward (patch embedding padded to whole patches, the absolute
    position embedding interpolated bicubically, patch merging padded to even sizes) on `model`'s modules:
    each stage's (B, H_i, W_i, C_i) map."""
    H, W, p = *images.shape[2:], model.patch_size
    images = F.pad(images, (0, -W % p, 0, -H % p))
    x = model.patch_embed.norm(model.patch_embed.proj(images).permute(0, 2, 3, 1))
    if model.absolute_pos_embed is not None:
        grid = model.stage_resolutions[0]
        embed = model.absolute_pos_embed.view(1, *grid, -1).permute(0, 3, 1, 2)
        x = x + F.interpolate(embed, size=x.shape[1:3], mode="bicubic").permute(0, 2, 3, 1)
    stages = []
    for layer in model.layers:
        for block in layer.blocks:
            x = reference_block(block, x)
        stages.append(x)
        merge = layer.downsample
        if merge is not None:
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = merge.norm(merge.reduction(x)) if merge.norm_last else merge.reduction(merge.norm(x))
    return stages


def randomised(model: SwinTransformer) -> SwinTransformer:
    """Every norm, bias and logit scale drawn from N(0, 0.5) (V2's post-norms start at 0), in eval mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1 or "logit_scale" in name:
                param.normal_(0.0, 0.5)
    return model.eval()


def micro(version: int = 1, **overrides) -> SwinTransformer:
    return randomised(
        SwinTransformer(**{**PINNED_ARCH, "version": version, "drop_path_rate": 0.0, **overrides})
    )


@pytest.mark.parametrize(
    "H,W,window,shift", [(8, 8, 4, 2), (5, 9, 4, 2), (11, 17, 7, 3), (3, 3, 7, 3), (13, 6, 4, 0)]
)
def test_window_tables_are_padding_roll_and_partition_with_the_official_mask_of_the_padded_map(
    H, W, window, shift
):
    order, inverse, mask = window_layout(H, W, window, shift)
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    tokens = F.pad(torch.arange(H * W).view(1, H, W, 1), (0, 0, 0, Wp - W, 0, Hp - H), value=H * W)
    expected = window_partition(torch.roll(tokens, (-shift, -shift), (1, 2)), window).flatten()
    assert torch.equal(order, expected)
    assert torch.equal(order[inverse], torch.arange(H * W))
    if shift:
        assert torch.equal(mask, _official_mask(Hp, Wp, window, shift))
    else:
        assert mask is None


def test_the_padded_gather_has_exact_gradients_both_ways():
    order, inverse, _ = window_layout(5, 9, 4, 2)  # 45 tokens in 2 x 3 windows of 16 (96 positions)
    x = torch.randn(2, 45, 3, dtype=torch.float64, requires_grad=True)
    windows = GatherTokens.apply(x, order, inverse)
    assert windows.shape == (2, 96, 3) and windows[:, order == 45].abs().sum() == 0  # the padding is zeros
    assert torch.equal(GatherTokens.apply(windows, inverse, order), x)
    assert torch.autograd.gradcheck(lambda t: GatherTokens.apply(t, order, inverse), (x,))
    padded = torch.randn(2, 96, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: GatherTokens.apply(t, inverse, order), (padded,))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("always_partition", [False, True])
def test_stage_maps_at_any_size_equal_the_official_detection_rule_written_out(version, always_partition):
    """Padded images, maps and merges, non-square and window-indivisible, under the classification rule (the
    last stage one unshifted window of 4 at the configured size) and the detection rule (every block shifts)."""
    model = micro(version, always_partition=always_partition, ape=version == 1)
    windows = [(b.window, b.shift) for b in model.layers[2].blocks]
    assert windows == ([(4, 0), (4, 2)] if always_partition else [(4, 0), (4, 0)])
    for size in [(32, 32), (37, 53), (30, 46), (9, 60)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours, reference = model.forward_stages(images), reference_stages(model, images)
        grid = (-(-size[0] // 2), -(-size[1] // 2))
        assert ours[0].shape == (2, *grid, 24) and ours[2].shape == (
            2,
            -(-grid[0] // 4),
            -(-grid[1] // 4),
            96,
        )
        for stage, (a, b) in enumerate(zip(ours, reference)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{size} stage {stage}")
        features = model.forward_features(images)
        assert all(torch.equal(f, s.permute(0, 3, 1, 2)) for f, s in zip(features, ours))


@pytest.mark.parametrize("version", [1, 2])
def test_a_classifier_runs_at_non_square_window_indivisible_sizes_and_its_configured_size_is_unchanged(
    version,
):
    model = pinned_model(version).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.tensor([float.fromhex(v) for v in PINNED[version][0]]).view(8, 3)
        assert torch.equal(model(x), expected)
        for size in [(37, 53), (53, 30)]:
            images = torch.randn(2, 3, *size)
            logits = model(images)
            stages = reference_stages(model, images)
            head = model.head(model.norm(stages[-1]).mean(dim=(1, 2)))
            assert logits.shape == (2, 3)
            torch.testing.assert_close(logits, head, rtol=1e-5, atol=1e-5)


def test_window_tables_are_made_once_per_stage_shift_and_size_and_never_at_the_configured_size(monkeypatch):
    model = micro(always_partition=True)  # 3 stages, each with a shift-0 and a shifted block
    made = []
    real = swin.window_layout
    monkeypatch.setattr(swin, "window_layout", lambda *args, **kw: made.append(args[:4]) or real(*args, **kw))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32))
        assert made == []  # the buffers
        for _ in range(3):
            model(torch.randn(2, 3, 37, 53))
    assert sorted(made) == sorted((*r, 4, s) for r in [(19, 27), (10, 14), (5, 7)] for s in (0, 2))
    assert "_layouts" not in str(model.state_dict().keys()) and len(model.state_dict()) == len(
        SwinTransformer(**PINNED_ARCH, always_partition=True).state_dict()
    )
    block = model.layers[0].blocks[0]
    for side in range(40, 40 + 2 * swin.CACHED_SIZES, 2):
        model(torch.randn(1, 3, side, side))
    assert len(block._layouts) == swin.CACHED_SIZES  # the least recently used sizes are dropped


@pytest.mark.parametrize(
    "shape,message",
    [
        (
            (1, 3, 7, 40),
            "a 7x40 image is 4x20 patches, smaller than one window (4x4); give images of at least 8x8",
        ),
        ((1, 1, 32, 32), "the model takes images (B, 3, H, W), got (1, 1, 32, 32)"),
        ((3, 32, 32), "the model takes images (B, 3, H, W), got (3, 32, 32)"),
    ],
)
def test_an_image_smaller_than_a_window_or_of_other_channels_is_a_one_line_error(shape, message):
    model = micro()
    assert model.min_input_size == (8, 8)
    with pytest.raises(ValueError) as error:
        model(torch.randn(*shape))
    assert str(error.value) == message


@pytest.mark.parametrize("version", [1, 2])
def test_features_equal_timms_always_partition_where_their_rules_agree(version):
    """timm pads after the roll (the official code before it): at sizes whose stages windows tile, the two
    agree, every stage shifted (always_partition)."""
    cls = TimmSwinV1 if version == 1 else TimmSwinV2
    arch = {k: v for k, v in PINNED_ARCH.items() if k != "num_classes"}
    theirs = randomised(cls(**arch, num_classes=3, always_partition=True, strict_img_size=False))
    ours = SwinTransformer(**PINNED_ARCH, version=version, always_partition=True).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()))
    for size in [(32, 32), (32, 64), (64, 32)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = theirs.forward_intermediates(images, intermediates_only=True)
            for a, b in zip(ours.forward_features(images), expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_at_several_sizes_the_model_makes_two_graphs_and_eager_outputs():
    """The first size compiles for it (the configured size: the buffers); at the second dynamo makes the sizes
    dynamic, and the model has no branch on a size it does not know, so that graph serves every later size."""
    model = micro(depths=(2, 2), num_heads=(2, 4))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    try:
        for size in [(32, 32), (37, 53), (48, 40), (33, 100), (32, 32)]:
            images = torch.randn(2, 3, *size)
            with torch.no_grad():
                torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
        assert len(graphs) == 2
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, on purpose
def test_sdpa_and_flex_take_the_mask_of_a_padded_map(shift):
    """The CUDA paths (SDPA's 4-D call, FlexAttention's score_mod; run here on CPU, forward) give the explicit
    path's numbers with the tables of a padded 5x9 map."""
    block = SwinBlock(16, (5, 9), num_heads=2, window=4, shift=shift).eval()
    attn, (_, _, mask) = block.attn, window_layout(5, 9, 4, shift)
    num_windows = 6
    windows = torch.randn(3 * num_windows, 16, 16)  # 3 images x 6 windows of 4x4 tokens
    with torch.no_grad():  # FlexAttention has no CPU backward
        q, k, v = attn.qkv(windows).view(18, 16, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        bias = attn.relative_position_bias()
        if shift:
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)
        expected = attn(windows, mask)
        out = sdpa_windows(q, k, v, bias).reshape(18, 2, 16, 8).transpose(1, 2).reshape(18, 16, 16)
        torch.testing.assert_close(attn.proj(out), expected, rtol=1e-5, atol=1e-5)
        table, index = attn.relative_position_bias_table, attn.relative_position_index
        out = flex_window_attention(
            q, k, v, table, index, mask, num_windows, attn.head_dim**-0.5, compiled=False
        )
        out = out.transpose(1, 2).reshape(18, 16, 16)
        torch.testing.assert_close(attn.proj(out), expected, rtol=1e-5, atol=1e-5)


def test_a_square_absolute_position_embedding_fine_tunes_into_a_non_square_model_bicubically():
    square = micro(ape=True)  # a 16 x 16 grid
    wide = SwinTransformer(**{**PINNED_ARCH, "img_size": (32, 48)}, ape=True)  # 16 x 24
    report = load_pretrained(wide, square.state_dict())
    assert report.interpolated == ["absolute_pos_embed"]
    grid = square.absolute_pos_embed.detach().view(1, 16, 16, 24).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 24), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(wide.absolute_pos_embed.detach(), expected.reshape(1, 16 * 24, 24))
