"""SwinV2 on the V1 skeleton: the official table's parameters and FLOPs, the same logits as timm's,
torchvision's and transformers' SwinV2 with converted weights, the official formulas of its attention, and
weights of a 192/w12 model that run at 256/w16 and 384/w24 without interpolation."""

import json
import math
import os

import onnxruntime
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import MICRO_OVERRIDES, load_module
from test_flex import flex_cpu_backward  # noqa: F401 (a fixture)
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
from transformers import Swinv2ForImageClassification

from swin_train.checkpoint import save_checkpoint
from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.export import cli as swin_export
from swin_train.cli.model import cli as swin_model_cli
from swin_train.cli.train import cli as train_cli
from swin_train.config import config_to_dict, dump_config, load_config
from swin_train.data.transforms import Preprocess
from swin_train.errors import CheckpointError
from swin_train.loading import load_exact_weights, load_pretrained, load_trained_model
from swin_train.models.attention import CosineWindowAttention, log_spaced_coords
from swin_train.models.convert import (
    block_buffers,
    check_saved_geometry,
    convert_state_dict,
    detect_layout,
    infer_arch,
    save_weights,
    saved_pretrained_window,
    swin_version,
    to_layout,
)
from swin_train.models.flex import flex_window_attention
from swin_train.models.hf import load_hf_folder
from swin_train.models.registry import VARIANTS
from swin_train.models.swin import SwinTransformer, shifted_window_mask
from swin_train.optim import param_group_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")

# Parameters counted with the official models/swin_transformer_v2.py (microsoft/Swin-Transformer f82860b) at
# each config's number of classes, and FLOPs from the official README (None: not in the table; the official
# code's flops() then: 11.782G and 25.997G for the 192 px pre-training models).
OFFICIAL = {
    "swinv2_tiny_patch4_window8_256": (28_347_154, 5.9e9),
    "swinv2_small_patch4_window8_256": (49_728_418, 11.5e9),
    "swinv2_base_patch4_window8_256": (87_918_816, 20.3e9),
    "swinv2_tiny_patch4_window16_256": (28_347_154, 6.6e9),
    "swinv2_small_patch4_window16_256": (49_728_418, 12.6e9),
    "swinv2_base_patch4_window16_256": (87_918_816, 21.8e9),
    "swinv2_base_patch4_window12_192_22k": (109_280_841, 11.782e9),
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft": (87_918_816, 21.8e9),
    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft": (87_918_816, 54.7e9),
    "swinv2_large_patch4_window12_192_22k": (228_772_549, 25.997e9),
    "swinv2_large_patch4_window12to16_192to256_22kto1k_ft": (196_739_932, 47.5e9),
    "swinv2_large_patch4_window12to24_192to384_22kto1k_ft": (196_739_932, 115.4e9),
}

# A micro V2: 16x16 tokens in two stages, windows of 4 (stage 1 at 8x8 still shifts).
MICRO_V2 = dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=4)


