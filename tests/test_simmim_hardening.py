"""SimMIM pre-training as a new user meets it: settings that would train on nothing or on NaN, models that
cannot decode, resumes that change what the loss measures, pictures of files that did not decode, and bad
paths named by the setting that holds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import photo_jpegs, run_cli
from test_train import _records

from swin_train.config import load_config
from swin_train.errors import ConfigError
from swin_train.models.simmim import MaskedSwinEncoder, SimMIM, local_statistics

# A micro encoder of stride 32 (patch 8, three stages) at 64 px
ARCH = dict(patch_size=8, embed_dim=24, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=4, img_size=64)
MICRO = [
    "task=simmim",
    "model.patch_size=8",
    "model.depths=[2,2,2]",
    "model.num_heads=[2,2,4]",
    "model.window_size=4",
    "data.img_size=64",
    "simmim.mask_patch_size=16",
]
# MICRO as a run: 8 photographs in batches of 4, one epoch, no pictures
RUN = [
    *MICRO,
    "model.embed_dim=24",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "train.lr_base_batch=4",
    "simmim.pictures=0",
    "amp=none",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 photographs (JPEGs, 300-500 px) in one flat folder."""
    root = tmp_path_factory.mktemp("photos")
    for i, data in enumerate(photo_jpegs(8, seed=7)):
        (root / f"{i}.jpg").write_bytes(data)
    return root


def test_a_normalised_target_over_one_pixel_is_refused_rather_than_training_on_nan():
    # a 1 x 1 window has one pixel: its unbiased variance is 0/0, so every target was NaN and every step skipped
    with pytest.raises(ConfigError, match=r"simmim.norm_target must be null or odd and >= 3 .*got 1$"):
        load_config(None, [*MICRO, "simmim.norm_target=1"])
    with pytest.raises(ValueError, match="norm_target must be None or an odd patch size >= 3, got 1"):
        SimMIM(MaskedSwinEncoder(**ARCH), norm_target=1)
    with pytest.raises(ValueError, match="must be odd and >= 3, got 1"):
        local_statistics(torch.rand(1, 3, 8, 8), 1)
    mean, var = local_statistics(torch.rand(1, 3, 8, 8), 3)  # the smallest window that has a variance
    assert torch.isfinite(var).all() and (var > 0).all()


def test_simmim_refuses_an_encoder_whose_stride_is_not_the_decoders():
    # patch 4 and three stages is stride 16: the decoder's pixel shuffle by 32 made images twice the size and
    # the loss failed only in forward, on a broadcast
    encoder = MaskedSwinEncoder(**{**ARCH, "patch_size": 4})
    with pytest.raises(ValueError, match=r"SimMIM decodes from stride 32, but .* is stride 16; use patch 4"):
        SimMIM(encoder)


def test_a_mask_ratio_that_masks_every_patch_is_refused_like_a_ratio_of_one():
    # 16 mask patches at 64 px: ceil(16 x 0.99) = 16, so 0.99 hid the whole image as 1.0 would
    with pytest.raises(ConfigError) as e:
        load_config(None, [*MICRO, "simmim.mask_ratio=0.99"])
    assert "simmim.mask_ratio=0.99 masks all 16 mask patches of a 64 x 64 image" in str(e.value)
    assert "use at most 0.9375" in str(e.value) and "\n" not in str(e.value)
    assert load_config(None, [*MICRO, "simmim.mask_ratio=0.9375"]).simmim.mask_ratio == 0.9375  # 15 of 16
    with pytest.raises(ConfigError, match="mask_patch_size=64 makes the 64 x 64 image one mask patch: every"):
        load_config(None, [*MICRO, "simmim.mask_patch_size=64"])
    smaller = load_config(None, [*MICRO, "simmim.mask_ratio=0.98", "simmim.mask_patch_size=8"])  # 63 of 64
    assert smaller.simmim.mask_ratio == 0.98


