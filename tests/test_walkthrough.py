"""Fixes from a new user's walkthrough (issue #35): what the first commands say must be true and point at the
setting to change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import image_folder

from swin_train import create_model
from swin_train.cli.model import cli as swin_model_cli
from swin_train.cli.train import cli as train_cli
from swin_train.config import load_config
from swin_train.metrics import epoch_line, step_line
from swin_train.models import registry

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("_"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("swin-train: error: "), err
    return err


@pytest.mark.parametrize(
    "name, params",
    [
        ("swinv2_base_patch4_window12_192_22k", 109_280_841),
        ("swinv2_large_patch4_window12_192_22k", 228_772_549),
    ],
)
def test_a_22k_name_alone_has_the_21841_class_head_that_readme_sizes(name, params, capsys):
    assert swin_model_cli(["--model", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == params
    with torch.device("meta"):
        assert create_model(name).num_classes == 21841
        assert create_model(name, num_classes=1000).num_classes == 1000
        assert create_model("swinv2_base_patch4_window16_256").num_classes == 1000
    (row,) = [line for line in (ROOT / "README.md").read_text().splitlines() if "_192_22k`" in line]
    assert "21,841 classes" in row and f"{params / 1e6:.1f}M" in row


def test_every_name_has_a_recipe_but_the_architectures_that_swin_model_help_sets_apart(capsys):
    recipe_names = {load_config(str(path)).model.name for path in RECIPES}
    assert set(registry.variant_names()) - recipe_names == set(registry.ARCHITECTURE_ONLY)
    with pytest.raises(SystemExit):
        swin_model_cli(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    with_recipe, architectures = help_text.split("architecture only")
    assert all(name in architectures and name not in with_recipe for name in registry.ARCHITECTURE_ONLY)
    assert "swin_tiny_patch4_window7_224," in with_recipe


@pytest.mark.parametrize("holds", ["imagefolder", "shards"])
def test_a_data_path_the_quick_start_config_cannot_read_names_data_dataset(tmp_path, capsys, holds):
    data = image_folder(tmp_path / "data")
    if holds == "shards":
        data = tmp_path / "wds"
        data.mkdir()
        (data / "x-train-0000.tar").write_bytes(b"")
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data-path", str(data)]
    assert train_cli([*args, "--output", str(out), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    what = "an ImageFolder root (train/ and val/)" if holds == "imagefolder" else "webdataset shards"
    assert f"data path {data} holds {what}, but data.dataset='shapes' reads the generated shapes set" in err
    assert "set data.dataset=imagefolder" in err and "shapes set; choose another folder" not in err
    assert not out.exists()


def test_an_image_folder_given_as_shards_names_data_dataset_not_the_shard_index(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert (
        train_cli(["--data-path", str(data), "--output", str(out), "data.dataset=wds", "--device", "cpu"])
        == 2
    )
    err = _one_line_error(capsys)
    assert "but data.dataset='wds' reads webdataset shards; set data.dataset=imagefolder" in err
    assert "swin-data index" not in err and not out.exists()


def test_step_lines_count_epochs_from_1_as_the_epoch_lines_do():
    assert step_line(0, 5, 16, 2.0, 1e-3, 1.5, 100.0).startswith("epoch 1 step 5/16: ")
    record = dict(epoch=0, val_topk=5, train_loss=2.0, train_lr=1e-3, train_img_s=1.0, train_epoch_time=1.0)
    record.update(val_top1=0.5, val_top5=0.9, val_loss=1.0, train_nonfinite_steps=0, best_top1=0.5)
    assert epoch_line(record, 10).startswith("epoch 1/10: ")


def test_a_finetune_recipe_without_weights_is_refused_before_anything_is_written(tmp_path, capsys):
    finetune = [p for p in RECIPES if p.stem.endswith(("_finetune", "_ft"))]
    assert len(finetune) == 11  # 7 Swin (22k -> 1k at 224 and 384, 1k 224 -> 384) and 4 SwinV2
    assert all(load_config(str(p)).model.pretrained_required == (p in finetune) for p in RECIPES)
    out = tmp_path / "run"
    args = [
        "--config",
        str(finetune[0]),
        "--data-path",
        str(image_folder(tmp_path / "data")),
        "--output",
        str(out),
    ]
    assert train_cli([*args, "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert (
        "this recipe fine-tunes weights (model.pretrained_required: true) but model.pretrained is not set"
        in err
    )
    assert "model.pretrained_required=false" in err and not out.exists()
    from swin_train.run import check_pretrained_given

    on_purpose = load_config(str(finetune[0]), ["model.pretrained_required=false"])
    check_pretrained_given(on_purpose, resume=None)  # random weights, on purpose
    check_pretrained_given(load_config(str(finetune[0])), resume=os.fspath(tmp_path / "step.pth"))