def _randomised(model):
    """Norm gains and biases, logit scales and q/v biases away from their initial values (V2 starts every
    post-norm at zero, which would hide the blocks), so that every parameter shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1 or "logit_scale" in name:
                param.normal_(0.0, 0.5)
    return model


def _timm_micro(**overrides):
    arch = {**MICRO_V2, "num_classes": 10, **overrides}
    return _randomised(TimmSwinV2(**arch)).eval()


def _ours(**overrides):
    return SwinTransformer(**{**MICRO_V2, "num_classes": 10, "version": 2, **overrides}).eval()


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_params_equal_the_official_code_and_flops_the_official_table(name):
    cfg = load_config(os.path.join(CONFIGS, name + ".yaml"))  # the recipe: its number of classes too
    with torch.device("meta"):  # no memory, no init cost: only shapes matter here
        model = SwinTransformer(**cfg.model_kwargs())
    params, flops = OFFICIAL[name]
    assert model.version == 2 and sum(p.numel() for p in model.parameters()) == params
    assert abs(model.flops() - flops) / flops < 0.01


def test_registry_holds_exactly_the_official_swinv2_names_and_the_name_says_the_version():
    assert {name for name, arch in VARIANTS.items() if arch["version"] == 2} == set(OFFICIAL)
    assert all(name.startswith("swinv2_") == (arch["version"] == 2) for name, arch in VARIANTS.items())
    fine_tuned = {name for name, arch in VARIANTS.items() if arch.get("pretrained_window_sizes")}
    assert fine_tuned == {name for name in OFFICIAL if name.endswith("_ft")}


def test_same_logits_as_timm_swinv2_micro_both_ways():
    theirs = _timm_micro()
    assert detect_layout(theirs.state_dict()) == "timm" and swin_version(theirs.state_dict()) == 2
    ours = _ours()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4
    back = TimmSwinV2(**MICRO_V2, num_classes=10).eval()
    back.load_state_dict(to_layout(ours.state_dict(), "timm"), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), theirs(x))


def test_same_logits_as_timm_swinv2_tiny_window8_256():
    theirs = _randomised(timm.create_model("swinv2_tiny_window8_256")).eval()
    ours = SwinTransformer(**VARIANTS["swinv2_tiny_patch4_window8_256"]).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 256, 256)  # 8,192 stage-1 rows: the oneDNN kernels of models.ops run too
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def _torchvision_micro(num_classes=10):
    arch = dict(patch_size=[2, 2], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4])
    model = torchvision.models.swin_transformer.SwinTransformer(
        **arch, num_classes=num_classes, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2
    )
    return _randomised(model).eval()  # randomises the key third of qkv.bias too, which torchvision ignores


def test_same_logits_as_torchvision_swin_v2_micro_both_ways():
    theirs = _torchvision_micro()
    assert detect_layout(theirs.state_dict()) == "torchvision"
    ours = _ours()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4
    back = _torchvision_micro()
    back.load_state_dict(to_layout(ours.state_dict(), "torchvision", ours), strict=True)
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="needs the model"):
        to_layout(ours.state_dict(), "torchvision")  # V2 weights do not hold their window


def test_same_logits_as_torchvision_swin_v2_t():
    theirs = _randomised(torchvision.models.swin_v2_t()).eval()
    ours = SwinTransformer(**VARIANTS["swinv2_tiny_patch4_window8_256"]).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def _official_coords_table(window: int, pretrained_window: int) -> torch.Tensor:
    """The official WindowAttention's relative_coords_table, step for step."""
    h = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid([h, h], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    table[:, :, :, 0] /= (pretrained_window or window) - 1
    table[:, :, :, 1] /= (pretrained_window or window) - 1
    table *= 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


@pytest.mark.parametrize("window, pretrained_window", [(8, 0), (16, 12), (24, 12), (8, 6), (12, 6)])
def test_log_spaced_coordinates_are_the_official_table(window, pretrained_window):
    official = _official_coords_table(window, pretrained_window)
    assert torch.equal(log_spaced_coords(window, pretrained_window), official.reshape(-1, 2))
    # the pre-training window's own offsets keep their values at a larger window: no interpolation needed
    if pretrained_window:
        small = log_spaced_coords(pretrained_window).view(2 * pretrained_window - 1, -1, 2)
        grown = official[0, window - pretrained_window : window + pretrained_window - 1]
        assert torch.equal(grown[:, window - pretrained_window : window + pretrained_window - 1], small)


def test_cosine_attention_is_the_official_formula_with_the_scale_clamped_at_100():
    attn = CosineWindowAttention(16, 4, num_heads=2).eval()
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([1.0, 7.0]).view(2, 1, 1))  # head 1 above log(100): clamped
        attn.q_bias.normal_(), attn.v_bias.normal_()
    mask = shifted_window_mask(8, 8, 4, 2)  # (4 windows, 16, 16)
    x = torch.randn(2 * 4, 16, 16)
    # the official forward, written out
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    q, k, v = F.linear(x, attn.qkv.weight, bias).reshape(8, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.clamp(attn.logit_scale, max=torch.log(torch.tensor(1.0 / 0.01))).exp()
    table = attn.cpb_mlp(torch.from_numpy(_official_coords_table(4, 0).numpy())).view(-1, 2)
    position = table[attn.relative_position_index.view(-1)].view(16, 16, -1).permute(2, 0, 1)
    logits = logits + 16 * torch.sigmoid(position).unsqueeze(0)
    logits = (logits.view(2, 4, 2, 16, 16) + mask.unsqueeze(1).unsqueeze(0)).view(-1, 2, 16, 16)
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(8, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), expected, atol=1e-5, rtol=0)


