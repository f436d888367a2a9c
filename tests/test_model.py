import json

import pytest
import timm
import torch
import torchvision

from swin_train import SwinTransformer, convert_state_dict, create_model
from swin_train.cli.model import cli as swin_model_cli
from swin_train.errors import CheckpointError
from swin_train.models.convert import detect_layout, official_buffers
from swin_train.models.registry import VARIANTS
from swin_train.models.swin import (
    Residual,
    SwinBlock,
    _GatherTokens,
    relative_position_index,
    sdpa_windows,
    shifted_window_mask,
    window_partition,
    window_token_order,
)

# shared/REFERENCE.md: parameters (1000 classes) and multiply-adds
REFERENCE = {
    "swin_tiny_patch4_window7_224": (28_288_354, 4.494e9),
    "swin_small_patch4_window7_224": (49_606_258, 8.747e9),
    "swin_base_patch4_window7_224": (87_768_224, 15.438e9),
    "swin_large_patch4_window7_224": (196_532_476, 34.487e9),
    "swin_tiny_patch4_window12_384": (28_338_034, 14.005e9),
    "swin_small_patch4_window12_384": (49_707_778, 27.005e9),
    "swin_base_patch4_window12_384": (87_903_584, 47.105e9),
    "swin_large_patch4_window12_384": (196_735_516, 103.952e9),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_params_and_flops_match_the_paper(name):
    with torch.device("meta"):  # no memory, no init cost: only shapes matter here
        model = create_model(name)
    params, macs = REFERENCE[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert abs(model.flops() - macs) / macs < 0.01


def test_registry_holds_exactly_the_official_names():
    assert {name for name, arch in VARIANTS.items() if arch["version"] == 1} == set(REFERENCE)


def _copy_into_ours(foreign_sd, **arch):
    model = SwinTransformer(**(arch or VARIANTS["swin_tiny_patch4_window7_224"])).eval()
    model.load_state_dict(convert_state_dict(foreign_sd), strict=True)
    return model


def test_same_logits_as_timm_swin_tiny():
    theirs = timm.create_model("swin_tiny_patch4_window7_224").eval()
    assert detect_layout(theirs.state_dict()) == "timm"
    ours = _copy_into_ours(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)  # 6,272 stage-1 rows: the oneDNN kernels of models.ops run too
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def test_same_logits_as_torchvision_swin_t():
    theirs = torchvision.models.swin_t().eval()
    assert detect_layout(theirs.state_dict()) == "torchvision"
    ours = _copy_into_ours(theirs.state_dict())
    x = torch.randn(2, 3, 224, 224)  # 6,272 stage-1 rows: the oneDNN kernels of models.ops run too
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def test_official_layout_with_buffers_loads(micro_arch):
    source = SwinTransformer(**micro_arch).eval()
    official = dict(source.state_dict())
    official.update(official_buffers(source))  # official checkpoints also store the derived buffers
    assert any(k.endswith("attn_mask") for k in official)
    assert detect_layout({"model": official}["model"]) == "official"
    ours = _copy_into_ours({"model": official}, **micro_arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), source(x))


def test_buffers_are_not_in_the_state_dict(micro_arch):
    keys = SwinTransformer(**micro_arch).state_dict().keys()
    assert not [k for k in keys if k.endswith(("relative_position_index", "attn_mask"))]
    assert "layers.0.downsample.reduction.weight" in keys and "head.weight" in keys


def test_unknown_layout_names_the_keys():
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.layer.0.weight"):
        convert_state_dict({"encoder.layer.0.weight": torch.zeros(1)})


def _official_mask(H, W, window, shift):
    """The official repository's construction, loop for loop."""
    img_mask = torch.zeros((1, H, W, 1))
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, window).view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


@pytest.mark.parametrize("H,window,shift", [(8, 4, 2), (56, 7, 3), (12, 6, 3)])
def test_shift_mask_matches_official(H, window, shift):
    mask = shifted_window_mask(H, H, window, shift)
    assert torch.equal(mask, _official_mask(H, H, window, shift))
    # interior windows (not touching the bottom/right border) are unmasked
    per_row = H // window
    assert mask[0].abs().sum() == 0 and mask[per_row - 1].abs().sum() > 0 and mask[-1].abs().sum() > 0


def test_relative_position_index_range_and_symmetry():
    index = relative_position_index(7)
    assert index.shape == (49, 49) and index.min() == 0 and index.max() == 13 * 13 - 1
    assert torch.all(index.diagonal() == 6 * 13 + 6)  # zero offset sits at the table's centre


def test_window_partition_order():
    x = torch.randn(2, 8, 8, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 4, 16, 5)
    assert torch.equal(windows[1], x[0, :4, 4:8].reshape(16, 5))  # second window: top-right


