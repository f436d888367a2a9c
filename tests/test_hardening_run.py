"""Fixes from the second adversarial run (issue #30), the run, checkpoint and command-line side: each test names
the hostile or unlucky input and what must happen. Numbers in the comments are the issue's items."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import image_folder, two_class_train_args

from swin_train.cli.data import cli as data_cli
from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.export import cli as export_cli
from swin_train.cli.model import cli as model_cli
from swin_train.cli.predict import cli as predict_cli
from swin_train.cli.train import cli as train_cli

CLASSES = ("cat", "dog")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (hidden ones too) with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run of the micro model on cat/dog, trained with drop_path_rate 0.3."""
    root = tmp_path_factory.mktemp("hardening_run")
    data, out = image_folder(root / "data"), root / "run"
    assert train_cli(two_class_train_args(data, out, "model.drop_path_rate=0.3")) == 0
    return data, out


def _copy_run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained[1], out)
    return out


# 1. nothing read from a file runs a command or opens a stream the user did not type


def _with_stored_data(checkpoint: Path, target: Path, **data) -> Path:
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["data"].update(data)
    torch.save(state, target)
    return target


def _shard_index(path: Path) -> Path:
    """A local _info.json naming shard x-0000.tar of both splits and the run's classes."""
    split = {"filenames": ["x-0000.tar"], "shard_lengths": [1], "num_samples": 1}
    info = {"splits": {"train": split, "validation": split}, "classes": list(CLASSES)}
    path.write_text(json.dumps(info))
    return path


