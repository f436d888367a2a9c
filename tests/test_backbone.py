"""The features model (issue 31 item 3): create_model(features_only=True) gives the classifier's stage maps,
each through its own LayerNorm `norm{i}`, under the detection rule; it loads every layout the classifier
reads and mmdet / mmseg checkpoints, freezes stages as the official detection backbone does, exports to ONNX,
compiles, and says what is wrong with its input in one line. The official backbone itself:
test_backbone_official.py."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_export import _swin_train_checkpoint

from swin_train import create_model
from swin_train.checkpoint import save_checkpoint
from swin_train.cli.model import cli as swin_model
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.backbone import SwinBackbone
from swin_train.models.convert import save_weights, to_layout
from swin_train.models.detection_layout import to_detection
from swin_train.models.swin import SwinTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import detection  # noqa: E402

# Four stages with windows of 4 on 2-pixel patches: 16x16 ... 2x2 tokens at the configured 32 px.
ARCH = dict(
    img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4
)


def randomised(model):
    """Every norm and bias drawn from N(0, 0.5), so that no parameter sits at an initial value that hides it."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim <= 1 or "logit_scale" in name:
                param.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("version", [1, 2])
def test_features_are_the_classifiers_stage_maps_through_the_stage_norms_at_any_size(version):
    classifier = randomised(SwinTransformer(**ARCH, version=version, always_partition=True, num_classes=3))
    backbone = randomised(create_model(**ARCH, version=version, features_only=True))  # stage norms random
    report = backbone.load_state_dict(classifier.state_dict(), strict=False)
    assert sorted(report.missing_keys) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert sorted(report.unexpected_keys) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    for size in [(32, 32), (37, 53), (64, 30)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            features, stages = backbone(images), classifier.forward_stages(images)
        assert [tuple(f.shape[1:]) for f in features] == backbone.feature_shapes(size)
        for i, (feature, stage) in enumerate(zip(features, stages, strict=True)):
            norm = getattr(backbone, f"norm{i}")
            torch.testing.assert_close(feature, norm(stage).permute(0, 3, 1, 2), rtol=0, atol=0)
    assert backbone.feature_info == [
        dict(num_chs=16 * 2**i, reduction=2 * 2**i, module=f"norm{i}") for i in range(4)
    ]


def test_the_backbone_keeps_the_detection_rule_where_the_classifier_shrinks_its_window():
    backbone, classifier = create_model(**ARCH, features_only=True), create_model(**ARCH)
    assert [(b.window, b.shift) for b in backbone.layers[3].blocks] == [(4, 0), (4, 2)]
    assert [(b.window, b.shift) for b in classifier.layers[3].blocks] == [(2, 0), (2, 0)]  # 2x2 at 32 px


def test_features_equal_timms_features_only_with_always_partition_where_their_rules_agree():
    """timm pads after the roll (the official code before it) and has no stage norms: at sizes whose every
    stage windows tile, its maps through our norms are ours."""
    arch = {**ARCH, "num_heads": (1, 2, 2, 4)}
    theirs = randomised(detection.timm_features(arch))
    ours = create_model(**arch, features_only=True).eval()
    sd = {k.replace("layers_", "layers.", 1): v for k, v in theirs.state_dict().items()}
    report = ours.load_state_dict(to_layout(sd, "swin-train"), strict=False)
    assert report.unexpected_keys == [] and all(k.startswith("norm") for k in report.missing_keys)
    for size in [(32, 32), (64, 32), (32, 96)]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = [
                getattr(ours, f"norm{i}")(m).permute(0, 3, 1, 2) for i, m in enumerate(theirs(images))
            ]
            for a, b in zip(ours(images), expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_defaults_to_the_official_detection_backbones():
    backbone = create_model("swin_tiny_patch4_window7_224", features_only=True)  # the classifier's: 0.1
    assert backbone.layers[3].blocks[1].drop_path.drop_prob == pytest.approx(0.2)
    assert create_model(**ARCH, features_only=True, drop_path_rate=0.3).layers[3].blocks[
        1
    ].drop_path.drop_prob == (pytest.approx(0.3))


def test_out_indices_pick_stages_and_later_stages_do_not_run():
    backbone = create_model(**ARCH, features_only=True, out_indices=(2, 1))
    assert backbone.out_indices == (1, 2) and [i["module"] for i in backbone.feature_info] == [
        "norm1",
        "norm2",
    ]
    info = backbone.feature_info  # timm's accessors, as code written for its features_only calls them
    assert (
        info.channels() == [32, 64]
        and info.reduction() == [4, 8]
        and info.module_name() == ["norm1", "norm2"]
    )
    assert info.channels(1) == 64 and info.reduction(0) == 4
    assert not any(k.startswith(("norm0.", "norm3.")) for k in backbone.state_dict())
    features = backbone(torch.randn(1, 3, 40, 48))
    assert [tuple(f.shape) for f in features] == [(1, 32, 10, 12), (1, 64, 5, 6)]
    sum(f.sum() for f in features).backward()
    assert all(p.grad is None for p in backbone.layers[3].parameters())
    assert backbone.layers[1].blocks[0].attn.qkv.weight.grad is not None


# the official detection backbone's _freeze_stages: 0 the patch embedding, 1 also the absolute position
# embedding, k >= 2 also stages 0 .. k-2 (and pos_drop)
@pytest.mark.parametrize("frozen_stages,frozen_layers", [(-1, 0), (0, 0), (1, 0), (2, 1), (3, 2), (4, 3)])
def test_frozen_stages_freeze_as_the_official_backbone_and_stay_in_eval_mode(frozen_stages, frozen_layers):
    backbone = create_model(**ARCH, ape=True, features_only=True, frozen_stages=frozen_stages)
    backbone.eval().train()
    assert backbone.patch_embed.training == (frozen_stages < 0)
    assert all(not p.requires_grad for p in backbone.patch_embed.parameters()) == (frozen_stages >= 0)
    assert backbone.absolute_pos_embed.requires_grad == (frozen_stages < 1)
    for i, layer in enumerate(backbone.layers):
        frozen = i < frozen_layers
        assert layer.training != frozen and all(m.training != frozen for m in layer.modules())
        assert all(p.requires_grad != frozen for p in layer.parameters())
    assert all(getattr(backbone, f"norm{i}").weight.requires_grad for i in range(4))
    assert backbone.pos_drop.training == (frozen_stages < 2)


@pytest.mark.parametrize(
    "kwargs,size,message",
    [
        (
            dict(out_indices=(0, 4)),
            32,
            "out_indices [0, 4] are out of range: give stages from 0 to 3 (the model has 4)",
        ),
        (dict(out_indices=(1, 1)), 32, "out_indices [1, 1] name a stage twice; give each once"),
        (
            dict(frozen_stages=5),
            32,
            "frozen_stages 5 is out of range: -1 (none) to 4 for a model of 4 stages",
        ),
        (
            dict(frozen_stages=-2),
            32,
            "frozen_stages -2 is out of range: -1 (none) to 4 for a model of 4 stages",
        ),
        (
            dict(frozen_stages=1.5),
            32,
            "frozen_stages 1.5 is out of range: -1 (none) to 4 for a model of 4 stages",
        ),
        (
            dict(out_indices=(True, 2)),
            32,
            "out_indices [True, 2] are out of range: give stages from 0 to 3 (the model has 4)",
        ),
    ],
)
def test_bad_stage_choices_are_one_line_errors(kwargs, size, message):
    with pytest.raises(ConfigError) as error:
        create_model(**ARCH, features_only=True, **kwargs)
    assert str(error.value) == message


def test_an_image_smaller_than_a_window_is_a_one_line_error():
    backbone = create_model(**ARCH, features_only=True)
    with pytest.raises(ValueError) as error:
        backbone(torch.randn(1, 3, 7, 40))
    assert str(error.value) == (
        "a 7x40 image is 4x20 patches, smaller than one window (4x4); give images of at least 8x8"
    )


# ---------------------------------------------------------------------------------------- loading weights


def _stage_weights_equal(backbone, classifier_sd):
    own = backbone.state_dict()
    return all(torch.equal(own[k], v) for k, v in classifier_sd.items() if k in own)


@pytest.mark.parametrize("layout", ["official", "timm", "torchvision"])
def test_classification_layouts_load_and_the_log_says_the_stage_norms_start_fresh(layout, tmp_path, caplog):
    arch = {**ARCH, "depths": (2, 2), "num_heads": (1, 2), "img_size": 16}  # one window per stage everywhere
    classifier = randomised(SwinTransformer(**arch, num_classes=3))
    path = tmp_path / f"{layout}.pth"
    save_checkpoint(to_layout(classifier.state_dict(), layout, classifier), path)
    with caplog.at_level(logging.INFO, logger="swin_train"):
        backbone = create_model(**arch, features_only=True, checkpoint=path)
    assert _stage_weights_equal(backbone, classifier.state_dict())
    line = caplog.records[-1].getMessage()
    assert (
        f"({layout} layout)" in line
        and "re-initialised 4 (norm0.weight, norm0.bias, norm1.weight, norm1.bias)" in line
    )
    assert "ignored 4 unexpected (norm.weight, norm.bias, head.weight, head.bias)" in line


def test_a_swin_train_checkpoint_gives_its_architecture_and_weights(micro_arch, tmp_path, caplog):
    path, state = _swin_train_checkpoint(tmp_path, micro_arch)
    with caplog.at_level(logging.INFO, logger="swin_train"):
        backbone = create_model(checkpoint=path, features_only=True, out_indices=(1,))
    assert isinstance(backbone, SwinBackbone) and backbone.out_indices == (1,)
    assert [(b.window, b.shift) for b in backbone.layers[1].blocks] == [(4, 0), (4, 2)]  # the detection rule
    assert _stage_weights_equal(backbone, state["model"])
    assert "re-initialised 2 (norm1.weight, norm1.bias)" in caplog.records[-1].getMessage()


def test_a_swin_train_checkpoint_takes_overrides_over_its_own_architecture(micro_arch, tmp_path):
    """A detector fine-tunes a run's backbone with its own drop path (the official configs: 0.2 for Swin-T)."""
    path, state = _swin_train_checkpoint(tmp_path, micro_arch)
    backbone = create_model(checkpoint=path, features_only=True, drop_path_rate=0.3)
    assert backbone.layers[1].blocks[1].drop_path.drop_prob == pytest.approx(0.3)
    assert backbone.embed_dim == 24 and _stage_weights_equal(backbone, state["model"])
    classifier = create_model(checkpoint=path, num_classes=3)  # its stages, a fresh head of 3 classes
    bare = tmp_path / "official.pth"
    save_checkpoint(to_layout(state["model"], "timm"), bare)
    with pytest.raises(
        CheckpointError, match=r"bare weights need their architecture: .* every field \(create_model\)"
    ):
        create_model(checkpoint=bare, features_only=True, drop_path_rate=0.3)
    stages = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    assert classifier.head.out_features == 3 and _stage_weights_equal(classifier, stages)


def test_a_swin_v2_runs_backbone_keeps_the_window_a_shrunk_stage_learned_its_offsets_at(tmp_path, caplog):
    """The classifier ran ARCH's 2x2 last stage as one window of 2; the backbone partitions it by 4 (the
    detection rule), its position-bias MLP still reading offsets normalised by the window of 2."""
    from swin_train.config import Config, DataConfig, ModelConfig, config_to_dict
    from swin_train.data.transforms import Preprocess

    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items() if k != "img_size"}
    cfg = Config(model=ModelConfig(**fields, version=2, num_classes=3), data=DataConfig(img_size=32))
    classifier = randomised(SwinTransformer(**cfg.model_kwargs()))
    state = dict(format="swin-train/1", model=classifier.state_dict(), config=config_to_dict(cfg))
    state |= dict(class_names=["a", "b", "c"], preprocess=Preprocess.from_config(cfg).to_dict())
    save_checkpoint(state, tmp_path / "v2.pth")
    with caplog.at_level(logging.INFO, logger="swin_train"):
        backbone = create_model(checkpoint=tmp_path / "v2.pth", features_only=True)
    assert [layer.blocks[0].attn.pretrained_window for layer in backbone.layers] == [4, 4, 4, 2]
    assert [layer.blocks[0].window for layer in backbone.layers] == [4, 4, 4, 4]
    assert "pretrained_window_sizes=[4, 4, 4, 2]: the windows the weights were trained with" in caplog.text
    assert _stage_weights_equal(backbone, classifier.state_dict())


def test_stage_choices_without_features_only_are_a_one_line_error():
    for kwargs in (dict(out_indices=(1,)), dict(frozen_stages=1)):
        with pytest.raises(ConfigError) as error:
            create_model(**ARCH, **kwargs)  # a classifier would ignore them
        assert str(error.value) == "out_indices and frozen_stages are the backbone's: pass features_only=True"


def test_a_hugging_face_folder_loads_as_a_backbone(micro_arch, tmp_path):
    from swin_train.models.hf import write_hf_folder

    classifier = randomised(SwinTransformer(**micro_arch, num_classes=3))
    write_hf_folder(classifier, tmp_path / "hf", class_names=["a", "b", "c"], preprocess=None, rates=None)
    backbone = create_model(checkpoint=tmp_path / "hf", features_only=True)
    assert _stage_weights_equal(backbone, classifier.state_dict())


@pytest.mark.parametrize(
    "ape,others",
    [
        (False, ["neck.fpn_convs.0.conv.weight", "roi_head.bbox_head.fc_cls.bias"]),  # mmdet
        (True, ["decode_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"]),  # mmseg
    ],
)
def test_an_mmdet_or_mmseg_checkpoint_loads_its_backbone_and_counts_the_rest(ape, others, tmp_path, caplog):
    source = randomised(create_model(**ARCH, ape=ape, features_only=True))
    sd = dict(source.state_dict())
    if ape:  # the detection backbone holds it as (1, C, H, W)
        sd["absolute_pos_embed"] = sd["absolute_pos_embed"].view(1, 16, 16, 16).permute(0, 3, 1, 2)
    state = {f"backbone.{k}": v for k, v in sd.items()}
    state |= {key: torch.randn(4, 4) for key in others}
    save_checkpoint({"meta": {"epoch": 3}, "state_dict": state}, tmp_path / "mask_rcnn.pth")
    with caplog.at_level(logging.INFO, logger="swin_train"):
        backbone = create_model(**ARCH, ape=ape, features_only=True, checkpoint=tmp_path / "mask_rcnn.pth")
    line = caplog.records[-1].getMessage()
    assert f"loaded {len(source.state_dict())} tensors" in line and "(mmdet layout)" in line
    assert f"ignored 2 unexpected ({', '.join(others)})" in line
    assert "re-initialised" not in line
    images = torch.randn(1, 3, 45, 37)
    with torch.no_grad():
        for a, b in zip(backbone.eval()(images), source(images), strict=True):
            assert torch.equal(a, b)


def test_the_detection_export_is_our_layout_without_the_classifier_end_with_index_tables(
    micro_arch, tmp_path
):
    classifier = randomised(SwinTransformer(**micro_arch, num_classes=3, ape=True))
    save_weights(classifier.state_dict(), "detection", tmp_path / "pretrained.pth", classifier)
    saved = torch.load(tmp_path / "pretrained.pth", weights_only=True)
    assert list(saved) == ["model"]
    sd = saved["model"]
    assert not any(k.startswith(("norm.", "head.")) or k.endswith("attn_mask") for k in sd)
    index_keys = [k for k in sd if k.endswith("relative_position_index")]
    assert len(index_keys) == sum(micro_arch["depths"])
    assert sd["absolute_pos_embed"].shape == (1, 256, 24)  # (1, L, C): the official loader reshapes it
    backbone = create_model(
        **micro_arch, ape=True, features_only=True, checkpoint=tmp_path / "pretrained.pth"
    )
    assert _stage_weights_equal(backbone, classifier.state_dict())


def test_swin_v2_weights_have_no_detection_export():
    v2 = SwinTransformer(**ARCH, version=2, num_classes=3)
    with pytest.raises(
        CheckpointError, match="the official detection and segmentation code has Swin V1 only"
    ):
        to_detection(v2.state_dict(), 4)


# ------------------------------------------------------------------------------- ONNX, compile, swin-model


def test_the_features_model_exports_to_onnx_with_dynamic_height_and_width(tmp_path):
    from swin_train.models.onnx import export_onnx

    arch = {**ARCH, "depths": (2, 2), "num_heads": (1, 2)}
    backbone = randomised(create_model(**arch, features_only=True))
    difference = export_onnx(backbone, tmp_path / "backbone.onnx", class_names=None, preprocess=None)
    assert difference < 1e-4  # checked by export_onnx at 32x32 and 49x43, batches 1 and 3, every stage
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == ["stage0", "stage1"]
    images = torch.randn(2, 3, 37, 61)
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        for a, b in zip(got, backbone(images), strict=True):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-4)


