"""Fine-tuning from SimMIM pre-training checkpoints (swin_train/simmim_weights.py through loading.py): the encoder
loads into a classifier, its bias tables carried 6 -> 7 as the official SimMIM fine-tuning does, with the
official code (models/simmim.py, utils_simmim.load_pretrained) as the reference where the snapshot exists."""

from __future__ import annotations

import importlib
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from official import official_models_package, official_module

from swin_train import create_model
from swin_train.checkpoint import save_checkpoint
from swin_train.config import config_to_dict, load_config
from swin_train.data.transforms import Preprocess
from swin_train.errors import CheckpointError, ConfigError
from swin_train.loading import load_pretrained
from swin_train.models.convert import official_buffers
from swin_train.models.simmim_remap import remap_relative_position_bias_table
from swin_train.models.swin import SwinTransformer
from swin_train.simmim_weights import is_simmim_state_dict, simmim_encoder
from swin_train.tasks import build_classifier

# pre-training at window 6 (48 px: 24x24 then 12x12 tokens), fine-tuning at window 7 (56 px: 28x28, 14x14)
PRETRAIN = dict(img_size=48, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=6)
FINETUNE = {**PRETRAIN, "img_size": 56, "window_size": 7}
STRIDE = 32  # the official encoder_stride: the decoder's 1x1 conv has 32 * 32 * 3 outputs
TABLE = "relative_position_bias_table"


def simmim_state_dict(encoder: SwinTransformer, official: bool = False) -> dict[str, torch.Tensor]:
    """A SimMIM model's state dict around `encoder` (a headless classifier): `encoder.` + its keys, the mask
    token, the pixel decoder; `official` adds the buffers the official model saves."""
    sd = {**encoder.state_dict(), **(official_buffers(encoder) if official else {})}
    out = {f"encoder.{k}": v for k, v in sd.items() if not k.startswith("head.")}
    out["encoder.mask_token"] = torch.randn(1, 1, encoder.embed_dim) * 0.02
    out["decoder.0.weight"] = torch.randn(STRIDE**2 * 3, encoder.num_features, 1, 1) * 0.02
    out["decoder.0.bias"] = torch.randn(STRIDE**2 * 3) * 0.02
    return out


def _pretrained(version: int = 1) -> SwinTransformer:
    torch.manual_seed(1)
    model = SwinTransformer(**PRETRAIN, num_classes=0, version=version).eval()
    with torch.no_grad():  # bias tables and V2's MLP away from their zero / default start
        for name, p in model.named_parameters():
            if name.endswith((TABLE, "cpb_mlp.2.weight")):
                p.normal_(0, 0.5)
    return model


def _micro_config(path, version: int = 1, window: int = 7, img: int = 56, extra=()):
    fields = [
        "model.patch_size=2",
        "model.embed_dim=24",
        "model.depths=[2,2]",
        "model.num_heads=[2,4]",
        f"model.window_size={window}",
        f"model.version={version}",
        "model.num_classes=10",
        f"data.img_size={img}",
    ]
    return load_config(None, [*fields, *([f"model.pretrained={path}"] if path else []), *extra])


def _swin_train_simmim_checkpoint(path, encoder: SwinTransformer, version: int = 1) -> dict:
    """A swin-train checkpoint whose model is a SimMIM state dict (what swin-train's pre-training saves)."""
    cfg = _micro_config(None, version, window=6, img=48)
    state = {
        "format": "swin-train/1",
        "model": simmim_state_dict(encoder),
        "config": config_to_dict(cfg),
        "class_names": [],
        "preprocess": Preprocess.from_config(cfg).to_dict(),
    }
    save_checkpoint(state, path)
    return state


def _logits(model, x, head_from=None):
    if head_from is not None:  # both heads start from random weights: give them the same one
        model.head.load_state_dict(head_from.head.state_dict())
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------ recognition


