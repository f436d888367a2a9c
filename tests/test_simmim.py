"""The SimMIM model (models/simmim.py) and `create_simmim`: the official loss on the same weights, images and
mask (V1 and V2, with and without the normalised target), the official state-dict layout, and one-line errors."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official import official_models_package, official_source

from swin_train import create_simmim
from swin_train.config import load_config
from swin_train.data.simmim import MaskGenerator
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.simmim import (
    MaskedSwinEncoder,
    SimMIM,
    local_statistics,
    norm_targets,
    simmim_state_dict,
)
from swin_train.models.swin import SwinTransformer
from swin_train.optim import PRETRAINING_NO_DECAY_NAMES, param_group_names

# 64 px, patches of 4, four stages (stride 32 as the official decoder): maps 16, 8, 4, 2; windows of 4
ARCH = dict(
    img_size=64, patch_size=4, embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4
)


def _masks(count: int, size: int = 64, mask_patch: int = 32, patch: int = 4) -> torch.Tensor:
    generator = MaskGenerator(size, mask_patch, patch, 0.6)
    return torch.stack([generator(np.random.RandomState(i)) for i in range(count)])


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official models/simmim.py (with the swin_transformer(_v2).py it imports) and optimizer.py, from the
    snapshot, imported as the package `official_simmim`."""
    root = tmp_path_factory.mktemp("official")
    official_models_package(root, "official_simmim", "optimizer.py")
    sys.path.insert(0, str(root))
    try:
        yield types.SimpleNamespace(
            simmim=importlib.import_module("official_simmim.simmim"),
            optimizer=importlib.import_module("official_simmim.optimizer"),
        )
    finally:
        sys.path.remove(str(root))


def _official_model(official, version: int, norm_target: int | None):
    encoder_class = official.simmim.SwinTransformerForSimMIM if version == 1 else None
    encoder_class = encoder_class or official.simmim.SwinTransformerV2ForSimMIM
    encoder = encoder_class(num_classes=0, drop_path_rate=0.0, **ARCH)
    config = types.SimpleNamespace(
        NORM_TARGET=types.SimpleNamespace(ENABLE=norm_target is not None, PATCH_SIZE=norm_target or 47)
    )
    return official.simmim.SimMIM(config, encoder, 32, 3, 4).eval()


@pytest.mark.parametrize("norm_target", [None, 47])
@pytest.mark.parametrize("version", [1, 2])
def test_loss_equals_the_official_simmim_on_the_same_weights_images_and_mask(
    official, version, norm_target, tmp_path
):
    torch.manual_seed(version)
    theirs = _official_model(official, version, norm_target)
    path = tmp_path / "simmim.pth"
    torch.save({"model": theirs.state_dict()}, path)  # an official SimMIM checkpoint's layout
    ours = create_simmim({**ARCH, "version": version}, checkpoint=path, norm_target=norm_target).eval()
    buffers = ("relative_position_index", "attn_mask", "relative_coords_table")
    assert set(ours.state_dict()) == {k for k in theirs.state_dict() if not k.endswith(buffers)}
    images, masks = torch.randn(3, 3, 64, 64), _masks(3)
    with torch.no_grad():
        expected = theirs(images, masks.long())  # the official MaskGenerator's int64 masks, collated
        loss = ours(images, masks)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0), (loss.item(), expected.item())
    ours.train()
    ours(images, masks).backward()  # the mask token and decoder learn
    assert ours.encoder.mask_token.grad.abs().sum() > 0 and ours.decoder[0].weight.grad.abs().sum() > 0


def test_no_weight_decay_groups_are_the_official_pretraining_ones(official):
    # the official pre-training decays the bias tables (and V2's cpb_mlp, logit scales): PRETRAINING_NO_DECAY_NAMES
    for version in (1, 2):
        theirs = _official_model(official, version, None)
        groups = official.optimizer.get_pretrain_param_groups(
            theirs, theirs.no_weight_decay(), theirs.no_weight_decay_keywords()
        )
        names = {id(p): n for n, p in theirs.named_parameters()}
        official_no_decay = {names[id(p)] for p in groups[1]["params"]}
        ours = SimMIM(MaskedSwinEncoder(version=version, **ARCH))
        no_decay = {
            n
            for g in param_group_names(ours, weight_decay=0.05, skip_names=PRETRAINING_NO_DECAY_NAMES)
            if g["weight_decay"] == 0
            for n in g["names"]
        }
        assert no_decay == official_no_decay


# ---------------------------------------------------------------- the same math, without the snapshot