@pytest.mark.parametrize("shifted", [False, True])
def test_sdpa_windows_equals_the_explicit_attention(shifted):
    """The CUDA path's 4-D SDPA call (run here on CPU) gives the CPU path's numbers."""
    block = SwinBlock(16, (8, 8), num_heads=2, window=4, shift=2 if shifted else 0).eval()
    attn, mask = block.attn, block.attn_mask
    windows = torch.randn(3 * 4, 16, 16)  # 3 images x 4 windows of 4x4 tokens
    qkv = attn.qkv(windows).view(12, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    bias = attn.relative_position_bias()
    if shifted:
        bias = bias.unsqueeze(0) + mask.unsqueeze(1)
    with torch.no_grad():
        out = sdpa_windows(*qkv.unbind(0), bias).reshape(12, 2, 16, 8).transpose(1, 2).reshape(12, 16, 16)
        torch.testing.assert_close(attn.proj(out), attn(windows, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_token_gather_is_shift_and_partition_with_exact_gradients(shift):
    """SwinBlock's one-gather shift + partition equals roll + window_partition, and back."""
    x = torch.randn(2, 8, 12, 3, dtype=torch.float64, requires_grad=True)
    order = window_token_order(8, 12, 4, shift)
    inverse = torch.argsort(order)
    windows = _GatherTokens.apply(x.view(2, 96, 3), order, inverse).view(-1, 16, 3)
    assert torch.equal(windows, window_partition(torch.roll(x, (-shift, -shift), (1, 2)), 4))
    back = _GatherTokens.apply(windows.view(2, 96, 3), inverse, order).view(2, 8, 12, 3)
    assert torch.equal(back, x)
    assert torch.autograd.gradcheck(lambda t: _GatherTokens.apply(t, order, inverse), (x.view(2, 96, 3),))


def test_blocks_alternate_and_window_shrinks(micro_arch):
    model = SwinTransformer(**{**micro_arch, "depths": (2, 2, 2), "num_heads": (2, 4, 8)})
    stage0, stage1, stage2 = model.layers  # 16x16, 8x8, 4x4 tokens; window 4
    assert [(b.window, b.shift) for b in stage0.blocks] == [(4, 0), (4, 2)]
    assert [(b.window, b.shift) for b in stage1.blocks] == [(4, 0), (4, 2)]
    # 4x4 is not larger than the window: one window, no shift, no mask
    assert [(b.window, b.shift) for b in stage2.blocks] == [(4, 0), (4, 0)]
    assert stage2.blocks[1].attn_mask is None and stage2.downsample is None
    small = SwinTransformer(**{**micro_arch, "img_size": 16, "window_size": 8})  # 8x8 then 4x4 tokens
    assert [(b.window, b.shift) for b in small.layers[0].blocks] == [(8, 0), (8, 0)]
    assert [(b.window, b.shift) for b in small.layers[1].blocks] == [(4, 0), (4, 0)]
    assert small(torch.randn(1, 3, 16, 16)).shape == (1, 1000)


def test_drop_path_is_off_in_eval(micro_arch):
    model = SwinTransformer(**micro_arch, drop_path_rate=0.5, num_classes=5)
    plain = SwinTransformer(**micro_arch, drop_path_rate=0.0, num_classes=5)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), plain(x))  # stochastic depth active in training


def _rowwise_branch(seen: list[int]):
    """A branch whose every sample is computed on its own (as in a Swin block); records the batch sizes it saw."""
    layer = torch.nn.Linear(6, 6)

    def branch(t):
        seen.append(t.shape[0])
        return torch.nn.functional.gelu(layer(t))

    return branch, layer


@pytest.mark.parametrize("drop_prob", [0.3, 0.9])
def test_stochastic_depth_skips_dropped_samples_with_timm_numbers(drop_prob):
    """Residual = x + timm's DropPath(branch(x)) with the same random draws, values and gradients; the
    branch runs on the kept samples only (their count rounded up to a multiple of batch / 8)."""
    seen = []
    branch, layer = _rowwise_branch(seen)
    x = torch.randn(16, 3, 3, 6, requires_grad=True)
    residual = Residual(drop_prob).train()
    torch.manual_seed(7)  # 10 of 16 kept at 0.3; 3 at 0.9, computed as 4 (a multiple of 16 / 8)
    out = residual(x, branch)
    out.square().sum().backward()
    ours = out.detach(), x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    torch.manual_seed(7)
    reference = x + timm.layers.DropPath(drop_prob)(branch(x))
    reference.square().sum().backward()
    # fp32: x * (1 / keep) here, x / keep * mask in timm
    torch.testing.assert_close(ours[0], reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[2], layer.weight.grad, rtol=1e-5, atol=1e-5)
    kept = int((ours[0] != x.detach()).flatten(1).any(1).sum())
    assert 0 < kept < 15 and seen[0] == kept + kept % 2 and seen[1] == 16  # ours on the kept, timm on all


def test_stochastic_depth_runs_the_branch_when_all_are_dropped():
    """No sample kept: the branch still runs (so that data-parallel ranks all see its parameters used)."""
    seen = []
    branch, layer = _rowwise_branch(seen)
    x = torch.randn(4, 6)
    out = Residual(0.999999).train()(x, branch)
    out.sum().backward()
    assert seen == [4] and torch.equal(out, x) and torch.equal(layer.weight.grad, torch.zeros(6, 6))
    assert torch.equal(Residual(0.999999).eval()(x, branch), x + branch(x))  # off in evaluation


def test_stochastic_depth_compiles_without_a_graph_break():
    """Compiled, the mask multiplies the branch (fixed shapes): one graph, timm's numbers."""
    seen = []
    branch, _ = _rowwise_branch(seen)
    x = torch.randn(8, 6)
    compiled = torch.compile(lambda t: Residual(0.5).train()(t, branch), fullgraph=True, backend="eager")
    torch.manual_seed(3)
    out = compiled(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, x + timm.layers.DropPath(0.5)(branch(x)), rtol=1e-6, atol=1e-6)
    assert seen[-2:] == [8, 8]


def test_drop_path_rates_are_linear(micro_arch):
    model = SwinTransformer(**micro_arch, drop_path_rate=0.3)
    rates = [
        b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
        for layer in model.layers
        for b in layer.blocks
    ]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
def test_gradient_checkpointing_gives_the_same_gradients(micro_arch, drop_path_rate):
    """Recomputed in the backward, a block draws the same stochastic-depth mask and skips the same samples."""
    plain = SwinTransformer(**micro_arch, drop_path_rate=drop_path_rate, num_classes=7)
    ckpt = SwinTransformer(
        **micro_arch, drop_path_rate=drop_path_rate, num_classes=7, grad_checkpointing=True
    )
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 32, 32)
    for model in (plain, ckpt):
        torch.manual_seed(0)
        model(x).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_feature_extractor_and_stage_maps(micro_arch):
    model = SwinTransformer(**micro_arch, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert [tuple(f.shape) for f in features] == [(2, 24, 16, 16), (2, 48, 8, 8)]
    assert model(x).shape == (2, 48)
    assert "head.weight" not in model.state_dict()


def test_absolute_position_embedding(micro_arch):
    model = SwinTransformer(**micro_arch, ape=True)
    assert model.state_dict()["absolute_pos_embed"].shape == (1, 256, 24)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_create_model_overrides(micro_arch):
    model = create_model("swin_tiny_patch4_window7_224", num_classes=10, depths=(1, 1, 1, 1))
    assert model.num_classes == 10 and model.depths == (1, 1, 1, 1) and model.embed_dim == 96
    model = create_model(**micro_arch, num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_swin_model_json(capsys):
    assert swin_model_cli(["--model", "swin_tiny_patch4_window7_224", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 28_288_354
    assert abs(out["flops"] - 4.494e9) / 4.494e9 < 0.01
    assert [layer["depth"] for layer in out["layers"]] == [2, 2, 6, 2]
    assert [b["type"] for b in out["layers"][2]["blocks"]] == ["W-MSA", "SW-MSA"] * 3
    assert out["layers"][3]["blocks"][1]["type"] == "W-MSA"  # 7x7 map, window 7: no shift
    parts = out["patch_embed"]["params"] + sum(x["params"] for x in out["layers"]) + out["head"]["params"]
    assert parts == out["params"]
    assert (
        out["patch_embed"]["flops"] + sum(x["flops"] for x in out["layers"]) + out["head"]["flops"]
        == out["flops"]
    )


def test_swin_model_table_and_bad_name(capsys):
    assert swin_model_cli(["--model", "swin_tiny_patch4_window7_224"]) == 0
    table = capsys.readouterr().out
    assert "Layer 2" in table and "SW-MSA (shift 3)" in table and "28,288,354" in table and "4.494G" in table
    assert swin_model_cli(["--model", "swin_tiny_patch4_window7"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swin_tiny_patch4_window7'" in err and "Traceback" not in err


def test_compiles_as_one_graph_with_the_same_logits_and_gradients(micro_arch):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without the slow C++
    code generation of inductor, so the check fits in CI."""
    eager = SwinTransformer(**micro_arch, num_classes=5, drop_path_rate=0.0)
    twin = SwinTransformer(**micro_arch, num_classes=5, drop_path_rate=0.0)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    out_eager, out_compiled = eager(x), compiled(x)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