def test_simmim_state_dicts_are_recognised_by_their_keys():
    encoder = _pretrained()
    sd = simmim_state_dict(encoder, official=True)
    assert is_simmim_state_dict(sd) and not is_simmim_state_dict(encoder.state_dict())
    got = simmim_encoder({"model": {f"module.{k}": v for k, v in sd.items()}})  # DDP-wrapped, too
    assert sorted(got.dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    encoder_keys = {k.removeprefix("encoder.") for k in sd if k.startswith("encoder.")}
    assert got.weights.keys() == encoder_keys - {"mask_token"}
    assert simmim_encoder(encoder.state_dict()) is None and simmim_encoder({"model": "text"}) is None


# --------------------------------------------------------------------------- loading (no snapshot needed)


@pytest.mark.parametrize("official", [False, True])
def test_same_window_loads_the_encoder_bit_for_bit_and_a_fresh_head(official, tmp_path, caplog):
    encoder = _pretrained()
    path = tmp_path / "simmim.pth"
    save_checkpoint({"model": simmim_state_dict(encoder, official)}, path)
    model = SwinTransformer(**PRETRAIN, num_classes=10)
    head = model.head.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="swin_train"):
        report = load_pretrained(model, path)
    assert sorted(report.reinitialised) == ["head.bias", "head.weight"] and not report.interpolated
    assert torch.equal(model.head.weight, head) and not report.unexpected
    assert report.layout == f"SimMIM encoder, {'official' if official else 'swin-train'}"
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    assert (
        "is a SimMIM pre-training checkpoint: its encoder is loaded ('encoder.' prefix stripped)"
        in caplog.text
    )
    assert "the classifier head starts from its initialisation" in caplog.text
    assert "are left out (encoder.mask_token, decoder.0.weight, decoder.0.bias)" in caplog.text
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    model.head = torch.nn.Identity()  # the pooled features: those of the pre-trained encoder
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(_logits(model, x), _logits(encoder, x))


def test_window_6_to_7_remaps_each_table_with_the_geometric_spline(tmp_path):
    encoder = _pretrained()
    path = tmp_path / "simmim.pth"
    save_checkpoint({"model": simmim_state_dict(encoder, official=True)}, path)
    model = build_classifier(_micro_config(path), 10)  # model.pretrained in a classification config
    tables = [k for k in encoder.state_dict() if k.endswith(TABLE)]
    for key in tables:
        src = encoder.state_dict()[key]
        assert src.shape[0] == 11 * 11 and model.state_dict()[key].shape[0] == 13 * 13
        assert torch.equal(model.state_dict()[key], remap_relative_position_bias_table(src, 6, 7))
    same = [k for k in encoder.state_dict() if k not in tables]
    assert all(torch.equal(model.state_dict()[k], encoder.state_dict()[k]) for k in same)


def test_window_6_to_7_equals_scipy_fitpack_per_head(tmp_path):
    """The table the loader writes against SciPy's FITPACK spline (what interp2d kind='cubic' fitted) at the
    official geometric coordinates, head by head: the official loop's math."""
    interpolate = pytest.importorskip("scipy.interpolate")
    from swin_train.models.simmim_remap import geometric_offsets

    encoder = _pretrained()
    model = SwinTransformer(**FINETUNE, num_classes=10)
    report = load_pretrained(model, {"model": simmim_state_dict(encoder)})
    assert len(report.interpolated) == 4
    x = np.array(geometric_offsets(11, 13))
    dx = np.arange(-6.0, 6.1, 1.0)
    for key in report.interpolated:
        table = encoder.state_dict()[key]
        for head in range(table.shape[1]):
            z = table[:, head].view(11, 11).double().numpy()
            spline = interpolate.RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)
            expected = torch.from_numpy(spline(dx, dx).T.copy()).reshape(-1).float()
            torch.testing.assert_close(model.state_dict()[key][:, head], expected, rtol=0, atol=1e-5)