def test_the_encoder_is_the_classifier_skeleton_with_masked_tokens_replaced():
    torch.manual_seed(0)
    model = SimMIM(MaskedSwinEncoder(ape=True, **ARCH)).eval()
    classifier = SwinTransformer(num_classes=0, ape=True, **ARCH).eval()
    encoder_keys = [k.removeprefix("encoder.") for k in model.state_dict() if k.startswith("encoder.")]
    assert sorted(encoder_keys) == sorted([*classifier.state_dict(), "mask_token"])
    classifier.load_state_dict({k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"})
    images, masks = torch.randn(2, 3, 64, 64), _masks(2)
    with torch.no_grad():
        stages = classifier.forward_stages(images)
        assert torch.equal(
            model.encoder(images, torch.zeros_like(masks)), classifier.norm(stages[-1]).permute(0, 3, 1, 2)
        )
        # masked tokens are the mask token: the patches under them do not matter
        hidden = model.pixel_mask(masks).bool().expand(-1, 3, -1, -1)
        changed = images.masked_fill(hidden, 7.0)
        assert torch.allclose(model.encoder(images, masks), model.encoder(changed, masks), atol=1e-6)
    state = model.state_dict()
    assert state["encoder.mask_token"].shape == (1, 1, 24)
    assert state["decoder.0.weight"].shape == (32 * 32 * 3, 192, 1, 1) and state["decoder.0.bias"].shape == (
        3072,
    )


def test_loss_is_the_l1_over_masked_pixels_divided_by_the_channels():
    torch.manual_seed(1)
    model = SimMIM(MaskedSwinEncoder(version=2, **ARCH)).eval()
    images, masks = torch.randn(2, 3, 64, 64), _masks(2)
    with torch.no_grad():
        features = model.encoder(images, masks)  # (2, 192, 2, 2)
        pixels = F.pixel_shuffle(F.conv2d(features, model.decoder[0].weight, model.decoder[0].bias), 32)
        hidden = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].float()  # (2, 1, 64, 64)
        expected = ((images - pixels).abs() * hidden).sum() / (hidden.sum() + 1e-5) / 3
        assert torch.allclose(model(images, masks), expected, rtol=1e-6)
        assert hidden.sum() == 2 * 3 * 32 * 32  # ceil(4 x 0.6) = 3 of the 4 mask patches, all channels


def test_normalised_target_standardises_each_pixel_by_its_window():
    images = torch.randn(1, 2, 9, 11, dtype=torch.float64)
    p = 5
    padded = F.pad(images, (2, 2, 2, 2), value=float("nan"))
    windows = padded.unfold(2, p, 1).unfold(3, p, 1).flatten(-2)  # (1, 2, 9, 11, 25), NaN outside the image
    valid = ~windows.isnan()
    mean = windows.nansum(-1) / valid.sum(-1)
    var = ((windows - mean[..., None]).nan_to_num() ** 2 * valid).sum(-1) / (valid.sum(-1) - 1)
    got_mean, got_var = local_statistics(images, p)
    assert torch.allclose(got_mean, mean) and torch.allclose(got_var, var)
    assert torch.allclose(norm_targets(images, p), (images - mean) / (var + 1e-6).sqrt())


def test_state_dict_round_trip_and_official_buffers_are_dropped(tmp_path):
    torch.manual_seed(2)
    model = SimMIM(MaskedSwinEncoder(version=2, **ARCH), norm_target=47)
    state = dict(model.state_dict())
    block = model.encoder.layers[0].blocks[1]
    state["encoder.layers.0.blocks.1.attn_mask"] = block.attn_mask  # what official files also hold
    state["encoder.layers.0.blocks.1.attn.relative_coords_table"] = block.attn.relative_coords_table
    state = {f"module.{k}": v for k, v in state.items()}  # saved from DDP
    torch.save({"model": state}, tmp_path / "w.pth")
    loaded = create_simmim({**ARCH, "version": 2}, checkpoint=tmp_path / "w.pth", norm_target=47)
    images, masks = torch.randn(2, 3, 64, 64), _masks(2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images, masks), model.eval()(images, masks))
    assert set(simmim_state_dict({"model": state})) == set(model.state_dict())


def test_create_simmim_from_a_variant_name_builds_the_official_pretraining_model():
    model = create_simmim("swinv2_base_patch4_window12_192_22k", norm_target=47)
    assert (model.encoder.embed_dim, model.encoder.window_size, model.norm_target) == (128, 12, 47)
    assert model.decoder[0].in_channels == 1024 and model.version == 2