def test_logit_scale_and_the_scaled_queries_are_fp32_under_autocast():
    attn = CosineWindowAttention(16, 4, num_heads=2)
    with torch.no_grad():
        attn.logit_scale.fill_(2.0)  # e^2 = 7.389 in fp32, 7.375 in bf16
    x = torch.randn(4, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, _, v, scale = attn.queries_keys_values(x)
        unit = F.normalize(
            F.linear(x, attn.qkv.weight, None).view(4, 16, 3, 2, 8)[:, :, 0].transpose(1, 2), dim=-1
        )
    assert scale is None and q.dtype == v.dtype == torch.bfloat16
    assert torch.equal(q, (unit * math.exp(2.0)).to(torch.bfloat16))  # fp32 scale, one rounding
    assert not torch.equal(q, unit.to(torch.bfloat16) * torch.tensor(math.exp(2.0), dtype=torch.bfloat16))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, on purpose
def test_flex_attention_with_the_v2_table_equals_the_explicit_path():
    """FlexAttention gets V2's (2w-1)^2 x heads table and the scale inside q (factor 1), as the model passes."""
    attn = CosineWindowAttention(16, 4, num_heads=2).eval()
    mask = shifted_window_mask(8, 8, 4, 2)
    x = torch.randn(2 * 4, 16, 16)
    with torch.no_grad():
        q, k, v, _ = attn.queries_keys_values(x)
        out = flex_window_attention(q, k, v, attn.bias_table(), attn.relative_position_index, mask, 4, 1.0)
        got = attn.proj(out.transpose(1, 2).reshape(8, 16, 16))
        torch.testing.assert_close(got, attn(x, mask), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.usefixtures(
    "flex_cpu_backward"
)  # torch's FlexAttention backward refusal on CPU lifted (test_flex)
def test_flex_attention_gives_v2s_gradients_through_the_mlp_table_and_the_logit_scale():
    """The bias table is computed (16 sigmoid(MLP)), not a parameter: FlexAttention's backward still reaches
    cpb_mlp, and the scale inside q reaches logit_scale, as the explicit path's does."""
    attn = CosineWindowAttention(16, 4, num_heads=2)
    mask = shifted_window_mask(8, 8, 4, 2)
    x = torch.randn(2 * 4, 16, 16)
    weight = torch.randn(8, 2, 16, 8)
    params = [attn.logit_scale, attn.cpb_mlp[0].weight, attn.cpb_mlp[2].weight, attn.q_bias, attn.qkv.weight]

    def grads(use_flex: bool):
        q, k, v, _ = attn.queries_keys_values(x)
        if use_flex:
            out = flex_window_attention(
                q, k, v, attn.bias_table(), attn.relative_position_index, mask, 4, 1.0
            )
        else:
            bias = attn.relative_position_bias().unsqueeze(0) + mask.unsqueeze(1)  # (4, heads, N, N)
            logits = (q.view(2, 4, 2, 16, 8) @ k.view(2, 4, 2, 16, 8).transpose(-2, -1)) + bias
            out = (logits.softmax(-1) @ v.view(2, 4, 2, 16, 8)).view(8, 2, 16, 8)
        return torch.autograd.grad((out * weight).sum(), params)

    for name, got, want in zip(
        ("logit_scale", "cpb_mlp.0", "cpb_mlp.2", "q_bias", "qkv"), grads(True), grads(False)
    ):
        assert want.abs().max() > 1e-4, name  # a gradient that is really there
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_res_post_norm_starts_every_branch_at_zero_and_merging_normalises_after_the_reduction():
    model = _ours()
    blocks = [block for layer in model.layers for block in layer.blocks]
    assert all(torch.equal(n.weight, torch.zeros_like(n.weight)) for b in blocks for n in (b.norm1, b.norm2))
    x = torch.randn(2, 16, 16, 24)
    assert torch.equal(blocks[0](x), x)  # both residual branches are zero at initialisation
    merge = model.layers[0].downsample
    assert merge.norm.normalized_shape == (48,) and merge.reduction.in_features == 96


def _pretrain_finetune(img_size, window):
    """A micro analogue of the 192/w12 pre-training and its 256/w16 and 384/w24 fine-tunes: three stages, the
    last at half the window in pre-training (as stage 3 of SwinV2-B at 192 px: 6 of 12)."""
    arch = dict(patch_size=2, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 4, 8), num_classes=10)
    pretrained = dict(pretrained_window_sizes=(12, 12, 6)) if window != 12 else {}
    return dict(img_size=img_size, window_size=window, **arch, **pretrained)


@pytest.mark.parametrize("img_size, window", [(64, 16), (96, 24)])
def test_a_192_window_12_model_runs_at_256_w16_and_384_w24_without_interpolation_like_timm(img_size, window):
    source = _randomised(SwinTransformer(**_pretrain_finetune(48, 12), version=2))
    target = SwinTransformer(**_pretrain_finetune(img_size, window), version=2).eval()
    report = load_pretrained(target, source.state_dict())
    assert not report.interpolated and not report.reinitialised and not report.unexpected
    theirs = TimmSwinV2(**_pretrain_finetune(img_size, window)).eval()
    theirs.load_state_dict(to_layout(source.state_dict(), "timm"), strict=True)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert (target(x) - theirs(x)).abs().max() < 1e-4


def test_the_registered_22k_model_loads_into_its_fine_tunes_with_the_head_map(tmp_path):
    """Full size on the meta device (shapes only): every tensor of the 192/w12 22k model but the head loads
    into the 256/w16 and 384/w24 models as it is, the head through a 22k -> 1k class map."""
    with torch.device("meta"):
        source = SwinTransformer(**VARIANTS["swinv2_base_patch4_window12_192_22k"], num_classes=21841)
    sd = source.state_dict()
    head_map = tmp_path / "map22kto1k.txt"
    head_map.write_text("\n".join(str(i * 21) for i in range(1000)))
    for name in (
        "swinv2_base_patch4_window12to16_192to256_22kto1k_ft",
        "swinv2_base_patch4_window12to24_192to384_22kto1k_ft",
    ):
        with torch.device("meta"):
            target = SwinTransformer(**VARIANTS[name])
        report = load_pretrained(target, sd, head_map=head_map)
        assert report.head_mapped and not report.interpolated and not report.reinitialised
        assert len(report.loaded) == len(sd)


def test_v1_weights_for_a_v2_model_and_the_reverse_are_one_line_errors_naming_both(micro_arch):
    v1 = SwinTransformer(**micro_arch)
    v2 = SwinTransformer(**micro_arch, version=2)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(v2, v1.state_dict())
    assert str(error.value) == (
        "state dict holds Swin V1 weights but the model is Swin V2; load them into a Swin V1 model "
        "(a swin_ variant or model.version=1)"
    )
    with pytest.raises(CheckpointError, match="holds Swin V2 weights but the model is Swin V1; .*swinv2_"):
        load_pretrained(v1, to_layout(v2.state_dict(), "timm"))
    with pytest.raises(CheckpointError, match="^best.pth holds Swin V2 weights but the model is Swin V1"):
        load_exact_weights(v1, v2.state_dict(), "best.pth")


def test_official_layout_holds_its_buffers_and_reads_back_bit_exact():
    model = _randomised(_ours(pretrained_window_sizes=(6, 6)))
    official = to_layout(model.state_dict(), "official", model)
    assert detect_layout(official) == "official"
    table = official["layers.1.blocks.1.attn.relative_coords_table"]
    assert torch.equal(table, _official_coords_table(4, 6))
    assert official["layers.0.blocks.1.attn.relative_position_index"].shape == (16, 16)
    assert official["layers.0.blocks.1.attn_mask"].shape == (16, 16, 16)
    back = convert_state_dict({"model": official})
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert infer_arch(back)["version"] == 2 and "window_size" not in infer_arch(back)


def test_saved_coordinate_tables_tell_the_pre_training_window_in_fp32_and_fp16():
    for window, pretrained in [(4, 0), (8, 6), (16, 12), (24, 12), (48, 2), (2, 48)]:
        table = log_spaced_coords(window, pretrained).view(1, 2 * window - 1, 2 * window - 1, 2)
        for saved in (table, table.half()):
            assert saved_pretrained_window(saved) == (pretrained or window)


def test_evaluation_refuses_official_v2_weights_trained_with_other_pre_training_windows(tmp_path, capsys):
    """The official layout saves each block's relative_coords_table: weights fine-tuned from windows of 6 (our
    official export of them here) evaluated as a model without pre-training windows would compute another
    position bias, silently. Fine-tuning from them (not strict) is what the official load_pretrained does."""
    ckpt, ours = _v2_checkpoint(tmp_path)  # pretrained_window_sizes (6, 6), windows 4
    assert (
        swin_export(["--checkpoint", str(ckpt), "--format", "official", "--out", str(tmp_path / "o.pth")])
        == 0
    )
    other = load_trained_model(ckpt).config
    other.model.pretrained_window_sizes = None
    (tmp_path / "other.yaml").write_text(dump_config(other))
    argv = ["--checkpoint", str(tmp_path / "o.pth"), "--config", str(tmp_path / "other.yaml")]
    capsys.readouterr()
    assert eval_cli(argv) == 2
    assert capsys.readouterr().err == (
        f"swin-eval: error: {tmp_path / 'o.pth'}: stage 0 was trained with pre-training window 6 (its saved "
        "relative_coords_table) but the model's is 4; name the variant the weights were trained with "
        "(--model, model.name) or set model.pretrained_window_sizes\n"
    )
    official = torch.load(tmp_path / "o.pth", weights_only=True)
    fine_tune = SwinTransformer(**other.model_kwargs())
    assert not load_pretrained(fine_tune, official).reinitialised
    same = SwinTransformer(**load_trained_model(ckpt).config.model_kwargs()).eval()
    load_pretrained(same, official, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), ours(x))