def test_an_absolute_position_embedding_is_resized_to_the_new_grid():
    """The official loader fails on another patch grid (load_state_dict's size check); ours resizes it."""
    encoder = SwinTransformer(**PRETRAIN, num_classes=0, ape=True)
    model = SwinTransformer(**FINETUNE, num_classes=10, ape=True)
    report = load_pretrained(model, {"model": simmim_state_dict(encoder)})
    assert "absolute_pos_embed" in report.interpolated and model.absolute_pos_embed.shape == (1, 28 * 28, 24)


def test_classification_checkpoints_keep_the_bicubic_resize(tmp_path):
    """Only SimMIM sources take the geometric remap; a classifier's tables are resized as before."""
    classifier = SwinTransformer(**PRETRAIN, num_classes=10)
    model = SwinTransformer(**FINETUNE, num_classes=10)
    report = load_pretrained(model, classifier.state_dict())
    key = report.interpolated[0]
    assert not torch.equal(
        model.state_dict()[key], remap_relative_position_bias_table(classifier.state_dict()[key], 6, 7)
    )


def test_v2_encoder_needs_no_remap_and_takes_its_pretraining_windows(tmp_path, caplog):
    encoder = _pretrained(version=2)
    path = tmp_path / "simmim-v2.pth"
    sd = simmim_state_dict(encoder, official=True)
    sd = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in sd.items()}  # the official V2 release's name
    save_checkpoint({"model": sd}, path)
    with caplog.at_level(logging.INFO, logger="swin_train"):
        cfg = _micro_config(path, version=2)
        model = build_classifier(cfg, 10)
    assert cfg.model.pretrained_window_sizes == [6, 6]  # read off the encoder's relative_coords_table
    assert "model.pretrained_window_sizes=[6, 6]" in caplog.text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder.state_dict().items())


def test_create_model_at_another_window_keeps_a_v2_encoders_pretraining_windows(tmp_path):
    """As model.pretrained does: the offsets stay normalised by the windows the encoder learned them at."""
    encoder = _pretrained(version=2)
    path = tmp_path / "last.pth"
    _swin_train_simmim_checkpoint(path, encoder, version=2)
    cfg = _micro_config(path, version=2)  # window 7 at 56 px: the fine-tuning's geometry
    expected = build_classifier(cfg, 10)
    assert cfg.model.pretrained_window_sizes == [6, 6]
    for features_only in (False, True):
        model = create_model(checkpoint=path, window_size=7, img_size=56, features_only=features_only)
        assert [layer.blocks[0].attn.pretrained_window for layer in model.layers] == [6, 6]
    model = create_model(checkpoint=path, window_size=7, img_size=56, num_classes=10)
    x = torch.randn(2, 3, 56, 56)
    assert torch.equal(_logits(model, x, head_from=expected), _logits(expected, x))


def test_a_pickled_config_is_refused_as_for_any_checkpoint(tmp_path):
    """Official training checkpoints also hold their yacs config, a pickled object: the safe load refuses the
    file (nothing of it runs), as it refuses such a classification checkpoint."""
    path = tmp_path / "with-config.pth"
    torch.save({"model": simmim_state_dict(_pretrained()), "config": CfgNode(MODEL="swin")}, path)
    with pytest.raises(
        CheckpointError, match=r"refusing to load .*pickled Python objects \(e\.g\. '.*CfgNode'\)"
    ):
        load_pretrained(SwinTransformer(**FINETUNE, num_classes=10), path)


class CfgNode(dict):
    """Stands for yacs.config.CfgNode (a dict subclass, pickled by class name)."""


# ------------------------------------------------------------------------- swin-train SimMIM checkpoints