def test_bad_input_is_a_one_line_error(tmp_path):
    classifier = SwinTransformer(num_classes=10, **ARCH)
    torch.save({"model": classifier.state_dict()}, tmp_path / "cls.pth")
    with pytest.raises(CheckpointError, match=r"holds classifier weights, not SimMIM's .*create_model$"):
        create_simmim(ARCH, checkpoint=tmp_path / "cls.pth")
    with pytest.raises(ConfigError, match="create_simmim needs a variant name or architecture fields"):
        create_simmim()
    with pytest.raises(ConfigError, match=r"^unknown model 'swin_tinny.*did you mean"):
        create_simmim("swin_tinny_patch4_window7_224")
    model = create_simmim(ARCH)
    with pytest.raises(
        ValueError, match=r"the mask must be \(B, H/4, W/4\) = \(2, 16, 16\) .*got \(2, 8, 8\)"
    ):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="norm_target must be None or an odd patch size >= 3, got 48"):
        create_simmim(ARCH, norm_target=48)
    micro = ["task=simmim", "data.img_size=64", "model.window_size=4"]
    for overrides, message in [
        (["simmim.mask_ratio=1.0"], "simmim.mask_ratio must be in (0, 1), got 1.0"),
        (["simmim.mask_ratio=0"], "simmim.mask_ratio must be in (0, 1), got 0"),
        (["simmim.mask_patch_size=24"], "simmim.mask_patch_size=24 must divide data.img_size=64"),
        (
            ["simmim.mask_patch_size=34", "data.img_size=68"],
            "task simmim needs data.img_size a multiple of 32",
        ),
        (["simmim.norm_target=46"], "simmim.norm_target must be null or odd and >= 3"),
        (
            ["model.depths=[2,2,6]", "model.num_heads=[3,6,12]"],
            "task simmim decodes from stride 32 (official)",
        ),
        (["model.pretrained=w.pth"], "task simmim starts from random weights; unset model.pretrained"),
        (
            ["task=simmmim"],
            "task must be one of 'classification', 'simmim', got 'simmmim'; did you mean 'simmim'?",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [*micro, *overrides])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------- the recipes under the official names

# recipe -> (version, window, img, drop path, epochs, warmup, base lr, warmup lr, min lr, layer decay, schedule,
# norm target); official config.py defaults where its yaml says nothing (MIN_LR 5e-6, LAYER_DECAY 1, cosine)
SIMMIM_RECIPES = {
    "simmim_pretrain__swin_base__img192_window6__800ep": (1, 6, 192, 0.0, 800, 10, 1e-4, 5e-7, 5e-6, 1.0, "multistep", None),
    "simmim_pretrain__swinv2_base__img192_window12__800ep": (2, 12, 192, 0.1, 800, 10, 1e-4, 5e-7, 5e-6, 1.0, "multistep", 47),
    "simmim_finetune__swin_base__img224_window7__800ep": (1, 7, 224, 0.1, 100, 20, 1.25e-3, 2.5e-7, 2.5e-7, 0.8, "cosine", None),
    "simmim_finetune__swinv2_base__img224_window14__800ep": (2, 14, 224, 0.1, 100, 20, 1.25e-3, 2.5e-7, 2.5e-7, 0.75, "cosine", None),
}  # fmt: skip


def _recipe(name: str):
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "simmim" / f"{name}.yaml")


@pytest.mark.parametrize("name", SIMMIM_RECIPES)
def test_simmim_recipes_hold_the_official_numbers(name):
    version, window, img, drop_path, epochs, warmup, lr, warmup_lr, min_lr, layer_decay, schedule, norm = (
        SIMMIM_RECIPES[name]
    )
    cfg = _recipe(name)
    m, t, s = cfg.model, cfg.train, cfg.simmim
    assert (m.embed_dim, m.depths, m.num_heads, m.patch_size) == (128, [2, 2, 18, 2], [4, 8, 16, 32], 4)
    assert (m.version, m.window_size, cfg.data.img_size, m.drop_path_rate) == (
        version,
        window,
        img,
        drop_path,
    )
    assert (t.epochs, t.warmup_epochs, t.base_lr, t.warmup_lr, t.min_lr) == (
        epochs,
        warmup,
        lr,
        warmup_lr,
        min_lr,
    )
    assert (t.layer_decay, t.lr_schedule, t.weight_decay, t.clip_grad, t.lr_base_batch) == (
        layer_decay, schedule, 0.05, 5.0, 512
    )  # fmt: skip
    assert (cfg.data.batch_size, cfg.save_freq, cfg.output) == (128, 5, f"output/{name}")
    if "pretrain" in name:
        assert cfg.task == "simmim" and (t.lr_milestones, t.lr_decay_rate) == ([700], 0.1)
        assert (s.mask_patch_size, s.mask_ratio, s.norm_target) == (32, 0.6, norm)
    else:
        assert cfg.task == "classification" and m.pretrained_required and m.num_classes == 1000
        assert m.pretrained_window_sizes == ([12, 12, 12, 6] if version == 2 else None)
        assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.reprob, cfg.eval.crop_pct) == (0.8, 1.0, 0.25, 0.875)