def test_exporting_the_official_22k_fine_tune_buffers_as_another_variant_is_refused():
    """swin-export --model rewrites the saved buffers: 12to16 weights named as the plain window-16 variant
    would get coordinate tables for windows of 16 (meta device: shapes and buffers only)."""
    with torch.device("meta"):
        fine_tuned = SwinTransformer(**VARIANTS["swinv2_base_patch4_window12to16_192to256_22kto1k_ft"])
    saved = block_buffers(fine_tuned)  # what its official checkpoint holds beside the weights
    with torch.device("meta"):
        plain = SwinTransformer(**VARIANTS["swinv2_base_patch4_window16_256"])
    with pytest.raises(
        CheckpointError, match="^ft.pth: stage 0 was trained with pre-training window 12 .* 16;"
    ):
        check_saved_geometry(saved, plain, "ft.pth")
    check_saved_geometry(saved, fine_tuned, "ft.pth")  # its own variant: nothing to say


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_weights_of_a_stage_it_padded_are_refused_in_evaluation(version):
    """torchvision pads a map smaller than the window (stage 2 here, 4x4 under windows of 8); ours, as the
    official code, shrinks the window: strict loading refuses, fine-tuning (not strict) takes the weights."""
    arch = dict(patch_size=[2, 2], embed_dim=24, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=[8, 8])
    blocks = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == 2 else {}
    theirs = torchvision.models.swin_transformer.SwinTransformer(**arch, num_classes=10, **blocks).eval()
    ours = SwinTransformer(
        img_size=32,
        patch_size=2,
        embed_dim=24,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=8,
        num_classes=10,
        version=version,
    )
    assert [layer.blocks[0].window for layer in ours.layers] == [8, 8, 4]
    with pytest.raises(CheckpointError, match="pads stage 2 \\(4x4\\) to its window 8, where this model"):
        load_pretrained(ours, theirs.state_dict(), strict=True)
    load_pretrained(ours, theirs.state_dict())