def test_create_model_from_a_swin_train_simmim_checkpoint(tmp_path):
    encoder = _pretrained()
    path = tmp_path / "last.pth"
    _swin_train_simmim_checkpoint(path, encoder)
    features = create_model(checkpoint=path)  # its config's architecture, no head: the encoder
    x = torch.randn(2, 3, 48, 48)
    assert features.num_classes == 0 and torch.equal(_logits(features, x), _logits(encoder, x))
    classifier = create_model(checkpoint=path, num_classes=10, window_size=7, img_size=56)
    key = f"layers.1.blocks.1.attn.{TABLE}"
    assert classifier.num_classes == 10 and classifier.window_size == 7
    assert torch.equal(
        classifier.state_dict()[key], remap_relative_position_bias_table(encoder.state_dict()[key], 6, 7)
    )
    named = create_model(checkpoint=path, **FINETUNE, num_classes=10)
    assert torch.equal(named.state_dict()[key], classifier.state_dict()[key])
    official = tmp_path / "official.pth"
    save_checkpoint({"model": simmim_state_dict(encoder, official=True)}, official)
    with pytest.raises(ConfigError, match="official SimMIM checkpoint, which holds no architecture"):
        create_model(checkpoint=official)
    fields = create_model(checkpoint=official, **FINETUNE, num_classes=10)  # every field instead of a name
    assert torch.equal(fields.state_dict()[key], classifier.state_dict()[key])


def test_a_simmim_checkpoint_gives_a_features_backbone(tmp_path, caplog):
    encoder = _pretrained()
    path = tmp_path / "last.pth"
    _swin_train_simmim_checkpoint(path, encoder)
    with caplog.at_level(logging.INFO, logger="swin_train"):
        backbone = create_model(checkpoint=path, features_only=True).eval()
    assert "its mask token and decoder are left out" in caplog.text and "classifier head" not in caplog.text
    assert torch.equal(backbone.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    key = f"layers.1.blocks.1.attn.{TABLE}"
    assert torch.equal(backbone.state_dict()[key], encoder.state_dict()[key])
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 48, 48))
    assert [tuple(m.shape[1:]) for m in maps] == [(24, 24, 24), (48, 12, 12)]


def test_fine_tuning_recipe_loads_a_swin_train_simmim_checkpoint(tmp_path):
    encoder = _pretrained()
    path = tmp_path / "last.pth"
    _swin_train_simmim_checkpoint(path, encoder)
    model = build_classifier(_micro_config(path), 10)
    key = f"layers.0.blocks.0.attn.{TABLE}"
    assert torch.equal(
        model.state_dict()[key], remap_relative_position_bias_table(encoder.state_dict()[key], 6, 7)
    )
    assert torch.equal(model.patch_embed.proj.weight, encoder.patch_embed.proj.weight)


