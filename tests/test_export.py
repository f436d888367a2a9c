import json

import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

from swin_train import create_model
from swin_train.checkpoint import load_checkpoint, save_checkpoint
from swin_train.cli.export import cli as swin_export
from swin_train.config import Config, DataConfig, ModelConfig, config_to_dict
from swin_train.data.transforms import Preprocess
from swin_train.errors import CheckpointError
from swin_train.models.convert import convert_state_dict, detect_layout, save_weights, to_layout
from swin_train.models.swin import SwinTransformer


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _as_official(model: SwinTransformer) -> SwinTransformer:
    """Our model with its buffers persistent: the official model's state-dict keys (same names, see swin.py),
    so its `load_state_dict(strict=True)` is the official repository's strict load."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if name in ("relative_position_index", "attn_mask"):  # token_order* are ours alone
                module.register_buffer(name, buf, persistent=True)
    return model


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(0)
    return create_model("swin_tiny_patch4_window7_224").eval()


def test_timm_and_torchvision_load_the_exports_strictly(swin_t, tmp_path):
    sd = swin_t.state_dict()
    save_weights(sd, "timm", tmp_path / "timm.pth")
    save_weights(sd, "torchvision", tmp_path / "tv.pth")
    theirs_timm = timm.create_model("swin_tiny_patch4_window7_224").eval()
    theirs_timm.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    with torch.device("meta"):  # every torchvision tensor, the index buffers included, comes from the file
        theirs_tv = torchvision.models.swin_t().eval()
    tv_sd = torch.load(tmp_path / "tv.pth", weights_only=True)
    theirs_tv.load_state_dict(tv_sd, strict=True, assign=True)
    assert not [k for k, v in theirs_tv.state_dict().items() if v.is_meta]
    # the index is torchvision's own: flat (N*N,) int64 from its define_relative_position_index
    own_index = ShiftedWindowAttention(96, [7, 7], [3, 3], num_heads=3).relative_position_index
    indices = [v for k, v in tv_sd.items() if k.endswith("relative_position_index")]
    assert len(indices) == 12 and all(
        v.dtype == own_index.dtype and torch.equal(v, own_index) for v in indices
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = swin_t(x)
        torch.testing.assert_close(theirs_timm(x), ours, rtol=0, atol=1e-4)
        torch.testing.assert_close(theirs_tv(x), ours, rtol=0, atol=1e-4)


def test_official_export_holds_the_official_buffers(swin_t):
    exported = to_layout(swin_t.state_dict(), "official", swin_t)
    buffers = {k: v for k, v in exported.items() if k.endswith(("relative_position_index", "attn_mask"))}
    built = {k: v for k, v in swin_t.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))}
    _assert_bitwise_equal(buffers, built)  # what the model itself builds
    assert len(exported) == 173 + 12 + 5  # tensors, one index per block, masks of the shifted blocks
    masks = sorted(k for k in buffers if k.endswith("attn_mask"))
    assert masks == [f"layers.{i}.blocks.{j}.attn_mask" for i, j in [(0, 1), (1, 1), (2, 1), (2, 3), (2, 5)]]
    assert buffers["layers.2.blocks.1.attn_mask"].shape == (4, 49, 49)  # 14x14 tokens: 4 windows of 7x7
    assert buffers["layers.0.blocks.0.attn.relative_position_index"].shape == (49, 49)
    with torch.device("meta"):  # the CLI's model: geometry only, buffers computed the same way
        meta_model = create_model("swin_tiny_patch4_window7_224")
    _assert_bitwise_equal(to_layout(swin_t.state_dict(), "official", meta_model), exported)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["timm", "torchvision", "official"])
def test_round_trip_is_bit_exact(micro_arch, layout, dtype):
    model = SwinTransformer(**micro_arch, num_classes=7)
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    exported = to_layout(sd, layout, model)
    assert detect_layout(exported) == layout
    back = convert_state_dict({"model": exported} if layout == "official" else exported)
    _assert_bitwise_equal(back, sd)


def test_official_export_loads_strictly_into_the_official_layout(micro_arch):
    source = SwinTransformer(**micro_arch, num_classes=7).eval()
    official = _as_official(SwinTransformer(**micro_arch, num_classes=7)).eval()
    official.load_state_dict(to_layout(source.state_dict(), "official", source), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(official(x), source(x))


def test_layouts_without_ape_or_shrunk_windows_are_refused(micro_arch):
    ape = SwinTransformer(**micro_arch, ape=True)
    for layout in ("timm", "torchvision"):
        with pytest.raises(CheckpointError, match="no absolute position embedding"):
            to_layout(ape.state_dict(), layout)
    fits = SwinTransformer(**{**micro_arch, "window_size": 8})  # 16x16 then 8x8 tokens: window 8 throughout
    tiny = SwinTransformer(**{**micro_arch, "img_size": 16, "window_size": 8})  # 8x8 then 4x4: shrinks to 4
    assert [b.window for layer in tiny.layers for b in layer.blocks] == [8, 8, 4, 4]
    assert "features.3.1.attn.relative_position_index" in to_layout(fits.state_dict(), "torchvision")
    with pytest.raises(CheckpointError, match=r"one window in every stage, these weights use \[4, 8\]"):
        to_layout(tiny.state_dict(), "torchvision")


def _swin_train_checkpoint(tmp_path, micro_arch, ema: bool = True):
    cfg = Config(
        model=ModelConfig(
            patch_size=2, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4, num_classes=5
        ),
        data=DataConfig(img_size=32),
    )
    raw = SwinTransformer(**micro_arch, num_classes=5)
    ema_model = SwinTransformer(**micro_arch, num_classes=5)
    state = {
        "format": "swin-train/1",
        "model": raw.state_dict(),
        "ema": {"module": ema_model.state_dict(), "num_updates": 1, "calls": 1} if ema else None,
        "config": config_to_dict(cfg),
        "class_names": ["a", "b", "c", "d", "e"],
        "preprocess": Preprocess.from_config(cfg).to_dict(),
    }
    path = tmp_path / ("last.pth" if ema else "no-ema.pth")
    save_checkpoint(state, path)
    return path, state


def test_cli_exports_every_format(micro_arch, tmp_path, capsys):
    ckpt, state = _swin_train_checkpoint(tmp_path, micro_arch)
    sd = state["model"]
    for fmt, name in [
        ("safetensors", "w.safetensors"),
        ("timm", "w-timm.pth"),
        ("torchvision", "w-tv.pth"),
        ("official", "w-official.pth"),
    ]:
        assert swin_export(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        assert f"({fmt}) to {tmp_path / name}" in capsys.readouterr().out
    _assert_bitwise_equal(load_checkpoint(tmp_path / "w.safetensors")["model"], sd)
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == state["config"] and json.loads(meta["class_names"])[-1] == "e"
    _assert_bitwise_equal(convert_state_dict(torch.load(tmp_path / "w-timm.pth", weights_only=True)), sd)
    official = torch.load(tmp_path / "w-official.pth", weights_only=True)
    assert list(official) == ["model"] and detect_layout(official["model"]) == "official"
    _as_official(SwinTransformer(**micro_arch, num_classes=5)).load_state_dict(official["model"], strict=True)
    _assert_bitwise_equal(convert_state_dict(official), sd)

    ours = SwinTransformer(**micro_arch, num_classes=5).eval()
    ours.load_state_dict(sd)
    theirs = TorchvisionSwin(
        patch_size=[2, 2], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5
    ).eval()
    theirs.load_state_dict(torch.load(tmp_path / "w-tv.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)

    out = tmp_path / "ema.safetensors"
    assert (
        swin_export(["--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out), "--ema"]) == 0
    )
    _assert_bitwise_equal(load_checkpoint(out)["model"], state["ema"]["module"])


def test_cli_exports_bare_weights_with_the_architecture_read_off_them(micro_arch, tmp_path):
    model = SwinTransformer(**micro_arch, num_classes=3)
    save_weights(model.state_dict(), "timm", tmp_path / "timm.pth")
    out = tmp_path / "official.pth"
    argv = ["--checkpoint", str(tmp_path / "timm.pth"), "--format", "official", "--out", str(out)]
    assert swin_export([*argv, "--img-size", "32"]) == 0
    _assert_bitwise_equal(
        torch.load(out, weights_only=True)["model"], to_layout(model.state_dict(), "official", model)
    )
    assert swin_export(argv) == 2  # window 4 says nothing about the image size


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--checkpoint", "{tmp}/missing.pth", "--format", "timm", "--out", "{tmp}/x.pth"],
            "checkpoint {tmp}/missing.pth does not exist; check the path",
        ),
        (
            ["--checkpoint", "{tmp}/no-ema.pth", "--format", "timm", "--out", "{tmp}/x.pth", "--ema"],
            "holds no EMA weights",
        ),
        (
            ["--checkpoint", "{tmp}/no-ema.pth", "--format", "safetensors", "--out", "{tmp}/x.pth"],
            "use a .safetensors name",
        ),
        (
            ["--checkpoint", "{tmp}/no-ema.pth", "--format", "timm", "--out", "{tmp}/nowhere/x.pth"],
            "output folder {tmp}/nowhere does not exist",
        ),
    ],
)
def test_cli_errors_are_one_line(micro_arch, tmp_path, capsys, args, message):
    _swin_train_checkpoint(tmp_path, micro_arch, ema=False)
    assert swin_export([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swin-export: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "x.pth").exists()