@pytest.mark.parametrize("windows", [(-3, 0), (6, 1)])
def test_the_model_refuses_pre_training_windows_that_are_negative_or_1(windows):
    with pytest.raises(ValueError, match="pretrained_window_sizes: 0 or windows >= 2"):
        _ours(pretrained_window_sizes=windows)


def test_swin_model_prints_the_v2_hierarchy(capsys):
    assert swin_model_cli(["--model", "swinv2_tiny_patch4_window8_256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == 2 and out["params"] == 28_347_154 and abs(out["flops"] - 5.9e9) / 5.9e9 < 0.01
    assert [layer["window"] for layer in out["layers"]] == [8, 8, 8, 8]
    assert out["layers"][3]["blocks"][1]["type"] == "W-MSA"  # 8x8 map, window 8: no shift
    assert out["layers"][0]["downsample"]["params"] == 4 * 96 * 192 + 2 * 192  # reduction, then norm(2C)
    assert swin_model_cli(["--model", "swinv2_large_patch4_window12to16_192to256_22kto1k_ft"]) == 0
    table = capsys.readouterr().out
    assert table.startswith(
        "swinv2_large_patch4_window12to16_192to256_22kto1k_ft: Swin V2, 1000 classes, window 16 "
        "(pre-trained with [12, 12, 12, 6])"
    )
    assert "196,739,932" in table and "47.491G" in table


def _v2_checkpoint(tmp_path):
    """A swin-train checkpoint of a micro V2 fine-tuned from windows of 6 (pretrained_window_sizes 6, 6)."""
    cfg = load_config(
        None,
        [
            "model.version=2",
            "model.pretrained_window_sizes=[6, 6]",
            *(
                f"model.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                for k, v in MICRO_V2.items()
                if k != "img_size"
            ),
            "model.num_classes=5",
            "data.img_size=32",
        ],
    )
    model = _randomised(SwinTransformer(**cfg.model_kwargs())).eval()
    state = {
        "format": "swin-train/1",
        "model": model.state_dict(),
        "ema": None,
        "config": config_to_dict(cfg),
        "class_names": ["a", "b", "c", "d", "e"],
        "preprocess": Preprocess.from_config(cfg).to_dict(),
    }
    save_checkpoint(state, tmp_path / "last.pth")
    return tmp_path / "last.pth", model


def test_cli_exports_a_v2_checkpoint_in_every_format_with_the_same_logits(tmp_path, capsys):
    ckpt, ours = _v2_checkpoint(tmp_path)
    outs = {"safetensors": "w.safetensors", "timm": "t.pth", "torchvision": "tv.pth", "official": "o.pth"}
    outs.update(onnx="w.onnx", hf="hf")
    for fmt, name in outs.items():
        assert swin_export(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / name)]) == 0
    assert "(hf): Swinv2ForImageClassification.from_pretrained loads it" in capsys.readouterr().out
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        runs = {"safetensors": load_trained_model(tmp_path / "w.safetensors").model(x)}
        timm_model = TimmSwinV2(**MICRO_V2, num_classes=5, pretrained_window_sizes=(6, 6)).eval()
        timm_model.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True)
        runs["timm"] = timm_model(x)
        tv = _torchvision_micro(num_classes=5)
        tv.load_state_dict(
            torch.load(tmp_path / "tv.pth", weights_only=True), strict=True
        )  # our coords table
        runs["torchvision"] = tv(x)
        official = torch.load(tmp_path / "o.pth", weights_only=True)["model"]
        assert torch.equal(
            official["layers.0.blocks.0.attn.relative_coords_table"], _official_coords_table(4, 6)
        )
        back = SwinTransformer(
            **{**MICRO_V2, "num_classes": 5, "version": 2, "pretrained_window_sizes": (6, 6)}
        )
        back.load_state_dict(convert_state_dict(official), strict=True)
        runs["official"] = back.eval()(x)
        session = onnxruntime.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"])
        runs["onnx"] = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        runs["hf"] = Swinv2ForImageClassification.from_pretrained(tmp_path / "hf").eval()(x).logits
    for fmt, logits in runs.items():
        assert (logits - expected).abs().max() < 1e-4, fmt
    hf = load_hf_folder(tmp_path / "hf")
    assert (hf.arch["version"], hf.arch["pretrained_window_sizes"], hf.class_names) == (
        2,
        [6, 6],
        list("abcde"),
    )


