"""Hugging Face transformers' Swin, both ways: our weights as a folder that `from_pretrained` loads with the
same logits, and such folders back into our layout (swin_train/models/hf.py)."""

import json
import os
import stat

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform
from transformers import AutoImageProcessor, SwinConfig, SwinForImageClassification

from swin_train import create_model
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.convert import convert_state_dict, to_layout
from swin_train.models.hf import is_hf_folder, load_hf_folder, write_hf_folder
from swin_train.models.hf_layout import (
    from_hf_state_dict,
    hf_config,
    hf_preprocessor_config,
    model_arch,
    to_hf_state_dict,
)

CLASSES = ["cat", "dog", "fish", "bird", "frog"]
IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _randomised(model):
    """Every parameter perturbed, so that norms (ones) and biases (zeros) mapped to the wrong place show."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _micro(micro_arch, **kw):
    return _randomised(create_model(**{**micro_arch, "num_classes": len(CLASSES), **kw}))


def _preprocess(img_size: int, crop_pct: float = 0.875) -> dict:
    return dict(img_size=img_size, crop_pct=crop_pct, interpolation="bicubic", **IMAGENET)


def _transformers_logits(folder, images: torch.Tensor) -> torch.Tensor:
    hf_model = SwinForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf_model(pixel_values=images).logits


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:3]


# ------------------------------------------------------------------------------------------- state dicts


def test_hf_names_are_the_ones_transformers_saves_and_qkv_is_split_in_order(micro_arch, tmp_path):
    model = _micro(micro_arch)
    arch = model_arch(model)
    ours = model.state_dict()
    theirs = to_hf_state_dict(ours, arch)
    SwinForImageClassification(SwinConfig.from_dict(hf_config(arch, CLASSES))).save_pretrained(tmp_path)
    saved_names = set(load_file(tmp_path / "model.safetensors"))
    index_names = {k for k in theirs if k.endswith("relative_position_index")}
    assert set(theirs) - index_names == saved_names
    assert len(index_names) == 4  # one per block
    prefix = "swin.encoder.layers.1.blocks.1.attention.self."
    q, k, v = (theirs[f"{prefix}{name}.weight"] for name in ("query", "key", "value"))
    assert torch.equal(torch.cat([q, k, v]), ours["layers.1.blocks.1.attn.qkv.weight"])
    assert theirs[f"{prefix}relative_position_index"].shape == (16, 16)  # (N, N), N = 4 x 4
    _assert_same_weights(from_hf_state_dict(theirs), ours)


def test_transformers_module_names_and_a_headless_swinmodel_read_back(micro_arch, tmp_path):
    model = _micro(micro_arch)
    write_hf_folder(model, tmp_path, class_names=CLASSES, preprocess=None)
    hf_model = SwinForImageClassification.from_pretrained(tmp_path)
    # transformers 5's own names (q_proj, o_proj, mlp.fc1, relative_position_bias.*) in memory
    assert any(".attention.q_proj." in k for k in hf_model.state_dict())
    _assert_same_weights(from_hf_state_dict(hf_model.state_dict()), model.state_dict())
    # SwinModel (no classifier, no `swin.` prefix)
    headless = {k.removeprefix("swin."): v for k, v in hf_model.state_dict().items() if "classifier" not in k}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    _assert_same_weights(from_hf_state_dict(headless), expected)


def test_timm_weights_through_ours_to_transformers_give_timms_logits(micro_arch, tmp_path):
    theirs = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=len(CLASSES), **micro_arch
    )
    _randomised(theirs)
    ours = create_model(**micro_arch, num_classes=len(CLASSES)).eval()
    ours.load_state_dict(convert_state_dict(theirs.state_dict()), strict=True)
    write_hf_folder(ours, tmp_path / "hf", class_names=CLASSES, preprocess=None)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(images)
    torch.testing.assert_close(_transformers_logits(tmp_path / "hf", images), expected, rtol=0, atol=1e-5)
    # and back: HF -> ours -> official / timm layouts hold the weights we started from
    back = load_hf_folder(tmp_path / "hf").state_dict
    _assert_same_weights(back, ours.state_dict())
    _assert_same_weights(convert_state_dict(to_layout(back, "official", ours)), ours.state_dict())
    _assert_same_weights(to_layout(back, "timm"), theirs.state_dict())


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": False}, {"ape": True}, {"in_chans": 1}])
def test_from_pretrained_gives_our_logits_and_load_hf_folder_our_model(micro_arch, tmp_path, variant):
    model = _micro(micro_arch, **variant)
    write_hf_folder(model, tmp_path, class_names=CLASSES, preprocess=_preprocess(32))
    images = torch.randn(2, variant.get("in_chans", 3), 32, 32)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(_transformers_logits(tmp_path, images), expected, rtol=0, atol=1e-4)

    loaded = load_hf_folder(tmp_path)
    assert loaded.arch == model_arch(model)
    rebuilt = create_model(**loaded.arch).eval()
    rebuilt.load_state_dict(loaded.state_dict, strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), expected)
    assert loaded.class_names == CLASSES


@pytest.mark.slow
def test_full_size_swin_t_from_pretrained_gives_our_logits(tmp_path):
    model = _randomised(create_model("swin_tiny_patch4_window7_224"))
    write_hf_folder(model, tmp_path, class_names=None, preprocess=_preprocess(224))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(_transformers_logits(tmp_path, images), expected, rtol=0, atol=1e-4)
    loaded = load_hf_folder(tmp_path)
    _assert_same_weights(loaded.state_dict, model.state_dict())
    assert loaded.class_names is None  # transformers' placeholder names LABEL_i mean "no names"
    assert loaded.preprocess == _preprocess(224)  # 224 / 0.875 = 256 exactly
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"]["999"] == "LABEL_999" and config["window_size"] == 7


# ------------------------------------------------------------------------------------ folder and files


def test_config_names_the_classes_and_file_modes_follow_the_umask_without_temp_files(micro_arch, tmp_path):
    model = _micro(micro_arch)
    old_umask = os.umask(0o027)  # safetensors alone would create 0600
    try:
        write_hf_folder(model, tmp_path / "out", class_names=CLASSES, preprocess=_preprocess(32))
    finally:
        os.umask(old_umask)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert all(stat.S_IMODE((tmp_path / "out" / f).stat().st_mode) == 0o640 for f in files)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "swin" and config["architectures"] == ["SwinForImageClassification"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert config["label2id"] == {name: i for i, name in enumerate(CLASSES)}
    assert SwinConfig.from_pretrained(tmp_path / "out").id2label[3] == "bird"
    assert is_hf_folder(tmp_path / "out") and not is_hf_folder(tmp_path / "out" / "config.json")

    write_hf_folder(
        model, tmp_path / "out", class_names=None, preprocess=None
    )  # again, without preprocessing
    assert not (tmp_path / "out" / "preprocessor_config.json").exists()  # the old one described nothing now
    assert load_hf_folder(tmp_path / "out").preprocess is None


def _image(height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _timm_eval(preprocess: dict):
    """The eval transform swin-train builds from a checkpoint's preprocessing (timm's create_transform)."""
    p = preprocess
    return create_transform(
        p["img_size"],
        is_training=False,
        crop_pct=p["crop_pct"],
        crop_mode="squash" if p["crop_pct"] == 1.0 else "center",
        interpolation=p["interpolation"],
        mean=tuple(p["mean"]),
        std=tuple(p["std"]),
    )


@pytest.mark.parametrize(
    ("crop_pct", "processor"), [(1.0, "ViTImageProcessor"), (0.875, "BitImageProcessor")]
)
def test_auto_image_processor_loads_and_with_pil_matches_our_eval_transform(tmp_path, crop_pct, processor):
    preprocess = _preprocess(32, crop_pct)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(preprocess)))
    default = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(default).__name__ == processor
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    # 40x45: short side 40 -> 36, long 45 -> 40, crop excess 4 and 8 (not 3 mod 4, see hf_preprocessor_config)
    image = _image(40, 45)
    ours = _timm_eval(preprocess)(image)
    assert torch.equal(pil(image, return_tensors="pt")["pixel_values"][0], ours)
    # the torchvision backend resizes tensors: same geometry, values within about a grey level
    values = default(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(values, ours, rtol=0, atol=1.5 / 255 / min(IMAGENET["std"]))


def test_hf_centre_crop_starts_one_pixel_earlier_when_the_excess_is_3_mod_4(tmp_path):
    preprocess = _preprocess(32, 0.875)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor_config(preprocess)))
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    image = _image(40, 48)  # long side 48 -> 43, excess 11: torchvision starts at round(5.5) = 6, HF at 5
    ours, theirs = _timm_eval(preprocess)(image), pil(image, return_tensors="pt")["pixel_values"][0]
    assert not torch.equal(ours, theirs)
    assert torch.equal(ours[:, :, :-1], theirs[:, :, 1:])


def test_hub_style_preprocessing_reads_back(tmp_path, micro_arch):
    write_hf_folder(_micro(micro_arch), tmp_path, class_names=CLASSES, preprocess=None)
    hub_style = {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": IMAGENET["mean"],
        "image_std": IMAGENET["std"],
        "resample": 3,
        "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub_style))
    assert load_hf_folder(tmp_path).preprocess == _preprocess(224, 1.0)


def test_a_crop_ours_cannot_do_leaves_preprocessing_out_with_a_warning(tmp_path, micro_arch, caplog):
    write_hf_folder(_micro(micro_arch), tmp_path, class_names=CLASSES, preprocess=None)
    same_side = {
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "resample": 3,
        "image_mean": 0.5,
        "image_std": 0.5,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(same_side))
    assert load_hf_folder(tmp_path).preprocess is None
    assert "resizes the short side to 32 and then crops" in caplog.text


def test_pytorch_model_bin_without_index_buffers_loads(micro_arch, tmp_path):
    model = _micro(micro_arch)
    write_hf_folder(model, tmp_path, class_names=CLASSES, preprocess=None)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(
        {k: v for k, v in sd.items() if "relative_position_index" not in k}, tmp_path / "pytorch_model.bin"
    )
    _assert_same_weights(load_hf_folder(tmp_path).state_dict, model.state_dict())


def test_sharded_safetensors_load(micro_arch, tmp_path):
    model = _micro(micro_arch)
    write_hf_folder(model, tmp_path, class_names=CLASSES, preprocess=None)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_weights(load_hf_folder(tmp_path).state_dict, model.state_dict())


# ------------------------------------------------------------------------------------------- refusals


def test_refuses_what_transformers_swin_cannot_compute(micro_arch, tmp_path):
    with pytest.raises(ConfigError, match="always normalises patches"):
        write_hf_folder(
            _micro(micro_arch, patch_norm=False), tmp_path / "a", class_names=None, preprocess=None
        )
    # 32 px / patch 2: maps of 16, 8 and 4 tokens; window 8 is shrunk to 4 in the last layer
    shrunk = _micro(micro_arch, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=8)
    with pytest.raises(ConfigError, match="layer 2 of this model sees 4x4 tokens, fewer than its window 8"):
        write_hf_folder(shrunk, tmp_path / "b", class_names=None, preprocess=None)
    with pytest.raises(ConfigError, match="4 class names for a head of 5 classes"):
        write_hf_folder(_micro(micro_arch), tmp_path / "c", class_names=CLASSES[:4], preprocess=None)
    with pytest.raises(ConfigError, match="class name 'cat' appears twice"):
        write_hf_folder(_micro(micro_arch), tmp_path / "d", class_names=["cat"] * 5, preprocess=None)
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before anything was written


def test_refuses_a_vit_folder_and_folders_without_config_or_weights(micro_arch, tmp_path):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(CheckpointError, match="holds a Hugging Face 'vit' model, not a Swin Transformer"):
        load_hf_folder(vit)

    no_weights = tmp_path / "no_weights"
    write_hf_folder(_micro(micro_arch), no_weights, class_names=CLASSES, preprocess=None)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_hf_folder(no_weights)
    (no_weights / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json; it is not a Hugging Face model folder"):
        load_hf_folder(no_weights)
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_hf_folder(tmp_path / "missing")


def test_refuses_pickled_code_mismatched_weights_and_other_heads(micro_arch, tmp_path):
    write_hf_folder(_micro(micro_arch), tmp_path, class_names=CLASSES, preprocess=None)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save({"weights": sd, "why": ConfigError("a pickled object")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pickled Python objects"):
        load_hf_folder(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").unlink()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**config, "embed_dim": 48}))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_hf_folder(tmp_path)

    decoder = {**sd, "decoder.0.weight": torch.zeros(1)}  # SwinForMaskedImageModeling
    with pytest.raises(CheckpointError, match="unexpected decoder.0.weight"):
        from_hf_state_dict(decoder)
