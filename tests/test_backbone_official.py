"""The features model against the official detection backbone (SwinTransformer/Swin-Transformer-Object-Detection,
mmdet/models/backbones/swin_transformer.py, read from a fetched snapshot with its mmcv/mmdet imports replaced by
stand-ins: scripts/bench/detection.py). Skipped without the snapshot; test_backbone.py checks the same maps
against the classifier's stages and timm's features_only."""

import inspect
import sys
from pathlib import Path

import pytest
import torch

from swin_train import create_model
from swin_train.checkpoint import save_checkpoint
from swin_train.models.convert import save_weights
from swin_train.models.swin import SwinTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench import detection  # noqa: E402

# The official Swin-T's patch and window on a micro width: stages of 84x130 ... 11x17 tokens at 333x517, every
# stage padded to whole windows, odd maps merged
ARCH = dict(
    img_size=224, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7
)
SIZES = [(333, 517), (320, 448), (801, 1203)]


@pytest.fixture(scope="module")
def official():
    try:
        return detection.official_detection_module()
    except detection.DetectionCodeMissing as e:
        pytest.skip(str(e))


def official_backbone(official, ape=False):
    """The official backbone of ARCH, every weight random (norms and biases from N(0, 0.5)), in eval mode."""
    torch.manual_seed(0)
    model = detection.official_backbone(official, ARCH, ape=ape)
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim <= 1:
                param.normal_(0.0, 0.5)
        if ape:
            model.absolute_pos_embed.normal_(0.0, 0.5)
    model.eval()
    return model


@pytest.mark.parametrize("ape", [False, True])
def test_features_equal_the_official_detection_backbone_loaded_from_an_mmdet_checkpoint(
    official, ape, tmp_path
):
    theirs = official_backbone(official, ape)
    save_checkpoint(detection.mmdet_checkpoint(theirs.state_dict()), tmp_path / "mask_rcnn.pth")
    ours = create_model(**ARCH, ape=ape, features_only=True, checkpoint=tmp_path / "mask_rcnn.pth").eval()
    for size in SIZES:
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected, got = theirs(images), ours(images)
        assert len(got) == len(expected) == 4
        for stage, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-4, f"{size} stage {stage}: {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("ape", [False, True])
def test_the_detection_export_loads_into_the_official_backbone_with_only_its_stage_norms_missing(
    official, ape, tmp_path
):
    """swin-export --format detection's file, read by the official `init_weights(pretrained)` (its own
    mmcv_custom.load_checkpoint), gives the features of our backbone built from the same classifier."""
    torch.manual_seed(1)
    classifier = SwinTransformer(**ARCH, ape=ape, num_classes=5)
    with torch.no_grad():
        for param in classifier.parameters():
            if param.ndim <= 1:
                param.normal_(0.0, 0.5)
    save_weights(classifier.state_dict(), "detection", tmp_path / "pretrained.pth", classifier)
    theirs = official_backbone(official, ape)
    detection.LOADED.clear()
    theirs.init_weights(pretrained=str(tmp_path / "pretrained.pth"))
    (loaded,) = detection.LOADED
    assert sorted(loaded["missing"]) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert loaded["unexpected"] == []
    theirs.eval()
    ours = create_model(**ARCH, ape=ape, features_only=True, checkpoint=tmp_path / "pretrained.pth").eval()
    images = torch.randn(1, 3, *SIZES[0])
    with torch.no_grad():
        for a, b in zip(ours(images), theirs(images), strict=True):
            assert (a - b).abs().max() < 1e-4


def test_the_default_stochastic_depth_is_the_official_backbones(official):
    from swin_train.models.backbone import DROP_PATH_RATE

    assert inspect.signature(official.SwinTransformer).parameters["drop_path_rate"].default == DROP_PATH_RATE


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 4])
def test_frozen_stages_freeze_what_the_official_backbone_freezes(official, frozen_stages):
    theirs = detection.official_backbone(official, ARCH, ape=True, frozen_stages=frozen_stages)
    theirs.train()
    ours = create_model(**ARCH, ape=True, features_only=True, frozen_stages=frozen_stages).train()
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()
    }
    ours_modes = {
        n: m.training for n, m in ours.named_modules() if n.startswith(("patch_embed", "layers", "pos"))
    }
    theirs_modes = dict(theirs.named_modules())
    assert all(theirs_modes[n].training == mode for n, mode in ours_modes.items() if n in theirs_modes)


def test_full_swin_t_features_equal_the_official_backbone(official, tmp_path):
    """Swin-T itself (about 5 s): every stage within 1e-4 at a size no stage's windows tile."""
    torch.manual_seed(0)
    theirs = official.SwinTransformer(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7
    )
    theirs.init_weights()
    with torch.no_grad():
        for param in theirs.parameters():
            if param.ndim <= 1:
                param.normal_(0.0, 0.5)
    theirs.eval()
    save_checkpoint(detection.mmdet_checkpoint(theirs.state_dict()), tmp_path / "swin_t_mask_rcnn.pth")
    ours = create_model(
        "swin_tiny_patch4_window7_224", features_only=True, checkpoint=tmp_path / "swin_t_mask_rcnn.pth"
    ).eval()
    images = torch.randn(1, 3, 333, 517)
    with torch.no_grad():
        for a, b in zip(ours(images), theirs(images), strict=True):
            assert (a - b).abs().max() < 1e-4


def test_the_benchmark_features_row_times_ours_the_official_backbone_and_timm_with_the_same_weights(official):
    from helpers import load_module

    benchmark = load_module(
        "benchmark_features", Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    )
    micro = ["--embed-dim", "16", "--depths", "2", "2", "2", "2", "--num-heads", "1", "2", "2", "4"]
    report = benchmark.main(["--features", "61x93", *micro, "--repeats", "2", "--warmup", "0", "--json"])
    assert report["size"] == [61, 93] and report["batch_size"] == 1
    assert report["official_max_abs_diff"] < 1e-4
    assert set(report["seconds"]) == {"ours", "official", "timm"} and all(
        len(t) == 2 for t in report["seconds"].values()
    )
    expected = {
        name: sorted(a / b for a, b in zip(report["seconds"]["ours"], report["seconds"][name]))
        for name in ("official", "timm")
    }
    assert report["ratios"] == {name: sum(r) / 2 for name, r in expected.items()}  # the median of two rounds