def test_cli_exports_bare_v2_weights_given_the_variant(tmp_path, capsys):
    model = SwinTransformer(**VARIANTS["swinv2_tiny_patch4_window8_256"])
    save_weights(model.state_dict(), "timm", tmp_path / "timm.pth")
    argv = [
        "--checkpoint",
        str(tmp_path / "timm.pth"),
        "--format",
        "official",
        "--out",
        str(tmp_path / "o.pth"),
    ]
    assert swin_export(argv) == 2
    err = capsys.readouterr().err
    assert "Swin V2 weights are read without their window" in err and "pass --model NAME" in err
    assert swin_export([*argv, "--model", "swinv2_tiny_patch4_window16_256"]) == 0
    official = torch.load(tmp_path / "o.pth", weights_only=True)["model"]
    assert official["layers.0.blocks.1.attn_mask"].shape == (16, 256, 256)  # 64x64 tokens in windows of 16
    assert swin_export([*argv, "--model", "swin_tiny_patch4_window7_224"]) == 2
    assert "holds Swin V2 weights but the model is Swin V1" in capsys.readouterr().err


def test_weight_decay_skips_what_the_official_v2_skips():
    """The official set_weight_decay with SwinV2's no_weight_decay_keywords (cpb_mlp, logit_scale,
    relative_position_bias_table): no decay for 1-D parameters, biases and those names."""
    model = _ours()
    groups = {g["weight_decay"]: set(g["names"]) for g in param_group_names(model, weight_decay=0.05)}
    keywords = ("cpb_mlp", "logit_scale", "relative_position_bias_table")
    official = {
        n
        for n, p in model.named_parameters()
        if p.ndim == 1 or n.endswith(".bias") or any(k in n for k in keywords)
    }
    assert groups[0.0] == official and "layers.0.blocks.0.attn.cpb_mlp.0.weight" in official
    assert groups[0.05] == {n for n, _ in model.named_parameters()} - official


