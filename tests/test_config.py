"""Config system: inheritance, overrides, error messages, shipped recipes, round trips."""

from __future__ import annotations

import glob
import math
import os
import re
import textwrap

import pytest
import torch
import yaml

from swin_train.config import (
    Config,
    ModelConfig,
    check_config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from swin_train.errors import ConfigError
from swin_train.models.swin import SwinTransformer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RECIPES = sorted(glob.glob(os.path.join(CONFIGS, "[!_]*.yaml")))
PARTIALS = sorted(glob.glob(os.path.join(CONFIGS, "_*.yaml")))

# A micro architecture that validates: 16x16 tokens, stages at 16 and 8, windows of 4.
MICRO_YAML = """
model: {patch_size: 2, embed_dim: 16, depths: [1, 1], num_heads: [2, 4], window_size: 4, num_classes: 3}
data: {img_size: 32}
"""


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    """The one-line message of the ConfigError raised by fn(*args, **kwargs)."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def override_error(*overrides: str) -> str:
    return error_of(load_config, None, list(overrides))


# ---------------------------------------------------------------------------------------------------
# Defaults and architecture resolution


def test_defaults_resolve_to_swin_t_and_model_kwargs_are_exact():
    cfg = load_config(None)
    assert cfg.model.depths == [2, 2, 6, 2] and cfg.model.num_heads == [3, 6, 12, 24]
    assert (cfg.model.patch_size, cfg.model.in_chans, cfg.model.embed_dim, cfg.model.window_size) == (
        4,
        3,
        96,
        7,
    )
    assert cfg.model_kwargs() == dict(
        img_size=224,
        patch_size=4,
        in_chans=3,
        num_classes=1000,
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        version=1,
        pretrained_window_sizes=None,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        ape=False,
        patch_norm=True,
        grad_checkpointing=False,
        attention="auto",
    )
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    assert cfg.amp == "auto" and cfg.eval.batch_size is None and cfg.train.clip_grad == 5.0


def test_name_fills_only_unset_architecture_fields():
    cfg = load_config(None, ["model.name=swin_base_patch4_window12_384", "data.img_size=384"])
    assert (cfg.model.embed_dim, cfg.model.window_size, cfg.model.depths) == (128, 12, [2, 2, 18, 2])
    assert cfg.model.num_heads == [4, 8, 16, 32] and cfg.model.in_chans == 3
    cfg = load_config(None, ["model.name=swin_base_patch4_window7_224", "model.depths=[2,2,2,2]"])
    assert cfg.model.depths == [2, 2, 2, 2] and cfg.model.embed_dim == 128  # explicit value wins


def test_validate_fills_and_type_checks_a_config_built_in_python():
    cfg = Config(model=ModelConfig(name="swin_small_patch4_window7_224"))
    assert Config().model_kwargs()["depths"] == [2, 2, 6, 2]  # model_kwargs resolves without mutating
    assert check_config(cfg) is cfg and cfg.model.depths == [2, 2, 18, 2]
    cfg.train.base_lr = 1  # ints become floats
    assert isinstance(check_config(cfg).train.base_lr, float)
    cfg.train.epochs = "ten"
    assert error_of(check_config, cfg) == "train.epochs must be an int, got str 'ten'"


# ---------------------------------------------------------------------------------------------------
# Inheritance, CLI shortcuts, overrides


def test_base_inheritance_deep_merges_sections(tmp_path):
    write(
        tmp_path,
        "root.yaml",
        """
        train: {epochs: 100, warmup_epochs: 5, base_lr: 1.0e-3, betas: [0.8, 0.9]}
        aug: {mixup: 0.5, cutmix: 0.5}
        seed: 7
        """,
    )
    write(
        tmp_path,
        "sub/mid.yaml",
        """
        _base_: ../root.yaml
        train: {epochs: 50}
        aug: {mixup: 0.2}
        """,
    )
    child = write(
        tmp_path,
        "sub/child.yaml",
        """
        _base_: mid.yaml
        train: {betas: [0.7]}
        aug: {auto_augment: null}
        """,
    )
    # betas [0.7] is replaced wholesale (lists do not merge) and then rejected for its length
    assert "train.betas must be two numbers" in error_of(load_config, child)
    cfg = load_config(child, ["train.betas=[0.85,0.95]"])
    assert cfg.train.epochs == 50  # mid overrides root
    assert cfg.train.warmup_epochs == 5 and cfg.train.base_lr == 1e-3  # root keys survive the merge
    assert cfg.train.betas == [0.85, 0.95]
    assert cfg.aug.mixup == 0.2 and cfg.aug.cutmix == 0.5 and cfg.aug.auto_augment is None
    assert cfg.seed == 7 and cfg.train.min_lr == 5e-6  # untouched keys keep root / defaults


def test_base_list_merges_in_order(tmp_path):
    write(tmp_path, "a.yaml", "train: {epochs: 10, warmup_epochs: 1}\n")
    write(tmp_path, "b.yaml", "train: {epochs: 20}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    assert (cfg.train.epochs, cfg.train.warmup_epochs) == (20, 1)


def test_cli_shortcuts_then_overrides(tmp_path):
    path = write(tmp_path, "x.yaml", "data: {batch_size: 32, data_path: /from/yaml}\noutput: out/yaml\n")
    cfg = load_config(path)
    assert (cfg.data.batch_size, cfg.data.data_path, cfg.output) == (32, "/from/yaml", "out/yaml")
    cfg = load_config(path, data_path="/cli", output="out/cli", batch_size=64)
    assert (cfg.data.batch_size, cfg.data.data_path, cfg.output) == (64, "/cli", "out/cli")
    cfg = load_config(path, ["data.batch_size=16", "output=out/ov"], batch_size=64, data_path=None)
    assert (cfg.data.batch_size, cfg.data.data_path, cfg.output) == (16, "/from/yaml", "out/ov")
    cfg = load_config(path, ["train.epochs=10", "train.epochs=30"])  # later overrides win
    assert cfg.train.epochs == 30
    with pytest.raises(TypeError, match="epochs"):
        load_config(path, epochs=3)


def test_override_values_are_yaml():
    cfg = load_config(
        None,
        [
            "model.depths=[2, 2, 2]",
            "model.num_heads=[3,6,12]",
            "aug.auto_augment=null",
            "train.base_lr=1e-3",  # YAML 1.1 would read this as a string
            "train.clip_grad=null",
            "aug={mixup: 0, cutmix: 0.5}",  # a mapping merges into the section
            "output=2024",  # text fields keep the text
            "data.data_path=on",
            "model.qkv_bias=false",
        ],
    )
    assert cfg.model.depths == [2, 2, 2] and cfg.model.num_heads == [3, 6, 12]
    assert cfg.aug.auto_augment is None and cfg.train.clip_grad is None
    assert cfg.train.base_lr == 1e-3 and isinstance(cfg.train.base_lr, float)
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.reprob) == (0.0, 0.5, 0.25)
    assert cfg.output == "2024" and cfg.data.data_path == "on" and cfg.model.qkv_bias is False


def test_exponent_floats_without_dot_in_files(tmp_path):
    cfg = load_config(write(tmp_path, "x.yaml", "train: {base_lr: 5e-4, min_lr: 1E-6, eps: 1e-8}\n"))
    assert (cfg.train.base_lr, cfg.train.min_lr, cfg.train.eps) == (5e-4, 1e-6, 1e-8)


# ---------------------------------------------------------------------------------------------------
# File and syntax errors


def test_missing_file_and_missing_base(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert error_of(load_config, missing) == f"config file not found: '{missing}'"
    path = write(tmp_path, "x.yaml", "seed: 1\n_base_: gone.yaml\n")
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}:2: _base_ file not found:") and "gone.yaml" in msg


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "train:\n  epochs: 10\n  betas: [0.9, 0.99\nseed: 1\n")
    msg = error_of(load_config, path)
    assert re.match(rf"{re.escape(path)}:4: invalid YAML: ", msg), msg


def test_duplicate_key_and_top_level_not_mapping(tmp_path):
    path = write(tmp_path, "dup.yaml", "train:\n  epochs: 10\n  epochs: 20\n")
    assert error_of(load_config, path) == f"{path}:3: duplicate key 'train.epochs'"
    path = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    assert error_of(load_config, path) == f"{path}: the top level must be a mapping of sections, got list"
    assert load_config(write(tmp_path, "empty.yaml", "# nothing\n")) == load_config(None)


def test_base_cycle_is_an_error(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    assert "_base_ inheritance cycle: a.yaml -> b.yaml -> a.yaml" in error_of(load_config, a)
    me = write(tmp_path, "me.yaml", "_base_: me.yaml\n")
    assert "cycle: me.yaml -> me.yaml" in error_of(load_config, me)


def test_bad_override_syntax():
    assert (
        override_error("train.epochs")
        == "override 'train.epochs' must look like key=value, e.g. train.epochs=10"
    )
    assert override_error("=3").startswith("override '=3' must look like key=value")
    assert override_error("model.depths=[2,2").startswith(
        "override 'model.depths=[2,2': cannot parse the value"
    )


# ---------------------------------------------------------------------------------------------------
# Key and type errors


def test_unknown_keys_suggest_the_closest(tmp_path):
    path = write(tmp_path, "x.yaml", "train:\n  warmup_epochs: 5\n  epoch: 10\n")
    assert error_of(load_config, path) == f"{path}:3: unknown key 'train.epoch'; did you mean 'train.epochs'?"
    path = write(tmp_path, "y.yaml", "epochs: 10\n")
    assert error_of(load_config, path) == f"{path}:1: unknown key 'epochs'; did you mean 'train.epochs'?"
    assert override_error("trian.epochs=3") == (
        "override 'trian.epochs=3': unknown key 'trian.epochs'; did you mean 'train.epochs'?"
    )
    assert "unknown key 'model.zzz'; known keys in 'model': name, patch_size" in override_error("model.zzz=1")
    assert (
        override_error("trian.zzz=1")
        == "override 'trian.zzz=1': unknown key 'trian.zzz'; did you mean 'train'?"
    )
    assert error_of(config_from_dict, {"data": {"img_sz": 224}}) == (
        "unknown key 'data.img_sz'; did you mean 'data.img_size'?"
    )
    path = write(tmp_path, "z.yaml", "train:\n  _base_: a.yaml\n")
    assert "unknown key 'train._base_'" in error_of(load_config, path)


def test_wrong_types(tmp_path):
    path = write(tmp_path, "x.yaml", 'seed: 1\ntrain:\n  epochs: "ten"\n')
    assert error_of(load_config, path) == f"{path}:3: train.epochs must be an int, got str 'ten'"
    assert override_error("train.epochs=true").endswith("train.epochs must be an int, got bool True")
    assert override_error("train.epochs=10.0").endswith("train.epochs must be an int, got float 10.0")
    assert override_error("model.qkv_bias=1").endswith("model.qkv_bias must be a bool, got int 1")
    assert override_error("model.depths=[2,x]").endswith("model.depths[1] must be an int, got str 'x'")
    assert override_error("model.depths=4").endswith("model.depths must be a list of ints or null, got int 4")
    assert override_error("train.clip_grad=[1]").endswith(
        "train.clip_grad must be a float or null, got list [1]"
    )
    assert override_error("data.mean=0.5").endswith("data.mean must be a list of floats, got float 0.5")
    assert override_error("train=5") == "override 'train=5': train must be a mapping of keys, got int 5"
    assert override_error("data.dataset=null").endswith("data.dataset must be a str, got null")
    assert load_config(None, ["train.weight_decay=0"]).train.weight_decay == 0.0  # int accepted for float
    assert error_of(config_from_dict, {"seed": object()}).startswith("seed must be an int, got object")


def test_cli_shortcut_type_error_names_its_origin():
    msg = error_of(load_config, None, batch_size="64")
    assert msg == "command line batch_size='64': data.batch_size must be an int, got str '64'"


# ---------------------------------------------------------------------------------------------------
# Value errors


def test_unknown_model_name_suggests():
    assert override_error("model.name=swin_tiny_patch4_window7_244") == (
        "override 'model.name=swin_tiny_patch4_window7_244': model.name: unknown model "
        "'swin_tiny_patch4_window7_244' (did you mean 'swin_tiny_patch4_window7_224'?)"
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("amp=fp32", "amp must be one of 'auto', 'bf16', 'fp16', 'none', got 'fp32'; did you mean 'none'?"),
        (
            "data.dataset=imagenet",
            "data.dataset must be one of 'imagefolder', 'shapes', 'wds', 'hf', got 'imagenet'",
        ),
        ("train.best_on=emma", "train.best_on must be one of 'raw', 'ema', got 'emma'; did you mean 'ema'?"),
        ("data.interpolation=cubic", "data.interpolation must be one of 'bicubic', 'bilinear'"),
        ("aug.mixup_mode=batches", "aug.mixup_mode must be one of 'batch', 'pair', 'elem', got 'batches'"),
        ("aug.remode=pixels", "aug.remode must be one of 'pixel', 'rand', 'const', got 'pixels'"),
        ("model.attention=flash", "model.attention must be one of 'auto', 'flex', got 'flash'"),
    ],
)
def test_enum_values(override, expected):
    msg = override_error(override)
    assert msg.startswith(f"override '{override}': {expected}"), msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("data.img_size=0", "data.img_size must be >= 1, got 0"),
        ("data.batch_size=-1", "data.batch_size must be >= 1, got -1"),
        ("train.accumulation_steps=0", "train.accumulation_steps must be >= 1, got 0"),
        ("aug.reprob=1.5", "aug.reprob must be in [0, 1], got 1.5"),
        ("aug.mixup_prob=-0.1", "aug.mixup_prob must be in [0, 1], got -0.1"),
        ("model.drop_path_rate=1.0", "model.drop_path_rate must be in [0, 1), got 1.0"),
        ("train.base_lr=.nan", "train.base_lr must be > 0, got nan"),
        ("train.clip_grad=0", "train.clip_grad must be > 0 (use null to disable clipping), got 0.0"),
        ("eval.crop_pct=0", "eval.crop_pct must be in (0, 1], got 0.0"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1 (or null: data.batch_size), got 0"),
        ("model.patch_size=0", "model.patch_size must be >= 1, got 0"),
        ("model.depths=[2,0,6,2]", "model.depths must be a non-empty list of ints >= 1, got [2, 0, 6, 2]"),
        (
            "train.warmup_epochs=301",
            "train.warmup_epochs=301 is not less than train.epochs=300; set train.warmup_epochs to at most 299",
        ),
        ("train.min_lr=1", "train.min_lr=1.0 is larger than train.base_lr=0.0005"),
        ("train.best_on=ema", "train.best_on='ema' needs train.ema=true"),
        (
            "aug.crop_scale=[0.9,0.5]",
            "aug.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got [0.9, 0.5]",
        ),
        ("data.mean=[0.5]", "data.mean has 1 values but model.in_chans=3"),
        ("output=", "output must be a str, got null"),
    ],
)
def test_value_errors(override, expected):
    assert override_error(override) == f"override '{override}': {expected}"


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            "Rand-m9",
            "'Rand' is not a policy: a spec starts with rand (RandAugment), augmix or an AutoAugment",
        ),
        ("random-m9", "a rand spec starts with 'rand-', got 'random'"),
        ("orignal-mstd0.5", "did you mean 'original'?"),
        ("rand-x9", "unknown section 'x9' (sections: m, n, p, mstd, mmax, inc, t<set>)"),
        ("rand-m9x", "section 'm9x': m takes an integer, got '9x'"),
        ("augmix-m3-b2", "section 'b2': b takes 0 or 1, got '2'"),
        ("v0-mstd", "section 'mstd' has no number, so timm ignores it (sections: mstd)"),
        # what timm builds without a word: a section without a number, an unknown set, a clipped magnitude
        ("rand-m9-mstd-inc1", "section 'mstd' has no number, so timm ignores it"),
        ("rand-m9-tfoo", "unknown transform set 'tfoo' (timm would use its default set; known: tweights"),
        ("rand-m15-mstd0.5", "magnitude m15 is above the maximum 10, which timm clips it to; set mmax"),
        ("rand-m9-m7", "section 'm' appears twice"),
        ("rand-m9-p1.5", "p1.5: the probability of each op must be in [0, 1]"),
    ],
)
def test_an_auto_augment_spec_timm_would_reject_or_partly_ignore_is_a_one_line_error(spec, expected):
    msg = override_error(f"aug.auto_augment={spec}")
    assert (
        msg.startswith(f"override 'aug.auto_augment={spec}': aug.auto_augment={spec!r}: ") and expected in msg
    )


@pytest.mark.parametrize(
    "spec",
    [
        "rand-m9-mstd0.5-inc1",
        "rand-m7-n3-mstd1-tweights",
        "rand-m15-mmax20-t3a",
        "original-mstd0.5",
        "v0r",
        "3a",
        "augmix-m5-w4-d2-a1-b1",
        "none",
    ],
)
def test_every_auto_augment_section_timm_applies_is_accepted(spec):
    assert load_config(None, [f"aug.auto_augment={spec}"]).aug.auto_augment == spec


@pytest.mark.parametrize(
    "override, expected",
    [
        ("seed=18446744073709551616", "seed must be in [0, 2**63), got 18446744073709551616"),
        ("seed=-1", "seed must be in [0, 2**63), got -1"),
        (
            "model.in_chans=1",
            "model.in_chans=1: images are read as RGB (grayscale files too); set model.in_chans=3",
        ),
    ],
)
def test_a_seed_torch_cannot_take_and_other_than_3_channels_are_refused(override, expected):
    assert override_error(override) == f"override '{override}': {expected}"
    if override.startswith("seed"):
        assert load_config(None, [f"seed={2**63 - 1}"]).seed == 2**63 - 1  # the largest accepted


def test_warmup_up_to_the_last_epoch_and_ema_best_are_valid():
    cfg = load_config(
        None, ["train.epochs=5", "train.warmup_epochs=4", "train.ema=true", "train.best_on=ema"]
    )
    assert (cfg.train.warmup_epochs, cfg.train.best_on) == (4, "ema")


def test_a_warmup_as_long_as_the_run_names_train_warmup_epochs():
    # the quick start with train.epochs=1 (its warmup is 1 epoch): the schedule's own error named steps only
    assert error_of(load_config, os.path.join(CONFIGS, "quickstart.yaml"), ["train.epochs=1"]) == (
        "override 'train.epochs=1': train.warmup_epochs=1 is not less than train.epochs=1; "
        "set train.warmup_epochs to at most 0"
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["train.lr_schedule=multistpe"],
            "train.lr_schedule must be one of 'cosine', 'linear', 'step', 'multistep', got 'multistpe'; "
            "did you mean 'multistep'?",
        ),
        (
            ["train.optimizer=sdg"],
            "train.optimizer must be one of 'adamw', 'sgd', got 'sdg'; did you mean 'sgd'?",
        ),
        (["train.lr_milestones=[700,300]"], "train.lr_milestones must be increasing epochs, got [700, 300]"),
        (["train.lr_milestones=[30,30]"], "train.lr_milestones must be increasing epochs, got [30, 30]"),
        (
            ["train.lr_schedule=multistep"],
            "train.lr_schedule='multistep' needs train.lr_milestones, epochs from the end of the warmup "
            "(train.warmup_epochs=20) on, got []; e.g. train.lr_milestones=[700]",
        ),
        (["train.lr_schedule=multistep", "train.lr_milestones=[10]"], "train.lr_schedule='multistep' needs"),
        (["train.lr_decay_epochs=0"], "train.lr_decay_epochs must be >= 1, got 0"),
        (["train.lr_decay_rate=0"], "train.lr_decay_rate must be in (0, 1], got 0.0"),
        (["train.momentum=1"], "train.momentum must be in [0, 1), got 1.0"),
        (
            ["train.optimizer=sgd", "train.momentum=0"],
            "train.nesterov=true needs train.momentum > 0; set train.momentum or train.nesterov=false",
        ),
    ],
)
def test_schedule_and_optimizer_errors(overrides, expected):
    msg = override_error(*overrides)
    assert msg.startswith(f"override '{overrides[-1]}': {expected}"), msg


def test_official_schedule_and_optimizer_choices_load():
    cfg = load_config(
        None,
        [
            "train.lr_schedule=multistep",
            "train.lr_milestones=[700]",
            "train.epochs=800",
            "train.warmup_epochs=10",
        ],
    )
    assert (cfg.train.lr_schedule, cfg.train.lr_milestones, cfg.train.lr_decay_rate) == (
        "multistep",
        [700],
        0.1,
    )
    sgd = load_config(None, ["train.optimizer=sgd", "train.momentum=0", "train.nesterov=false"]).train
    assert (sgd.optimizer, sgd.momentum, sgd.nesterov) == ("sgd", 0.0, False)
    # a milestone past the last epoch never applies (a shortened run of a recipe), which is allowed
    assert load_config(None, ["train.lr_schedule=multistep", "train.lr_milestones=[700]"]).train.epochs == 300


# ---------------------------------------------------------------------------------------------------
# Architecture errors


def test_heads_must_match_stages_and_divide_widths():
    assert override_error("model.num_heads=[3,6,12]").endswith(
        "model.num_heads has 3 entries but model.depths has 4 stages; give one head count per stage"
    )
    assert override_error("model.num_heads=[3,6,12,25]").endswith(
        "model.num_heads[3]=25 does not divide stage 3 width 768 (model.embed_dim=96 * 2**3); "
        "use a divisor of 768"
    )


def test_any_img_size_builds_one_int_square_or_height_and_width(tmp_path):
    """Sizes that patches, merges or windows do not tile build (the model pads: docs/design.md); the size
    reaches the model as one int when square, else [H, W]."""
    path = write(tmp_path, "m.yaml", MICRO_YAML)
    assert load_config(path).model_kwargs()["img_size"] == 32
    three_stages = ["model.depths=[1,1,1]", "model.num_heads=[2,4,8]"]
    for size, kwarg in [
        ("33", 33),
        ("36", 36),
        ("[32, 48]", [32, 48]),
        ("[48, 33]", [48, 33]),
        ("[32, 32]", 32),
    ]:
        cfg = load_config(path, [f"data.img_size={size}", *three_stages])
        assert cfg.model_kwargs()["img_size"] == kwarg
    model = SwinTransformer(**load_config(path, ["data.img_size=[32, 48]", *three_stages]).model_kwargs())
    assert model.img_size == (32, 48) and model.stage_resolutions == [(16, 24), (8, 12), (4, 6)]
    for size in ("[32]", "[0, 32]", "[32, 48, 3]"):
        message = f"data.img_size must be [height, width], two ints >= 1, got {size}"
        assert override_error(f"data.img_size={size}").endswith(message)


def test_every_window_builds_and_pads_the_stages_it_does_not_tile():
    # Swin-T at 320: stage 0 is 80x80, padded to 84x84 for windows of 7 (was refused before any size ran)
    with torch.device("meta"):
        model = SwinTransformer(**load_config(None, ["data.img_size=320"]).model_kwargs())
    assert model.layers[0].blocks[1].attn_mask.shape == (12 * 12, 49, 49)
    # stages no larger than the window use one window of their own size: 56, 28 tile into 14; 14 and 7 shrink
    assert load_config(None, ["model.window_size=14"]).model.window_size == 14
    assert load_config(None, ["model.window_size=56"]).model.window_size == 56
    assert load_config(None, ["data.img_size=448"]).data.img_size == 448
    assert load_config(None, ["model.window_size=12"]).model.window_size == 12  # 56 padded to 60
    assert load_config(None, ["model.name=swin_base_patch4_window12_384"]).model.window_size == 12  # at 224


def test_swinv2_is_chosen_by_name_or_version_and_contradictions_are_one_line_errors(tmp_path):
    cfg = load_config(None, ["model.name=swinv2_tiny_patch4_window8_256", "data.img_size=256"])
    assert (cfg.model.version, cfg.model.pretrained_window_sizes, cfg.model.window_size) == (2, None, 8)
    cfg = load_config(None, ["model.version=2", "model.pretrained_window_sizes=[7, 7, 7, 7]"])
    assert cfg.model_kwargs()["version"] == 2 and cfg.model.depths == [
        2,
        2,
        6,
        2,
    ]  # Swin-T's shape, V2 blocks
    assert load_config(None).model.version == 1
    path = write(tmp_path, "v.yaml", "model:\n  name: swin_tiny_patch4_window7_224\n  version: 2\n")
    assert error_of(load_config, path) == (
        f"{path}:3: model.version=2 contradicts model.name 'swin_tiny_patch4_window7_224', a Swin V1 variant; "
        "drop model.version or name a swinv2_ variant"
    )
    assert override_error(
        "model.name=swinv2_tiny_patch4_window8_256", "data.img_size=256", "model.version=1"
    ) == (
        "override 'model.version=1': model.version=1 contradicts model.name 'swinv2_tiny_patch4_window8_256', "
        "a Swin V2 variant; drop model.version or name a swin_ variant"
    )
    path = write(tmp_path, "p.yaml", "model:\n  version: 1\n  pretrained_window_sizes: [12, 12, 12, 6]\n")
    assert error_of(load_config, path).startswith(
        f"{path}:3: model.pretrained_window_sizes is a Swin V2 setting but this model is Swin V1"
    )
    msg = override_error("model.version=2", "model.pretrained_window_sizes=[12, 12, 6]")
    assert msg.startswith(
        "override 'model.pretrained_window_sizes=[12, 12, 6]': model.pretrained_window_sizes has 3"
    )
    assert "give one pre-training window per stage" in msg
    assert "must be 0 (the stage's own window) or windows >= 2" in override_error(
        "model.version=2", "model.pretrained_window_sizes=[12, 12, 1, 6]"
    )
    assert "model.version must be 1 or 2, got 3" in override_error("model.version=3")
    assert override_error("model.pretrained_windows=[12]") == (
        "override 'model.pretrained_windows=[12]': unknown key 'model.pretrained_windows'; "
        "did you mean 'model.pretrained_window_sizes'?"
    )


def test_errors_from_files_name_the_defining_line(tmp_path):
    path = write(
        tmp_path, "x.yaml", "model:\n  name: swin_tiny_patch4_window7_224\n  num_heads: [3, 6, 12, 25]\n"
    )
    assert error_of(load_config, path).startswith(f"{path}:3: model.num_heads[3]=25 does not divide stage 3")
    # a cross-field error names the most recently set of its keys: here the child's epochs
    write(tmp_path, "p.yaml", "train:\n  warmup_epochs: 50\n")
    child = write(tmp_path, "c.yaml", "_base_: p.yaml\ntrain:\n  epochs: 40\n")
    assert error_of(load_config, child) == (
        f"{child}:3: train.warmup_epochs=50 is not less than train.epochs=40; "
        "set train.warmup_epochs to at most 39"
    )


# ---------------------------------------------------------------------------------------------------
# Shipped recipes

# Official schedules (REFERENCE.md): epochs, warmup epochs, base lr, warmup lr, min lr, weight decay.
SCHEDULES = {
    "1k": (300, 20, 5e-4, 5e-7, 5e-6, 0.05),
    "22k": (90, 5, 1.25e-4, 1.25e-7, 1.25e-6, 0.05),
    "finetune": (30, 5, 2e-5, 2e-8, 2e-7, 1e-8),
}
# recipe -> (variant, schedule, drop path); at 384 the window is 12 and eval does not crop.
RECIPE_TABLE = {
    "swin_tiny_patch4_window7_224": ("swin_tiny_patch4_window7_224", "1k", 0.2),
    "swin_small_patch4_window7_224": ("swin_small_patch4_window7_224", "1k", 0.3),
    "swin_base_patch4_window7_224": ("swin_base_patch4_window7_224", "1k", 0.5),
    **{
        f"swin_{s}_patch4_window7_224_22k": (f"swin_{s}_patch4_window7_224", "22k", dp)
        for s, dp in (("tiny", 0.1), ("small", 0.2), ("base", 0.2), ("large", 0.2))
    },
    **{
        f"swin_{s}_patch4_window7_224_22kto1k_finetune": (f"swin_{s}_patch4_window7_224", "finetune", dp)
        for s, dp in (("tiny", 0.1), ("small", 0.2), ("base", 0.2), ("large", 0.2))
    },
    **{
        f"swin_{s}_patch4_window12_384_22kto1k_finetune": (f"swin_{s}_patch4_window12_384", "finetune", 0.2)
        for s in ("base", "large")
    },
    "swin_base_patch4_window12_384_finetune": ("swin_base_patch4_window12_384", "finetune", 0.5),
}
# SwinV2 (the official configs/swinv2/; the recipe is named as the variant): schedule, drop path, image size,
# window, pre-training windows, eval crop. The 22k pre-training differs from Swin V1's in its weight decay, 0.1.
SCHEDULES["22k_v2"] = SCHEDULES["22k"][:-1] + (0.1,)
V2_RECIPE_TABLE = {
    **{
        f"swinv2_{s}_patch4_window{w}_256": ("1k", dp, 256, w, None, 0.875)
        for s, dp in (("tiny", 0.2), ("small", 0.3), ("base", 0.5))
        for w in (8, 16)
    },
    **{
        f"swinv2_{s}_patch4_window12_192_22k": ("22k_v2", 0.2, 192, 12, None, 0.875)
        for s in ("base", "large")
    },
    **{
        f"swinv2_{s}_patch4_window12to{w}_192to{img}_22kto1k_ft": (
            "finetune",
            0.2,
            img,
            w,
            [12, 12, 12, 6],
            crop,
        )
        for s in ("base", "large")
        for w, img, crop in ((16, 256, 0.875), (24, 384, 1.0))
    },
}


def test_every_recipe_is_listed_and_every_partial_is_used():
    names = {os.path.basename(p)[: -len(".yaml")] for p in RECIPES}
    assert names == set(RECIPE_TABLE) | set(V2_RECIPE_TABLE) | {"quickstart"}
    texts = "".join(open(p).read() for p in RECIPES + PARTIALS)
    for partial in PARTIALS:
        assert f"_base_: {os.path.basename(partial)}" in texts, partial


@pytest.mark.parametrize("recipe", RECIPE_TABLE)
def test_official_recipes(recipe):
    variant, schedule, drop_path = RECIPE_TABLE[recipe]
    cfg = load_config(os.path.join(CONFIGS, recipe + ".yaml"))
    m, t, a = cfg.model, cfg.train, cfg.aug
    at_384 = "384" in recipe
    assert (m.name, cfg.data.img_size, m.window_size) == (
        variant,
        384 if at_384 else 224,
        12 if at_384 else 7,
    )
    assert (m.drop_path_rate, m.num_classes) == (drop_path, 21841 if schedule == "22k" else 1000)
    assert cfg.eval.crop_pct == (1.0 if at_384 else 0.875)
    assert (t.epochs, t.warmup_epochs, t.base_lr, t.warmup_lr, t.min_lr, t.weight_decay) == SCHEDULES[
        schedule
    ]
    assert (t.lr_base_batch, t.clip_grad, t.betas, t.eps) == (512, 5.0, [0.9, 0.999], 1e-8)
    assert (cfg.data.batch_size, cfg.data.interpolation, cfg.data.dataset) == (128, "bicubic", "imagefolder")
    assert (a.auto_augment, a.color_jitter, a.reprob, a.remode, a.recount) == (
        "rand-m9-mstd0.5-inc1",
        0.4,
        0.25,
        "pixel",
        1,
    )
    assert (a.mixup, a.cutmix, a.mixup_prob, a.mixup_switch_prob, a.mixup_mode) == (
        0.8,
        1.0,
        1.0,
        0.5,
        "batch",
    )
    assert a.label_smoothing == 0.1 and cfg.output == f"output/{recipe}"


@pytest.mark.parametrize("recipe", V2_RECIPE_TABLE)
def test_official_swinv2_recipes(recipe):
    schedule, drop_path, img_size, window, pretrained_windows, crop_pct = V2_RECIPE_TABLE[recipe]
    cfg = load_config(os.path.join(CONFIGS, recipe + ".yaml"))
    m, t = cfg.model, cfg.train
    assert (m.name, m.version, cfg.data.img_size, m.window_size) == (recipe, 2, img_size, window)
    assert m.pretrained_window_sizes == pretrained_windows and cfg.eval.crop_pct == crop_pct
    assert (m.drop_path_rate, m.num_classes) == (drop_path, 21841 if "22k" in schedule else 1000)
    assert (t.epochs, t.warmup_epochs, t.base_lr, t.warmup_lr, t.min_lr, t.weight_decay) == SCHEDULES[
        schedule
    ]
    assert (t.lr_base_batch, t.clip_grad, cfg.aug.mixup, cfg.aug.label_smoothing) == (512, 5.0, 0.8, 0.1)
    assert cfg.output == f"output/{recipe}"


def test_quickstart_recipe():
    cfg = load_config(os.path.join(CONFIGS, "quickstart.yaml"))
    assert (cfg.data.dataset, cfg.data.data_path, cfg.data.img_size, cfg.model.num_classes) == (
        "shapes",
        None,
        32,
        8,
    )
    assert (cfg.aug.auto_augment, cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.reprob) == (None, 0.0, 0.0, 0.0)
    assert (cfg.amp, cfg.output, cfg.aug.label_smoothing) == ("none", "output/quickstart", 0.1)
    assert cfg.train.epochs < 50 and cfg.train.warmup_epochs < cfg.train.epochs


# Parameter counts from REFERENCE.md (1000 classes); a 21841-class head adds 20841 * (features + 1).
PARAMS_224 = {"tiny": 28_288_354, "small": 49_606_258, "base": 87_768_224, "large": 196_532_476}
PARAMS_384 = {"tiny": 28_338_034, "small": 49_707_778, "base": 87_903_584, "large": 196_735_516}


# One recipe per distinct (size, resolution, head); the others differ from these only in training fields,
# checked in test_official_recipes. (Building all 15 costs ~1 s each, even on the meta device.)
BUILT = [
    "quickstart",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224_22k",
    "swin_base_patch4_window12_384_finetune",
    "swin_large_patch4_window12_384_22kto1k_finetune",
]


@pytest.mark.parametrize("name", BUILT)
def test_recipes_build_the_model(name):
    swin = pytest.importorskip("swin_train.models.swin")
    import torch

    cfg = load_config(os.path.join(CONFIGS, name + ".yaml"))
    if cfg.model.name is None:  # the micro quick-start model: build it for real and run it
        model = swin.SwinTransformer(**cfg.model_kwargs()).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size))
        assert out.shape == (2, cfg.model.num_classes) and torch.isfinite(out).all()
        return
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = swin.SwinTransformer(**cfg.model_kwargs())
    size = cfg.model.name.split("_")[1]
    expected = (PARAMS_384 if cfg.data.img_size == 384 else PARAMS_224)[size]
    expected += (cfg.model.num_classes - 1000) * (cfg.model.embed_dim * 8 + 1)
    assert sum(p.numel() for p in model.parameters()) == expected


# ---------------------------------------------------------------------------------------------------
# Round trips


def _is_plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_is_plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool)


@pytest.mark.parametrize("path", [None, *RECIPES], ids=["defaults", *[os.path.basename(p) for p in RECIPES]])
def test_round_trips(path, tmp_path):
    cfg = load_config(path, ["train.clip_grad=null", "eval.batch_size=64"])
    d = config_to_dict(cfg)
    assert _is_plain(d)
    assert config_from_dict(d) == cfg
    assert config_from_dict(d) is not cfg
    text = dump_config(cfg)
    assert yaml.safe_load(text) == d  # plain YAML, readable without our loader
    assert load_config(write(tmp_path, "dumped.yaml", text)) == cfg


def test_config_from_dict_fills_missing_keys_and_does_not_alias():
    d = {"train": {"epochs": 10, "warmup_epochs": 2}, "model": {"depths": [2, 2, 2, 2]}}
    cfg = config_from_dict(d)
    assert cfg.train.epochs == 10 and cfg.train.base_lr == 5e-4 and cfg.model.embed_dim == 96
    cfg.model.depths.append(2)
    assert d["model"]["depths"] == [2, 2, 2, 2]
    assert config_from_dict({"model": {"depths": (2, 2, 6, 2)}}).model.depths == [2, 2, 6, 2]
    assert error_of(config_from_dict, ["not", "a", "dict"]) == (
        "the config must be a mapping of keys, got list ['not', 'a', 'dict']"
    )


def test_floats_survive_dump_exactly():
    cfg = load_config(None, ["train.base_lr=1.25e-4", "train.eps=1e-8", "train.ema_decay=0.99985"])
    back = yaml.safe_load(dump_config(cfg))["train"]
    assert back["base_lr"] == 1.25e-4 and back["eps"] == 1e-8 and back["ema_decay"] == 0.99985
    assert not math.isnan(back["min_lr"])