@pytest.mark.parametrize(
    "source",
    [
        "pipe:touch {marker}; cat x-0000.tar",
        " pipe:touch {marker}; cat x-0000.tar",  # urllib strips the space before the scheme
        "/nowhere/x-{{0000..0001}}.tar::pipe:touch {marker}",  # webdataset joins patterns with ::
        "{{pipe:touch {marker},/nowhere/x-0000.tar}}",  # a brace expansion that makes a command
        "https://localhost:9/x-0000.tar",  # gopen opens http with curl
    ],
)
@pytest.mark.parametrize("export", [False, True])
def test_a_checkpoint_whose_config_names_a_command_runs_nothing_in_eval(
    trained, tmp_path, capsys, source, export
):
    marker = tmp_path / "ran"
    value = source.format(marker=marker)
    checkpoint = _with_stored_data(
        trained[1] / "last.pth",
        tmp_path / "evil.pth",
        data_path=value,
        val_path=value,
        shard_info=str(_shard_index(tmp_path / "_info.json")),
    )
    if export:  # its safetensors export stores the same config
        exported = tmp_path / "evil.safetensors"
        assert (
            export_cli(["--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(exported)])
            == 0
        )
        checkpoint = exported
        capsys.readouterr()
    assert eval_cli(["--checkpoint", str(checkpoint), "--device", "cpu"]) == 2
    err = _error(capsys)
    assert f"data.data_path in the config stored in {checkpoint} is" in err and "a command or URL" in err
    assert not marker.exists()


@pytest.mark.parametrize("key", ["val_path", "shard_info"])
def test_every_stored_data_source_is_a_plain_local_path(trained, tmp_path, capsys, key):
    marker = tmp_path / "ran"
    checkpoint = _with_stored_data(
        trained[1] / "last.pth", tmp_path / "evil.pth", **{key: f"pipe:touch {marker}"}
    )
    assert eval_cli(["--checkpoint", str(checkpoint), "--device", "cpu"]) == 2
    assert f"data.{key} in the config stored in" in _error(capsys)
    assert not marker.exists()


def test_data_typed_on_the_command_line_replaces_the_stored_command_and_stored_paths_are_logged(
    trained, tmp_path, capsys
):
    data, out = trained
    checkpoint = _with_stored_data(out / "last.pth", tmp_path / "evil.pth", data_path="pipe:false")
    assert eval_cli(["--checkpoint", str(checkpoint), "--data-path", str(data), "--device", "cpu"]) == 0
    assert "8 images" in capsys.readouterr().out
    assert eval_cli(["--checkpoint", str(out / "last.pth"), "--device", "cpu"]) == 0
    assert f"data.data_path {data}: from the config stored in {out / 'last.pth'}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_run_folders_config_yaml_with_a_command_runs_nothing(trained, tmp_path, capsys, command):
    """`--config OUT/config.yaml` reads what a run stored, not a recipe the user wrote."""
    marker = tmp_path / "ran"
    out = _copy_run(trained, tmp_path)
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(
        config.replace(f"data_path: {trained[0]}", f"data_path: 'pipe:touch {marker}'")
    )
    before = _snapshot(out)
    if command == "train":
        code = train_cli(["--config", str(out / "config.yaml"), "--device", "cpu", "train.epochs=2"])
    else:
        code = eval_cli(["--checkpoint", str(out / "last.pth"), "--config", str(out / "config.yaml")])
    assert code == 2
    assert f"data.data_path in {out / 'config.yaml'} is 'pipe:touch" in _error(capsys)
    assert not marker.exists() and _snapshot(out) == before


def test_command_or_url_sees_through_spaces_joins_and_braces():
    from swin_train.data.build import command_or_url

    assert command_or_url("/data/x-{0000..0003}.tar") is None and command_or_url("data/imagenet") is None
    assert command_or_url("\x01 https://h/x.tar") == "\x01 https://h/x.tar"  # urllib would strip the \\x01
    assert command_or_url("/a-{0..1}.tar::pipe:ls") == "pipe:ls"
    assert command_or_url("{gs://b/x.tar,/a.tar}") == "gs://b/x.tar"


# 2. no command writes over its input, a run's checkpoint, or (without --force) another file


@pytest.mark.parametrize("fmt", ["timm", "torchvision", "official", "safetensors", "hf"])
def test_export_refuses_to_write_over_its_input_in_every_format(trained, tmp_path, capsys, fmt):
    out = _copy_run(trained, tmp_path)
    source = out / "last.pth"
    if fmt == "safetensors":
        source = tmp_path / "w.safetensors"
        assert export_cli(["--checkpoint", str(out / "last.pth"), "--format", fmt, "--out", str(source)]) == 0
    elif fmt == "hf":
        source = tmp_path / "hf"
        assert export_cli(["--checkpoint", str(out / "last.pth"), "--format", fmt, "--out", str(source)]) == 0
    capsys.readouterr()
    before = _snapshot(source.parent)
    argv = ["--checkpoint", str(source), "--format", fmt, "--out", str(source), "--force"]
    assert export_cli(argv) == 2
    assert "is the input" in _error(capsys)
    assert _snapshot(source.parent) == before


def test_export_never_replaces_a_training_checkpoint_and_another_file_only_with_force(
    trained, tmp_path, capsys
):
    out = _copy_run(trained, tmp_path)
    elsewhere = tmp_path / "copy.pth"
    shutil.copy(out / "last.pth", elsewhere)  # a training checkpoint by its content, whatever its name
    before = _snapshot(tmp_path)
    for target in (out / "best.pth", out / "step-000000004.pth", elsewhere):
        argv = ["--checkpoint", str(out / "last.pth"), "--format", "timm", "--out", str(target), "--force"]
        assert export_cli(argv) == 2
        assert "is a checkpoint of a training run, which no command replaces" in _error(capsys)
    assert _snapshot(tmp_path) == before
    other = tmp_path / "timm.pth"
    other.write_bytes(b"mine")
    argv = ["--checkpoint", str(out / "last.pth"), "--format", "timm", "--out", str(other)]
    assert export_cli(argv) == 2
    assert f"--out {other} exists; pass --force to replace it" in _error(capsys)
    assert other.read_bytes() == b"mine"
    assert export_cli([*argv, "--force"]) == 0
    assert len(torch.load(other, weights_only=True)) == 63 and "head.fc.weight" in torch.load(other)


def test_hf_export_into_a_folder_with_files_needs_force(trained, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    argv = ["--checkpoint", str(trained[1] / "last.pth"), "--format", "hf", "--out", str(folder)]
    assert export_cli(argv) == 2
    assert "already holds config.json; pass --force" in _error(capsys)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    assert export_cli([*argv, "--force"]) == 0
    assert json.loads((folder / "config.json").read_text())["model_type"] == "swin"


def test_eval_metrics_json_is_never_the_checkpoint_and_replaces_a_file_only_with_force(
    trained, tmp_path, capsys
):
    out = _copy_run(trained, tmp_path)
    before = _snapshot(out)
    base = ["--checkpoint", str(out / "last.pth"), "--device", "cpu", "--metrics-json"]
    assert eval_cli([*base, str(out / "last.pth"), "--force"]) == 2
    assert "is the input" in _error(capsys)
    assert eval_cli([*base, str(out / "best.pth"), "--force"]) == 2
    assert "checkpoint of a training run" in _error(capsys)
    assert _snapshot(out) == before
    metrics = tmp_path / "m.json"
    metrics.write_text("old")
    assert eval_cli([*base, str(metrics)]) == 2
    assert "pass --force" in _error(capsys) and metrics.read_text() == "old"
    assert eval_cli([*base, str(metrics), "--force"]) == 0
    assert json.loads(metrics.read_text())["num_samples"] == 8


def test_swin_data_writes_outside_its_source_and_replaces_an_index_only_with_force(trained, tmp_path, capsys):
    pytest.importorskip("webdataset")
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    before = _snapshot(data)
    assert data_cli(["pack", str(data), str(data / "shards"), "--no-progress"]) == 2
    assert "is inside SRC" in _error(capsys)
    assert data_cli(["pack", str(data), str(data), "--no-progress"]) == 2
    assert _snapshot(data) == before  # an _info.json here would make the folder read as shards
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "_info.json").write_text('{"splits": {}}')
    assert data_cli(["pack", str(data), str(foreign), "--no-progress"]) == 2
    assert "holds a shard index that no pack wrote" in _error(capsys)
    assert [p.name for p in foreign.iterdir()] == ["_info.json"]
    shards = tmp_path / "shards"
    assert data_cli(["pack", str(data), str(shards), "--shard-size", "8", "--no-progress"]) == 0
    assert data_cli(["pack", str(data), str(shards), "--shard-size", "8", "--no-progress"]) == 0  # continues
    index = (shards / "_info.json").read_bytes()
    capsys.readouterr()
    assert data_cli(["index", str(shards)]) == 2
    assert "_info.json exists; pass --force" in _error(capsys)
    assert data_cli(["index", str(shards), "--force"]) == 0
    assert json.loads((shards / "_info.json").read_bytes())["splits"]["train"]["num_samples"] == 16
    assert json.loads(index)["splits"]["train"]["num_samples"] == 16


# 8. swin-model with --model and overrides


def test_swin_model_keeps_the_named_variant_when_overrides_are_given(capsys):
    name = "swinv2_base_patch4_window8_256"
    assert model_cli(["--model", name, "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert model_cli(["--model", name, "model.drop_path_rate=0.2", "--json"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    assert overridden["model"] == name and 87_000_000 < alone["params"] < 88_000_000  # V2-B, not a V1 Swin-T
    assert (overridden["params"], overridden["flops"]) == (alone["params"], alone["flops"])
    assert model_cli(["--model", name, "model.window_size=16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] != alone["flops"]  # the override applies to the V2-B


# 10. the debatable ones, decided


def test_val_resolving_to_the_train_files_is_warned(trained, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(trained[0] / "train", data / "train")
    (data / "val").symlink_to("train")
    assert train_cli(two_class_train_args(data, tmp_path / "run")) == 0
    warning = (
        "16 of 16 val images are train images (the same files): validation will measure the training data; "
        "give validation data of its own"
    )
    assert capsys.readouterr().out.count(warning) == 1
    assert train_cli(two_class_train_args(trained[0], tmp_path / "run2")) == 0
    assert "are train images" not in capsys.readouterr().out


def test_hf_export_keeps_the_runs_drop_path_rate_and_predict_and_export_take_the_folder(
    trained, tmp_path, capsys
):
    data, out = trained
    folder = tmp_path / "hf"
    assert export_cli(["--checkpoint", str(out / "last.pth"), "--format", "hf", "--out", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["drop_path_rate"] == 0.3
    images = [str(data / "val" / name) for name in CLASSES]
    capsys.readouterr()
    assert predict_cli(["--checkpoint", str(out / "last.pth"), *images, "--json", "--device", "cpu"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)["predictions"]
    assert predict_cli(["--checkpoint", str(folder), *images, "--json", "--device", "cpu"]) == 0
    from_folder = json.loads(capsys.readouterr().out)["predictions"]
    assert len(from_folder) == 8 and [p["topk"] for p in from_folder] == [p["topk"] for p in from_checkpoint]
    exported = tmp_path / "from_hf.safetensors"
    assert export_cli(["--checkpoint", str(folder), "--format", "safetensors", "--out", str(exported)]) == 0
    again = tmp_path / "hf_again"
    assert export_cli(["--checkpoint", str(folder), "--format", "hf", "--out", str(again)]) == 0
    assert (again / "config.json").read_text() == (folder / "config.json").read_text()
    metrics = {name: tmp_path / f"{name}.json" for name in ("ckpt", "export")}
    for name, source in (("ckpt", out / "last.pth"), ("export", exported)):
        argv = ["--checkpoint", str(source), "--data-path", str(data), "--metrics-json", str(metrics[name])]
        # one batch size: the folder's config has transformers' none, so the default's loss sums differ in fp32
        assert eval_cli([*argv, "--batch-size", "4", "--device", "cpu"]) == 0
    assert json.loads(metrics["ckpt"].read_text()) == json.loads(metrics["export"].read_text())


def test_overrides_that_contradict_an_hf_folders_config_are_refused(trained, tmp_path, capsys):
    data, out = trained
    folder = tmp_path / "hf"
    assert export_cli(["--checkpoint", str(out / "last.pth"), "--format", "hf", "--out", str(folder)]) == 0
    capsys.readouterr()
    base = ["--checkpoint", str(folder), "--data-path", str(data), "--device", "cpu"]
    assert eval_cli([*base, "data.img_size=64"]) == 2  # the weights fit: it evaluated at 64 px before
    assert (
        "carries its own architecture (config.json), which the overrides change (img_size 32 -> 64)"
        in _error(capsys)
    )
    assert eval_cli([*base, "eval.crop_pct=0.5"]) == 0  # preprocessing may change, and the log says so
    assert "eval.crop_pct=0.5 replaces" in capsys.readouterr().out
