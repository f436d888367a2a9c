"""Starting a run (issue #30): what cannot start writes nothing, a resume is checked before it writes, a finished run
says so, a Swin V2 fine-tune at another window takes the windows its weights learned with."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import env_for_subprocess, image_folder, two_class_train_args
from test_hardening_run import CLASSES, _copy_run, _error, _snapshot

from swin_train.cli.train import cli as train_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run of the micro model on cat/dog, trained with drop_path_rate 0.3."""
    root = tmp_path_factory.mktemp("run_start")
    data, out = image_folder(root / "data"), root / "run"
    assert train_cli(two_class_train_args(data, out, "model.drop_path_rate=0.3")) == 0
    return data, out


def test_a_run_folders_config_yaml_says_which_paths_came_from_it(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(f"output: {trained[1]}", f"output: {out}"))
    before = _snapshot(out)
    assert train_cli(["--config", str(config), "--device", "cpu"]) == 0  # finished: nothing to train
    logged = capsys.readouterr().out
    assert f"data.data_path {trained[0]}: from {config} (pass --data-path to change it)" in logged
    assert f"output {out}: from {config} (pass --output to change it)" in logged
    assert _snapshot(out) == before


# 4. a run that cannot start writes nothing; an existing run's files stay as they were


def test_a_refused_resume_leaves_the_run_folder_as_it_was(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    before = _snapshot(out)
    assert train_cli(two_class_train_args(trained[0], out, "data.img_size=64")) == 2
    assert "was trained as another model (img_size 32 -> 64)" in _error(capsys)
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.num_classes=3", "the data has 2 classes but model.num_classes is 3"),
        ("model.pretrained=/nowhere/w.pth", "/nowhere/w.pth does not exist"),
        ("data.batch_size=64", "no full batch; lower the batch size"),
    ],
)
def test_a_start_that_fails_after_reading_data_or_weights_leaves_no_folder(
    trained, tmp_path, capsys, setting, message
):
    out = tmp_path / "new" / "run"
    assert train_cli(two_class_train_args(trained[0], out, setting)) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "new").exists()


def test_a_run_that_starts_logs_its_start_into_log_txt(trained):
    log = (trained[1] / "log.txt").read_text().splitlines()
    assert "effective config (also in" in log[0]
    assert any("device cpu x 1 processes" in line for line in log)


# 6. resuming on other classes