def test_a_resume_that_changes_what_the_loss_measures_starts_a_new_best(photos, tmp_path):
    out = tmp_path / "run"
    first = run_cli("train", "--data-path", photos, "--output", out, *RUN, "simmim.norm_target=15")
    assert first.returncode == 0, first.stderr[-3000:]
    # the normalised target's loss is the lower one here: kept as best, no plain-target epoch would beat it
    resumed = run_cli("train", "--data-path", photos, "--output", out, *RUN, "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = _records(out)
    assert before["val_loss"] < after["val_loss"]  # the two losses are not comparable
    assert after["best_loss"] == after["val_loss"]
    assert torch.load(out / "best.pth", weights_only=True)["train_state"]["epoch"] == 2
    logged = resumed.stdout + resumed.stderr
    assert "simmim.norm_target 15 -> None since " in logged
    assert f"so best.pth (loss {before['val_loss']:.4f}, epoch 1) is not compared with it" in logged


def test_a_bad_folder_is_one_line_that_names_the_setting_holding_it_and_writes_nothing(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, message in [
        (
            ["--data-path", photos / "0.jpg"],
            f"data path {photos / '0.jpg'} does not exist or is not a folder; ",
        ),
        ([], "no data path: pass --data-path DIR (a folder of images at any depth, "),
        (
            ["--data-path", photos, f"data.val_path={tmp_path / 'nope'}"],
            f"data.val_path {tmp_path / 'nope'} does ",
        ),
        (
            ["--data-path", photos, f"data.val_path={tmp_path / 'empty'}"],
            f"data.val_path {tmp_path / 'empty'} holds ",
        ),
    ]:
        done = run_cli("train", "--output", tmp_path / "run", *args, *RUN)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = done.stderr.strip().splitlines()
        assert message in line
        assert "train/ and val/" not in line.split(";")[-1]  # a folder of images does for pre-training
        assert not (tmp_path / "run").exists()


def test_the_picture_shows_the_first_images_that_decoded_not_the_black_placeholders_of_those_left_out():
    from swin_train.data.simmim import MaskGenerator
    from swin_train.device import resolve_amp
    from swin_train.reconstruction import reconstruction_loss

    torch.manual_seed(0)
    model = SimMIM(MaskedSwinEncoder(**ARCH)).eval()
    images = torch.randn(5, 3, 64, 64)
    masks = torch.stack([MaskGenerator(64, 16, 8, 0.6)() for _ in range(5)])
    masks[:2] = 0  # the first two files did not decode (data.skip_bad_images): placeholders, empty masks
    batches = [(images[:3], masks[:3]), (images[3:], masks[3:])]
    amp = resolve_amp("none", torch.device("cpu"))
    numbers, (kept_images, kept_masks) = reconstruction_loss(
        model, batches, device=torch.device("cpu"), amp=amp, keep=2
    )
    assert (numbers["num_samples"], numbers["num_skipped"]) == (3, 2)
    assert torch.equal(kept_images, images[2:4]) and torch.equal(kept_masks, masks[2:4])  # across batches


def test_aug_settings_a_pretraining_run_ignores_are_named_in_a_warning(caplog):
    from swin_train.data.pretraining import warn_if_aug_set

    with caplog.at_level("WARNING", logger="swin_train"):
        warn_if_aug_set(load_config(None, MICRO))  # aug as it comes: nothing to say
        assert not caplog.records
        warn_if_aug_set(load_config(None, [*MICRO, "aug.color_jitter=0.2", "aug.mixup=0"]))
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "aug.color_jitter=0.2, aug.mixup=0.0 ignored: task simmim uses the "
    )


def test_the_readme_python_example_of_pretraining_runs_and_gives_the_official_loss():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Pre-train without labels (SimMIM)") :]
    example = section[section.index("```python\n") + len("```python\n") :]
    example = example[: example.index("```")]
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    model, masks, loss = scope["model"], scope["masks"], scope["loss"]
    assert masks.mask_count == 30 and masks().shape == (
        56,
        56,
    )  # ceil(0.6 x 7 x 7) patches, at the patch grid
    assert (model.encoder.window_size, model.encoder.embed_dim) == (7, 128)
    assert loss.shape == () and 0.5 < loss.item() < 1.5  # an untrained model's L1 on unit-variance noise


def test_a_normalised_target_picture_shows_what_the_decoder_output_not_the_hidden_pixels_blur():
    from swin_train.data.simmim import MaskGenerator
    from swin_train.device import resolve_amp
    from swin_train.reconstruction import reconstruction_picture

    torch.manual_seed(0)
    model = SimMIM(MaskedSwinEncoder(**ARCH), norm_target=15).eval()
    torch.nn.init.zeros_(model.decoder[0].weight)  # the decoder says 0 everywhere: "the window's mean"
    torch.nn.init.zeros_(model.decoder[0].bias)
    images = torch.randn(2, 3, 64, 64).cumsum(-1) / 8  # smooth, so that local means vary across the image
    masks = torch.stack([MaskGenerator(64, 16, 8, 0.6)() for _ in range(2)])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    picture = reconstruction_picture(
        model, images, masks, mean, std, resolve_amp("none", torch.device("cpu"))
    )
    hidden = model.pixel_mask(masks)[:, 0].bool()  # (B, 64, 64)
    for row in range(2):
        y, x = 2 + row * 66, 2 + 2 * 66  # the reconstruction column
        painted = picture[:, y : y + 64, x : x + 64][:, hidden[row]]  # (3, hidden pixels)
        # 0 in the target's units is the mean colour: nothing of the hidden pixels shows through
        expected = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8)[:, None]
        assert torch.equal(painted, expected.expand_as(painted))
        original = picture[:, y : y + 64, 2 : 2 + 64].float()
        assert original.std() > 20  # the target itself, standardised per window: contrast, not a flat picture


def test_data_val_path_is_the_val_set_of_a_root_with_train_and_val_too(photos, tmp_path):
    from swin_train.data.pretraining import build_pretraining_data
    from swin_train.distributed import DistEnv

    root = tmp_path / "root"
    for split, names in (("train", ["0", "1", "2", "3"]), ("val", ["4", "5"])):
        (root / split / "cls").mkdir(parents=True)
        for name in names:
            (root / split / "cls" / f"{name}.jpg").write_bytes((photos / f"{name}.jpg").read_bytes())
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for name in ("6", "7"):  # another val set of 3 images
        (held_out / f"{name}.jpg").write_bytes((photos / f"{name}.jpg").read_bytes())
    (held_out / "8.jpg").write_bytes((photos / "7.jpg").read_bytes())
    cfg = load_config(None, [*RUN, f"data.data_path={root}"])
    data = build_pretraining_data(cfg, DistEnv())
    assert (data.num_train, data.num_val) == (4, 2)  # root/val
    cfg = load_config(None, [*RUN, f"data.data_path={root}", f"data.val_path={held_out}"])
    data = build_pretraining_data(cfg, DistEnv())
    assert (data.num_train, data.num_val) == (4, 3)  # the val folder given, not root/val
    assert [p for p, _ in data.val_loader.dataset.samples] == [str(held_out / f"{n}.jpg") for n in "678"]
