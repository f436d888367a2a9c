import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

from swin_train import create_model
from swin_train.checkpoint import save_checkpoint
from swin_train.errors import CheckpointError
from swin_train.loading import LoadReport, adapt_state_dict, load_pretrained
from swin_train.models.convert import official_buffers
from swin_train.models.swin import SwinTransformer

TABLE = "relative_position_bias_table"


def _official_resize(table: torch.Tensor, side: int) -> torch.Tensor:
    """microsoft/Swin-Transformer utils.py `load_pretrained`, expression for expression."""
    L1, nH1 = table.size()
    S1 = int(L1**0.5)
    resized = F.interpolate(table.permute(1, 0).view(1, nH1, S1, S1), size=(side, side), mode="bicubic")
    return resized.view(nH1, side * side).permute(1, 0)


def _micro(micro_arch, **kw) -> SwinTransformer:
    return SwinTransformer(**{**micro_arch, "num_classes": 10, **kw}).eval()


def _assert_equal_except(model, source_sd, skip=()):
    got = model.state_dict()
    for key, value in source_sd.items():
        if key not in skip:
            assert torch.equal(got[key], value), key


def _foreign_micro(kind: str):
    if kind == "timm":
        return TimmSwin(
            img_size=32,
            patch_size=2,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
            num_classes=10,
        )
    return TorchvisionSwin(
        patch_size=[2, 2], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    )


@pytest.mark.parametrize("kind", ["timm", "torchvision"])
def test_foreign_weights_give_the_same_logits(micro_arch, kind, tmp_path):
    theirs = _foreign_micro(kind).eval()
    path = tmp_path / f"{kind}.pth"
    torch.save(theirs.state_dict(), path)  # a plain state dict file, as those libraries write it
    ours = _micro(micro_arch)
    report = load_pretrained(ours, path, strict=True)
    assert report.layout == kind and not report.interpolated and not report.unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_official_checkpoint_with_buffers_gives_the_same_logits(micro_arch):
    source = _micro(micro_arch)
    official = {**source.state_dict(), **official_buffers(source)}  # official files keep the buffers
    assert any(k.endswith("attn_mask") for k in official)
    ours = _micro(micro_arch)
    report = load_pretrained(ours, {"model": official}, strict=True)
    assert report.layout == "official" and not report.unexpected and not report.reinitialised
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), source(x))


def test_swin_t_224_window_7_tables_interpolate_to_384_window_12():
    with torch.device("meta"):  # shapes only: no init cost
        source_shapes = create_model("swin_tiny_patch4_window7_224").state_dict()
        target = create_model("swin_tiny_patch4_window12_384")
    sd = {k: torch.randn(v.shape) for k, v in source_shapes.items()}
    report = LoadReport(source="test", layout="swin-train")
    out = adapt_state_dict(sd, target, report)
    tables = sorted(k for k in sd if k.endswith(TABLE))
    assert len(tables) == 12 and sorted(report.interpolated) == tables  # every block's table, each on its own
    heads = {0: 3, 1: 6, 2: 12, 3: 24}
    for key in tables:
        assert sd[key].shape == (169, heads[int(key.split(".")[1])])  # 13x13
        assert out[key].shape == (529, heads[int(key.split(".")[1])])  # 23x23
        assert torch.equal(out[key], _official_resize(sd[key], 23))
    assert all(out[k] is sd[k] for k in sd if k not in tables)