@pytest.mark.parametrize("name", SIMMIM_RECIPES)
def test_simmim_recipes_match_the_official_yaml(name):
    yaml = pytest.importorskip("yaml")
    official = yaml.safe_load(official_source(f"configs/simmim/{name}.yaml"))
    cfg = _recipe(name)
    model, train, data = official["MODEL"], official["TRAIN"], official["DATA"]
    arch = model["SWIN" if model["TYPE"] == "swin" else "SWINV2"]
    assert (cfg.model.version, cfg.model.embed_dim, cfg.model.depths, cfg.model.num_heads) == (
        1 if model["TYPE"] == "swin" else 2, arch["EMBED_DIM"], arch["DEPTHS"], arch["NUM_HEADS"]
    )  # fmt: skip
    assert (cfg.model.window_size, cfg.model.drop_path_rate, cfg.data.img_size) == (
        arch["WINDOW_SIZE"], model["DROP_PATH_RATE"], data["IMG_SIZE"]
    )  # fmt: skip
    assert cfg.model.pretrained_window_sizes == arch.get("PRETRAINED_WINDOW_SIZES")
    t = cfg.train
    assert (t.epochs, t.warmup_epochs, t.base_lr, t.warmup_lr, t.weight_decay) == (
        train["EPOCHS"], train["WARMUP_EPOCHS"], float(train["BASE_LR"]), float(train["WARMUP_LR"]), train["WEIGHT_DECAY"]
    )  # fmt: skip
    assert t.min_lr == float(train.get("MIN_LR", 5e-6)) and t.layer_decay == train.get("LAYER_DECAY", 1.0)
    scheduler = train.get("LR_SCHEDULER", {"NAME": "cosine"})
    assert t.lr_schedule == scheduler["NAME"] and t.lr_milestones == scheduler.get("MULTISTEPS", [])
    assert t.lr_decay_rate == scheduler.get("GAMMA", 0.1) and cfg.save_freq == official["SAVE_FREQ"]
    if "MASK_PATCH_SIZE" in data:
        assert (cfg.simmim.mask_patch_size, cfg.simmim.mask_ratio) == (
            data["MASK_PATCH_SIZE"],
            data["MASK_RATIO"],
        )
        target = model.get("SIMMIM", {}).get("NORM_TARGET", {"ENABLE": False})
        assert cfg.simmim.norm_target == (target["PATCH_SIZE"] if target["ENABLE"] else None)


# ---------------------------------------------------------------- validation: loss over the set, fixed masks


def test_validation_loss_is_the_official_loss_over_the_whole_set_in_any_batches():
    from swin_train.device import resolve_amp
    from swin_train.reconstruction import reconstruction_loss

    torch.manual_seed(3)
    model = SimMIM(MaskedSwinEncoder(**ARCH), norm_target=47).eval()
    images, masks = torch.randn(5, 3, 64, 64), _masks(5)
    with torch.no_grad():
        whole = model(images, masks).item()  # one batch: the official loss
    amp = resolve_amp("none", torch.device("cpu"))
    left_out = (
        torch.randn(1, 3, 64, 64),
        torch.zeros(1, 16, 16, dtype=torch.uint8),
    )  # a file that did not decode
    batches = [
        (images[:2], masks[:2]),
        (torch.cat([images[2:], left_out[0]]), torch.cat([masks[2:], left_out[1]])),
    ]
    numbers, kept = reconstruction_loss(model, batches, device=torch.device("cpu"), amp=amp, keep=3)
    assert numbers["num_samples"] == 5 and numbers["num_skipped"] == 1
    assert numbers["loss"] == pytest.approx(whole, rel=1e-6)
    assert torch.equal(kept[0], images[:3]) and torch.equal(kept[1], masks[:3])  # the first 3 counted


def test_validation_masks_are_fixed_by_the_image_and_batches_drop_labels():
    from swin_train.data.folder import SKIPPED_LABEL
    from swin_train.data.simmim import FixedMaskTransform, masked_batch

    transform = FixedMaskTransform(lambda image: image, MaskGenerator(64, 16, 4, 0.6))
    a, b = (
        torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
        torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
    )
    (_, mask_a), (_, again), (_, mask_b) = transform(a), transform(a.clone()), transform(b)
    assert torch.equal(mask_a, again) and not torch.equal(mask_a, mask_b) and mask_a.sum() == 10 * 16
    images, masks = masked_batch([((a, mask_a), -2), ((b, mask_b), SKIPPED_LABEL)])
    assert torch.equal(images, torch.stack([a, b])) and torch.equal(masks[0], mask_a) and masks[1].sum() == 0