# ---------------------------------------------------------------------------------------- training


def _v2_train_args(data, out, *extra):
    return ["--data-path", str(data), "--output", str(out), *MICRO_OVERRIDES, "model.version=2", *extra]


def test_a_micro_swinv2_learns_the_quick_start_shapes_and_its_official_export_evaluates_the_same(
    shapes_root, tmp_path
):
    out = tmp_path / "run"
    learn_fast = [
        "train.epochs=5",
        "train.base_lr=3e-3",
        "aug.crop_scale=[0.8,1.0]",
        "model.drop_path_rate=0",
    ]
    assert train_cli(_v2_train_args(shapes_root, out, "data.batch_size=32", *learn_fast)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.15
    assert records[-1]["val_top1"] >= 0.25 and records[-1]["val_top1"] > records[0]["val_top1"]  # chance: 1/8
    assert torch.load(out / "last.pth", weights_only=True)["config"]["model"]["version"] == 2

    # the official layout of those weights, bare (no config): swin-eval reads it with the run's config
    assert (
        swin_export(
            ["--checkpoint", str(out / "last.pth"), "--format", "official", "--out", str(tmp_path / "o.pth")]
        )
        == 0
    )
    metrics = tmp_path / "m.json"
    argv = [
        "--checkpoint",
        str(tmp_path / "o.pth"),
        "--config",
        str(out / "config.yaml"),
        "--metrics-json",
        str(metrics),
    ]
    assert eval_cli([*argv, "--data-path", str(shapes_root)]) == 0
    assert json.loads(metrics.read_text())["top1"] == records[-1]["val_top1"]


def test_resuming_a_v2_run_as_another_window_or_pre_training_windows_is_refused(
    shapes_root, tmp_path, capsys
):
    """A V2's window and pre-training windows change no tensor's shape, so its weights would fit the other
    model: the run's architecture, not the weights' fit, decides (the checkpoint stays as it was)."""
    out = tmp_path / "run"
    args = _v2_train_args(shapes_root, out, "train.epochs=1", "data.batch_size=64")
    assert train_cli(args) == 0
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    for change, said in [
        ("model.pretrained_window_sizes=[2,2]", "pretrained_window_sizes None -> [2, 2]"),
        ("model.window_size=8", "window_size 4 -> 8"),
    ]:
        assert train_cli([*args, change]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"swin-train: error: {out / 'last.pth'} was trained as another model ({said}); resume it with its "
            f"own config, or fine-tune from it in a new output folder (model.pretrained={out / 'last.pth'})\n"
        )
    assert (out / "last.pth").read_bytes() == before


def test_benchmark_runs_swinv2_against_timm_and_torchvision_with_the_same_weights(capsys):
    bench = load_module("benchmark", SCRIPT)
    micro = ["--img-size", "32", "--patch-size", "2", "--embed-dim", "24", "--depths", "2", "2"]
    micro += ["--num-heads", "2", "4", "--window-size", "4", "--num-classes", "10"]
    argv = ["--model", "swinv2_tiny_patch4_window8_256", *micro, "--batch-size", "2", "--warmup", "0"]
    argv += [
        "--repeats",
        "1",
        "--iters",
        "1",
        "--threads",
        "1",
        "--no-memory",
        "--json",
        "--peak-tflops",
        "0.05",
    ]
    report = bench.main([*argv, "--impls", "ours", "timm", "torchvision"])
    capsys.readouterr()
    assert report["config"]["arch"]["version"] == 2
    assert report["macs_per_image"] == SwinTransformer(**MICRO_V2, num_classes=10, version=2).flops()
    assert max(report["logits_max_abs_diff"].values()) < 1e-5
    params = {impl: res["params"] for impl, res in report["results"].items()}
    assert params["ours"] == params["timm"] == params["torchvision"] - (24 * 2 + 48 * 2)  # its unused k bias