def test_the_features_model_compiles_and_gives_eager_outputs_with_gradients():
    arch = {**ARCH, "depths": (2, 2), "num_heads": (1, 2)}
    backbone = create_model(**arch, features_only=True, frozen_stages=0, drop_path_rate=0.0)
    randomised(backbone).train()
    torch._dynamo.reset()
    compiled = torch.compile(backbone, backend="aot_eager", fullgraph=True)
    try:
        for size in [(37, 53)]:  # not the configured size: the window tables are computed in the graph
            images = torch.randn(2, 3, *size)
            expected = backbone(images)
            got = compiled(images)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            sum(f.square().mean() for f in got).backward()
            assert backbone.patch_embed.proj.weight.grad is None  # frozen
            assert backbone.layers[0].blocks[0].attn.qkv.weight.grad is not None
            backbone.zero_grad()
    finally:
        torch._dynamo.reset()


def test_swin_model_features_prints_the_stage_shapes_for_a_size(capsys):
    assert swin_model(["--model", "swin_tiny_patch4_window7_224", "--features", "800x1333"]) == 0
    out = capsys.readouterr().out
    for line in [
        "norm0    96    4   96 x 200 x 334",
        "norm1   192    8  192 x 100 x 167",
        "norm2   384   16   384 x 50 x 84",
        "norm3   768   32   768 x 25 x 42",
    ]:
        assert " ".join(line.split()) in " ".join(out.split()), out
    assert swin_model(["--model", "swin_tiny_patch4_window7_224", "--features", "333x517", "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)["features"]
    assert [s["shape"] for s in shapes] == [[96, 84, 130], [192, 42, 65], [384, 21, 33], [768, 11, 17]]


def test_swin_model_features_too_small_is_a_one_line_error(capsys):
    assert swin_model(["--model", "swin_tiny_patch4_window7_224", "--features", "20x800"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a 20x800 image is 5x200 patches, smaller than one window (7x7)" in err
    for size in ("800x-5", "-800x5", "800x1333x3"):  # "--features=": argparse takes "-800x5" for an option
        assert swin_model(["--model", "swin_tiny_patch4_window7_224", f"--features={size}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"swin-model: error: --features takes HxW, e.g. 800x1333, got '{size}'"


def test_padding_is_the_official_rule_for_the_patch_embedding():
    """An image patches do not tile gives the map of the image zero-padded at the bottom and right."""
    backbone = randomised(create_model(**ARCH, features_only=True))
    images = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        for a, b in zip(backbone(images), backbone(F.pad(images, (0, 1, 0, 1))), strict=True):
            assert torch.equal(a, b)


def test_swin_export_writes_the_detection_layout_and_refuses_swin_v2_in_one_line(
    micro_arch, tmp_path, capsys
):
    from swin_train.cli.export import cli as swin_export

    path, state = _swin_train_checkpoint(tmp_path, micro_arch)
    out = tmp_path / "pretrained.pth"
    assert swin_export(["--checkpoint", str(path), "--format", "detection", "--out", str(out)]) == 0
    assert f"(detection) to {out}" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)["model"]
    expected = {k for k in state["model"] if not k.startswith(("norm.", "head."))}
    assert {k for k in sd if not k.endswith("relative_position_index")} == expected
    state["config"]["model"]["version"] = 2
    state["model"] = SwinTransformer(**micro_arch, version=2, num_classes=5).state_dict()
    save_checkpoint(state, tmp_path / "v2.pth")
    args = [
        "--checkpoint",
        str(tmp_path / "v2.pth"),
        "--format",
        "detection",
        "--out",
        str(tmp_path / "v2.out"),
    ]
    assert swin_export(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the official detection and segmentation code has Swin V1 only" in err
    for fmt in ("detection", "timm"):  # the export itself, a backbone: nothing to export a classifier from
        args = [
            "--checkpoint",
            str(out),
            "--format",
            fmt,
            "--out",
            str(tmp_path / f"again.{fmt}"),
            "--img-size",
            "32",
        ]
        assert swin_export(args) == 2
        assert capsys.readouterr().err == (
            f"swin-export: error: {out} holds a detection backbone (no final norm or head), not a classifier; "
            "load it with swin_train.create_model(NAME or fields, features_only=True, checkpoint=...)\n"
        )


def test_flops_count_the_stages_run_and_their_norms_instead_of_the_classifier_end():
    classifier = SwinTransformer(**ARCH, always_partition=True, num_classes=3)
    backbone = create_model(**ARCH, features_only=True)
    final = classifier.num_features * 2 * 2  # the final norm on the 2x2 map
    stage_norms = sum(layer.dim * layer.resolution[0] * layer.resolution[1] for layer in classifier.layers)
    assert backbone.flops() == classifier.flops() - final - classifier.num_features * 3 + stage_norms
    first_two = create_model(**ARCH, features_only=True, out_indices=(0, 1))
    assert first_two.flops() < backbone.flops() - sum(b.flops() for b in backbone.layers[2].blocks)