def test_resume_on_data_whose_class_names_differ_is_refused(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    other = image_folder(tmp_path / "ants", classes=("ant", "cat"))
    before = _snapshot(out)
    assert train_cli(two_class_train_args(other, out, "train.epochs=2")) == 2
    err = _error(capsys)
    assert "was trained on other classes than the data's (class 0 is 'cat' there, 'ant' here)" in err
    assert f"model.pretrained={out / 'last.pth'}" in err
    assert _snapshot(out) == before


def test_a_finished_run_says_so_and_writes_nothing(trained, tmp_path, capsys):
    out = _copy_run(trained, tmp_path)
    before = _snapshot(out)
    assert train_cli(two_class_train_args(trained[0], out, "model.drop_path_rate=0.3")) == 0
    logged = capsys.readouterr().out
    assert "resuming" not in logged
    assert f"{out / 'last.pth'} has finished its run (1 of train.epochs=1 epochs trained)" in logged
    assert "run it again with train.epochs=N (N > 1)" in logged
    assert _snapshot(out) == before


def test_an_output_inside_the_data_folder_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(trained[0], data)
    before = _snapshot(data)
    for out in (data / "train" / "run", data / "run", data):
        assert train_cli(two_class_train_args(data, out)) == 2
        assert "the next start would read the run's files as data" in _error(capsys)
    assert _snapshot(data) == before and sorted(p.name for p in data.iterdir()) == ["train", "val"]


def _v2_trained(tmp_path: Path, window: int = 4, img_size: int = 32) -> Path:
    """A swin-train export of a micro Swin V2 (2 stages) at `window`: weights with their config."""
    from swin_train.checkpoint import save_checkpoint
    from swin_train.config import config_to_dict, load_config
    from swin_train.data.transforms import Preprocess
    from swin_train.models.swin import SwinTransformer

    cfg = load_config(
        None,
        [
            "model.version=2",
            "model.patch_size=4",
            "model.embed_dim=24",
            "model.depths=[2,2]",
            "model.num_heads=[2,4]",
            f"model.window_size={window}",
            "model.num_classes=2",
            f"data.img_size={img_size}",
        ],
    )
    torch.manual_seed(0)
    model = SwinTransformer(**cfg.model_kwargs())
    state = {
        "model": model.state_dict(),
        "config": config_to_dict(cfg),
        "class_names": list(CLASSES),
        "preprocess": Preprocess.from_config(cfg).to_dict(),
    }
    save_checkpoint(state, tmp_path / "v2.pth")
    return tmp_path / "v2.pth"


def _fine_tune_config(pretrained: Path, *extra: str):
    from swin_train.config import load_config

    return load_config(
        None,
        [
            "model.version=2",
            "model.patch_size=4",
            "model.embed_dim=24",
            "model.depths=[2,2]",
            "model.num_heads=[2,4]",
            "model.window_size=8",
            "model.num_classes=2",
            "data.img_size=64",
            f"model.pretrained={pretrained}",
            *extra,
        ],
    )


def test_a_v2_fine_tune_at_another_window_takes_the_windows_its_weights_learned_with(tmp_path, caplog):
    from swin_train.models.convert import block_buffers
    from swin_train.models.swin import SwinTransformer
    from swin_train.v2_windows import fit_pretrained_windows

    source = _v2_trained(tmp_path)
    cfg = _fine_tune_config(source)
    assert cfg.model.pretrained_window_sizes is None  # unset: each stage's own window
    fit_pretrained_windows(cfg)
    assert cfg.model.pretrained_window_sizes == [4, 4]
    assert any("model.pretrained_window_sizes=[4, 4]: the windows" in r.getMessage() for r in caplog.records)
    # the offsets the weights learned are normalised as they were: the coordinates of offset (0, +1) agree
    with torch.device("meta"):
        models = [SwinTransformer(**c.model_kwargs()) for c in (_fine_tune_config(source), cfg)]
    old = _v2_trained_model(source)
    key = "layers.0.blocks.0.attn.relative_coords_table"
    learned = block_buffers(old)[key][0, 3, 4]  # window 4: the centre is (3, 3)
    renormalised, fitted = (block_buffers(m)[key][0, 7, 8] for m in models)  # window 8: centre (7, 7)
    assert torch.equal(fitted, learned) and not torch.equal(renormalised, learned)


def _v2_trained_model(path: Path):
    from swin_train.loading import load_trained_model

    return load_trained_model(path).model


def test_a_v2_fine_tune_from_weights_that_do_not_record_their_window_warns(tmp_path, caplog):
    from swin_train.models.convert import to_layout
    from swin_train.v2_windows import fit_pretrained_windows

    source = _v2_trained(tmp_path)
    timm = tmp_path / "timm.pth"
    torch.save(to_layout(torch.load(source, weights_only=True)["model"], "timm"), timm)
    cfg = _fine_tune_config(timm)
    fit_pretrained_windows(cfg)
    assert cfg.model.pretrained_window_sizes is None  # unset: each stage's own window
    assert any(
        "does not record the windows its Swin V2 position bias" in r.getMessage() for r in caplog.records
    )
    official = tmp_path / "official.pth"
    model = _v2_trained_model(source)
    torch.save({"model": to_layout(model.state_dict(), "official", model)}, official)
    cfg = _fine_tune_config(official)
    fit_pretrained_windows(cfg)  # the official layout's buffers record them
    assert cfg.model.pretrained_window_sizes == [4, 4]
    caplog.clear()
    cfg = _fine_tune_config(source, "model.pretrained_window_sizes=[6,6]")
    fit_pretrained_windows(cfg)  # the user's own choice is kept, with a warning
    assert cfg.model.pretrained_window_sizes == [6, 6]
    assert any(
        "was trained with [4, 4]: its position bias is rescaled" in r.getMessage() for r in caplog.records
    )


def test_a_v2_fine_tune_run_stores_the_windows_it_took(tmp_path):
    source = _v2_trained(tmp_path)
    data, out = image_folder(tmp_path / "data", train=4, val=2), tmp_path / "run"
    v2 = [
        "model.version=2",
        "model.embed_dim=24",
        "model.window_size=8",
        "data.img_size=64",
        f"model.pretrained={source}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "swin_train.cli.train", *two_class_train_args(data, out, *v2)],
        capture_output=True,
        text=True,
        env=env_for_subprocess(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stored = torch.load(out / "last.pth", weights_only=True)["config"]["model"]
    assert stored["pretrained_window_sizes"] == [4, 4] and stored["window_size"] == 8
    assert "pretrained_window_sizes: [4, 4]" in (out / "config.yaml").read_text()
