"""The commands on SimMIM pre-training checkpoints: swin-eval and swin-predict say in one line how to fine-tune
one, swin-export writes its encoder (no head) in the chosen layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_simmim_finetune import (
    FINETUNE,
    _logits,
    _pretrained,
    _swin_train_simmim_checkpoint,
    simmim_state_dict,
)
from test_simmim_train import PRETRAIN

from swin_train.checkpoint import load_checkpoint, save_checkpoint
from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.export import cli as export_cli
from swin_train.errors import CheckpointError
from swin_train.loading import load_pretrained, load_trained_model
from swin_train.models.convert import detect_layout, official_buffers
from swin_train.models.swin import SwinTransformer
from swin_train.simmim_weights import FINETUNE_RECIPE


@pytest.fixture
def files(tmp_path):
    encoder = _pretrained()
    ours = tmp_path / "last.pth"
    state = _swin_train_simmim_checkpoint(ours, encoder)
    official = tmp_path / "simmim_pretrain.pth"
    save_checkpoint({"model": simmim_state_dict(encoder, official=True)}, official)
    return encoder, ours, official, state


@pytest.mark.parametrize("which", ["official", "classification config"])
def test_swin_eval_says_how_to_fine_tune_a_simmim_file_without_a_pretraining_config(files, which, capsys):
    _, ours, official, _ = files
    path = (
        official if which == "official" else ours
    )  # ours: a SimMIM state dict, a task: classification config
    assert (
        eval_cli(["--checkpoint", str(path), "--device", "cpu", "--model", "swin_tiny_patch4_window7_224"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"swin-eval: error: {path} is a SimMIM pre-training checkpoint" in err
    assert f"swin-train --config {FINETUNE_RECIPE} model.pretrained={path}" in err
    with pytest.raises(CheckpointError, match="is a SimMIM pre-training checkpoint .* fine-tune it first"):
        load_trained_model(path)  # swin-predict's loader


# test_simmim_train's micro pre-training (stride 32: patches of 8, three stages), one epoch on 8 random 64 px images
PRETRAINING = [*PRETRAIN, "simmim.pictures=0", "train.epochs=1", "data.num_workers=0"]


def test_swin_eval_reports_a_pretraining_runs_reconstruction_loss(tmp_path, capsys):
    from helpers import png, run_cli

    for i in range(8):
        png(tmp_path / "photos" / f"{i}.png", i, size=64)
    out = tmp_path / "run"
    done = run_cli("train", "--data-path", tmp_path / "photos", "--output", out, *PRETRAINING)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = tmp_path / "eval.json"
    argv = ["--checkpoint", str(out / "last.pth"), "--device", "cpu", "--metrics-json", str(metrics)]
    assert eval_cli(argv) == 0
    printed = capsys.readouterr().out
    assert f"masked reconstruction loss {logged['val_loss']:.4f} | 8 images, 1 process(es)" in printed
    got = json.loads(metrics.read_text())
    assert got["num_samples"] == 8 and got["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    assert eval_cli([*argv[:4], "model.embed_dim=32"]) == 2  # its own architecture
    assert "the config or overrides change embed_dim" in capsys.readouterr().err


def test_swin_export_writes_the_encoder_of_an_official_file(files, tmp_path, capsys):
    encoder, _, official, _ = files
    out = tmp_path / "encoder-official.pth"
    argv = ["--checkpoint", str(official), "--format", "official", "--out", str(out), "--img-size", "48"]
    assert export_cli(argv) == 0
    assert (
        "is a SimMIM pre-training checkpoint: exporting its encoder (no classifier head"
        in capsys.readouterr().out
    )
    written = torch.load(out, weights_only=True)["model"]
    assert detect_layout(written) == "official" and not any(
        k.startswith(("head.", "encoder.")) for k in written
    )
    expected = {**encoder.state_dict(), **official_buffers(encoder)}
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    classifier = SwinTransformer(**FINETUNE, num_classes=10)  # the export fine-tunes like any encoder
    report = load_pretrained(classifier, out)
    assert sorted(report.reinitialised) == ["head.bias", "head.weight"] and len(report.interpolated) == 4


def test_swin_export_writes_the_encoder_of_a_swin_train_checkpoint(files, tmp_path, capsys):
    encoder, ours, _, state = files
    out = tmp_path / "encoder.safetensors"
    assert export_cli(["--checkpoint", str(ours), "--format", "safetensors", "--out", str(out)]) == 0
    written = load_checkpoint(out)["model"]
    assert written.keys() == encoder.state_dict().keys()
    assert all(torch.equal(written[k], v) for k, v in encoder.state_dict().items())
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["config"]) == state["config"]  # its windows and image size
    onnx = pytest.importorskip("onnxruntime")
    out = tmp_path / "encoder.onnx"
    assert export_cli(["--checkpoint", str(ours), "--format", "onnx", "--out", str(out)]) == 0
    session = onnx.InferenceSession(str(out))
    x = torch.randn(2, 3, 48, 48)
    features = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(features), _logits(encoder, x), rtol=0, atol=1e-4)


def test_swin_export_refuses_what_an_encoder_cannot_be(files, tmp_path, capsys):
    ours = files[1]
    argv = ["--checkpoint", str(ours), "--format", "hf", "--out", str(tmp_path / "hf")]
    assert export_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its encoder has no classifier head for transformers" in err
    assert "export it as safetensors, timm, torchvision, official, detection or onnx" in err
    argv = [
        "--checkpoint",
        str(ours),
        "--format",
        "timm",
        "--out",
        str(tmp_path / "t.pth"),
        "--img-size",
        "48",
    ]
    assert export_cli(argv) == 2
    assert "only for bare weights; this checkpoint's config fixes the model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "t.pth").exists()


def test_few_labels_keeps_a_stratified_fraction_of_train_and_all_of_val(tmp_path, capsys):
    from pathlib import Path

    from helpers import load_module

    few = load_module("few_labels", Path(__file__).resolve().parents[1] / "scripts" / "few_labels.py")
    for split, per_class in (("train", {"a": 20, "b": 7}), ("val", {"a": 3, "b": 2})):
        for name, count in per_class.items():
            (tmp_path / "root" / split / name).mkdir(parents=True)
            for i in range(count):
                (tmp_path / "root" / split / name / f"{i:02d}.png").write_bytes(bytes([i]))
    assert few.main([str(tmp_path / "root"), str(tmp_path / "out"), "--fraction", "0.1"]) == 0
    kept = {d.name: sorted(f.name for f in d.iterdir()) for d in (tmp_path / "out" / "train").iterdir()}
    assert {k: len(v) for k, v in kept.items()} == {"a": 2, "b": 1}  # round(2.0), at least one
    assert len(list((tmp_path / "out" / "val").rglob("*.png"))) == 5
    assert few.main([str(tmp_path / "root"), str(tmp_path / "out2"), "--fraction", "0.1"]) == 0
    again = {d.name: sorted(f.name for f in d.iterdir()) for d in (tmp_path / "out2" / "train").iterdir()}
    assert again == kept  # the seed fixes the choice
    assert few.main([str(tmp_path / "root"), str(tmp_path / "out"), "--fraction", "0.1"]) == 2
    capsys.readouterr()
    assert few.main([str(tmp_path / "root" / "train"), str(tmp_path / "out3")]) == 2  # no train/ in it
    err = capsys.readouterr().err
    assert (
        err
        == f"few_labels.py: {tmp_path / 'root' / 'train'} is not an ImageFolder root with train/<class>/ and val/\n"
    )
