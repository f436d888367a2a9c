"""swin-export --format onnx / hf from a trained run, and what loads them back: onnxruntime, transformers'
SwinForImageClassification and swin-eval all give the run's own top-1."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch
from helpers import image_folder, two_class_train_args
from PIL import Image
from transformers import SwinForImageClassification

from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.export import cli as export_cli
from swin_train.cli.train import cli as train_cli
from swin_train.data.folder import build_eval_dataset
from swin_train.data.transforms import build_eval_transform
from swin_train.loading import load_trained_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runnable")
    data, out = image_folder(root / "data", train=16, val=8), root / "run"
    assert train_cli(two_class_train_args(data, out, "train.epochs=2")) == 0
    return data, out


def _top1(logits: np.ndarray, labels: list[int]) -> float:
    return float((logits.argmax(-1) == np.array(labels)).mean())


def test_onnx_and_hf_exports_give_the_runs_top1(run, tmp_path, capsys):
    data, out = run
    checkpoint = out / "best.pth"
    trained = load_trained_model(checkpoint)
    dataset, classes = build_eval_dataset(data, build_eval_transform(trained.preprocess))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = [dataset[i][1] for i in range(len(dataset))]
    with torch.no_grad():
        ours = trained.model(images).numpy()

    assert (
        export_cli(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
        == 0
    )
    assert "onnxruntime logits within" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    np.testing.assert_allclose(from_onnx, ours, atol=1e-4)

    assert export_cli(["--checkpoint", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = SwinForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        from_hf = hf(pixel_values=images).logits.numpy()
    np.testing.assert_allclose(from_hf, ours, atol=1e-4)
    assert hf.config.id2label == dict(enumerate(classes))
    assert _top1(from_hf, labels) == _top1(from_onnx, labels) == _top1(ours, labels)

    capsys.readouterr()
    for source, name in ((checkpoint, "ckpt.json"), (tmp_path / "hf", "hf.json")):
        assert (
            eval_cli(
                [
                    "--checkpoint",
                    str(source),
                    "--data-path",
                    str(data),
                    "--metrics-json",
                    str(tmp_path / name),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    from_checkpoint = json.loads((tmp_path / "ckpt.json").read_text())
    from_folder = json.loads((tmp_path / "hf.json").read_text())
    assert from_folder["top1"] == from_checkpoint["top1"] == pytest.approx(_top1(ours, labels))
    assert from_folder["num_samples"] == len(labels)


def test_export_refuses_a_file_name_the_format_cannot_have(run, tmp_path, capsys):
    _, out = run
    code = export_cli(
        ["--checkpoint", str(out / "best.pth"), "--format", "onnx", "--out", str(tmp_path / "m.pth")]
    )
    assert code == 2 and "use a .onnx name" in capsys.readouterr().err
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")  # not a checkpoint at all
    assert (
        export_cli(["--checkpoint", str(tmp_path / "x.png"), "--format", "hf", "--out", str(tmp_path / "o")])
        == 2
    )