# ---------------------------------------------------------------------------- against the official code


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official models package (swin_transformer.py, swin_transformer_v2.py, simmim.py) and
    utils_simmim.py from the snapshot, imported from a temporary folder."""
    root = tmp_path_factory.mktemp("official")
    official_models_package(root, "official_simmim_models")
    sys.path.insert(0, str(root))
    try:
        models = importlib.import_module("official_simmim_models.simmim")
    finally:
        sys.path.remove(str(root))
    utils = official_module("official_utils_simmim_ft", "utils_simmim.py", root)
    return SimpleNamespace(models=models, utils=utils)


def _official_kwargs(arch: dict) -> dict:
    return {**arch, "depths": list(arch["depths"]), "num_heads": list(arch["num_heads"])}


def _official_fine_tune(official, path, version: int, arch: dict, monkeypatch, **extra):
    """The official classifier loaded the official way (utils_simmim.load_pretrained: `encoder.` stripped,
    remap_pretrained_keys_swin, strict=False), interp2d standing in as its FITPACK spline where needed."""
    from test_simmim_remap import _interp2d_cubic

    monkeypatch.setattr(
        official.utils.interpolate, "interp2d", lambda x, y, z, kind: _interp2d_cubic(x, y, z), raising=False
    )
    module = official.models
    cls = module.SwinTransformerV2 if version == 2 else module.SwinTransformer
    model = cls(**_official_kwargs(arch), num_classes=10, **extra)
    config = SimpleNamespace(
        MODEL=SimpleNamespace(PRETRAINED=str(path), TYPE="swinv2" if version == 2 else "swin")
    )
    official.utils.load_pretrained(config, model, logging.getLogger("official"))
    return model.eval()


def _official_simmim_file(official, path, version: int) -> dict:
    """An official SimMIM model (models/simmim.py) saved as its trainer does ({'model': state_dict})."""
    module = official.models
    cls = module.SwinTransformerV2ForSimMIM if version == 2 else module.SwinTransformerForSimMIM
    torch.manual_seed(2)
    encoder = cls(**_official_kwargs(PRETRAIN), num_classes=0)
    simmim = module.SimMIM(config=None, encoder=encoder, encoder_stride=STRIDE, in_chans=3, patch_size=2)
    sd = simmim.state_dict()
    with torch.no_grad():
        for key in sd:
            if key.endswith((TABLE, "cpb_mlp.2.weight")):
                sd[key].normal_(0, 0.5)
    torch.save({"model": sd}, path)
    return sd


@pytest.mark.parametrize("version", [1, 2])
def test_official_simmim_checkpoint_gives_the_official_classifiers_logits(
    official, version, tmp_path, monkeypatch
):
    path = tmp_path / "simmim_pretrain.pth"
    sd = _official_simmim_file(official, path, version)
    assert (
        "encoder.mask_token" in sd
        and "decoder.0.weight" in sd
        and not any(k.startswith("encoder.head") for k in sd)
    )
    theirs = _official_fine_tune(official, path, version, PRETRAIN, monkeypatch)
    ours = build_classifier(_micro_config(path, version, window=6, img=48), 10)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(_logits(ours, x, head_from=theirs), _logits(theirs, x), rtol=0, atol=1e-5)
    theirs_sd = theirs.state_dict()
    assert all(
        torch.equal(v, theirs_sd[k]) for k, v in ours.state_dict().items() if not k.startswith("head.")
    )


@pytest.mark.parametrize("version", [1, 2])
def test_official_window_6_to_7_fine_tuning_is_reproduced(official, version, tmp_path, monkeypatch):
    path = tmp_path / "simmim_pretrain.pth"
    _official_simmim_file(official, path, version)
    extra = {"pretrained_window_sizes": [6, 6]} if version == 2 else {}  # as the official V2 recipe sets it
    theirs = _official_fine_tune(official, path, version, FINETUNE, monkeypatch, **extra)
    cfg = _micro_config(path, version)
    ours = build_classifier(cfg, 10)  # V2: pretrained_window_sizes taken from the file
    if version == 2:
        assert cfg.model.pretrained_window_sizes == [6, 6]
    theirs_sd = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if key.endswith(TABLE):
            torch.testing.assert_close(value, theirs_sd[key], rtol=1e-5, atol=1e-6)
        elif not key.startswith("head."):
            assert torch.equal(value, theirs_sd[key]), key
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(_logits(ours, x, head_from=theirs), _logits(theirs, x), rtol=0, atol=1e-5)


def test_swin_trains_own_simmim_model_fine_tunes_to_the_same_features(tmp_path):
    """create_simmim's state dict (what a task: simmim run saves) gives a classifier whose pooled features are
    the pre-trained encoder's on unmasked images."""
    from swin_train import create_simmim

    arch = dict(img_size=64, patch_size=8, embed_dim=24, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=4)
    simmim = create_simmim(arch).eval()
    classifier = SwinTransformer(**arch, num_classes=10)
    report = load_pretrained(classifier, {"model": simmim.state_dict()})
    assert sorted(report.reinitialised) == ["head.bias", "head.weight"] and not report.unexpected
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    classifier.head = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = simmim.encoder(x, torch.zeros(2, 8, 8)).mean(dim=(2, 3))
    torch.testing.assert_close(_logits(classifier, x), expected, rtol=0, atol=1e-6)