def test_window_4_to_window_8_at_twice_the_image_size(micro_arch):
    source = _micro(micro_arch)
    target = _micro(micro_arch, img_size=64, window_size=8)  # 32x32 then 16x16 tokens, windows of 8
    report = load_pretrained(target, source.state_dict(), strict=True)
    tables = [k for k in source.state_dict() if k.endswith(TABLE)]
    assert sorted(report.interpolated) == sorted(tables) and len(tables) == 4
    got = target.state_dict()
    for key in tables:
        assert got[key].shape == (15 * 15, source.state_dict()[key].shape[1])
        assert torch.equal(got[key], _official_resize(source.state_dict()[key], 15))
    _assert_equal_except(target, source.state_dict(), skip=tables)
    with torch.no_grad():
        logits = target(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_same_window_leaves_every_tensor_bit_identical(micro_arch):
    source = _micro(micro_arch)
    target = _micro(micro_arch)
    report = load_pretrained(target, source.state_dict())
    assert not report.interpolated and not report.reinitialised
    assert len(report.loaded) == len(source.state_dict())
    _assert_equal_except(target, source.state_dict())


def test_head_is_reinitialised_when_the_classes_differ(micro_arch):
    source = _micro(micro_arch)
    target = _micro(micro_arch, num_classes=5)
    head_before = target.head.weight.detach().clone()
    report = load_pretrained(target, source.state_dict())
    assert sorted(report.reinitialised) == ["head.bias", "head.weight"] and not report.head_mapped
    assert torch.equal(target.head.weight, head_before)  # the model's own initialisation, untouched
    _assert_equal_except(target, source.state_dict(), skip=("head.weight", "head.bias"))
    # strict (evaluation): the head cannot be re-initialised, and the message names the setting to pass
    with pytest.raises(CheckpointError, match="has 10 classes, the model 5: pass model.num_classes=10"):
        load_pretrained(_micro(micro_arch, num_classes=5), source.state_dict(), strict=True)


def test_class_map_selects_head_rows(micro_arch, tmp_path):
    source = _micro(micro_arch)  # 10 "22k" classes
    (tmp_path / "map.txt").write_text("7\n2\n9\n0\n")
    target = _micro(micro_arch, num_classes=4)
    report = load_pretrained(target, source.state_dict(), head_map=tmp_path / "map.txt", strict=True)
    assert report.head_mapped and not report.reinitialised
    rows = torch.tensor([7, 2, 9, 0])
    assert torch.equal(target.head.weight, source.head.weight[rows])
    assert torch.equal(target.head.bias, source.head.bias[rows])
    _assert_equal_except(target, source.state_dict(), skip=("head.weight", "head.bias"))

    (tmp_path / "far.txt").write_text("7\n2\n10\n0\n")
    with pytest.raises(CheckpointError, match="index 10 is outside the checkpoint's 10 classes"):
        load_pretrained(target, source.state_dict(), head_map=tmp_path / "far.txt")
    with pytest.raises(CheckpointError, match="4 entries but the model has 3 classes"):
        load_pretrained(_micro(micro_arch, num_classes=3), source.state_dict(), head_map=tmp_path / "map.txt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(target, source.state_dict(), head_map=tmp_path / "missing.txt")
    headless = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(CheckpointError, match="no classifier head"):
        load_pretrained(target, headless, head_map=tmp_path / "map.txt")


def test_ema_weights_of_a_swin_train_checkpoint(micro_arch, tmp_path):
    raw, ema = _micro(micro_arch), _micro(micro_arch)
    state = {
        "format": "swin-train/1",
        "model": raw.state_dict(),
        "config": {},
        "ema": {"module": ema.state_dict(), "num_updates": 3, "calls": 3},
    }
    save_checkpoint(state, tmp_path / "last.pth")
    model = _micro(micro_arch)
    report = load_pretrained(model, tmp_path / "last.pth", strict=True, use_ema=True)
    assert report.source.endswith("(EMA)")
    _assert_equal_except(model, ema.state_dict())
    load_pretrained(model, tmp_path / "last.pth", strict=True)
    _assert_equal_except(model, raw.state_dict())

    save_checkpoint({**state, "ema": None}, tmp_path / "no-ema.pth")
    with pytest.raises(CheckpointError, match="no-ema.pth holds no EMA weights"):
        load_pretrained(model, tmp_path / "no-ema.pth", use_ema=True)
    with pytest.raises(CheckpointError, match="without 'module'"):
        load_pretrained(model, {**state, "ema": {"num_updates": 3}}, use_ema=True)


def test_safetensors_file_loads(micro_arch, tmp_path):
    from safetensors.torch import save_file

    source = _micro(micro_arch)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    target = _micro(micro_arch)
    report = load_pretrained(target, tmp_path / "w.safetensors", strict=True)
    assert report.layout == "swin-train"
    _assert_equal_except(target, source.state_dict())


def test_other_shape_mismatch_names_the_key(micro_arch):
    source = _micro(micro_arch)
    with pytest.raises(CheckpointError, match="'patch_embed.proj.weight' has shape"):
        load_pretrained(_micro(micro_arch, embed_dim=32, num_heads=(2, 4)), source.state_dict())
