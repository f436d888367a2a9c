"""ONNX export (swin_train/models/onnx.py): onnxruntime gives PyTorch's logits at any batch size, the file
carries class names and preprocessing, and runs where neither swin-train nor torch can be imported."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import MICRO
from helpers import env_for_subprocess

from swin_train import create_model
from swin_train.errors import ConfigError, ExportError
from swin_train.models import onnx as swin_onnx
from swin_train.models import ops
from swin_train.models.onnx import export_onnx, max_abs_difference

CLASSES = ["cat", "dog", "fish", "bird", "frog"]
PREPROCESS = {
    "img_size": 32,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
}


def _randomised(model):
    """Every parameter perturbed, so that no LayerNorm is the identity and no bias is zero."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _onnxruntime_outputs(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


def _assert_matches_pytorch(path, model, batch_sizes=(1, 3), atol=1e-4, size=None) -> None:
    model.eval()
    for batch in batch_sizes:
        images = torch.randn(batch, 3, *(size or model.img_size))
        with torch.no_grad():
            expected = model(images).numpy()
        got = _onnxruntime_outputs(path, images)
        assert got.shape == expected.shape == (batch, model.num_classes)
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    """A micro model (in training mode) exported once with class names and preprocessing, under umask 027,
    with every Linear of the eager model on the oneDNN kernels of ops.py (as Swin-T's first stages are)."""
    torch.manual_seed(0)
    model = _randomised(create_model(**MICRO, num_classes=len(CLASSES)))
    path = tmp_path_factory.mktemp("onnx") / "micro.onnx"
    old_umask = os.umask(0o027)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ops, "ONEDNN_MIN_ROWS", 1)
            difference = export_onnx(model, path, class_names=CLASSES, preprocess=PREPROCESS)
    finally:
        os.umask(old_umask)
    return model, path, difference


def test_onnxruntime_gives_pytorchs_logits_for_batches_of_1_and_3(micro_export):
    model, path, difference = micro_export
    assert model.training  # the export switched to eval mode and back
    assert 0 <= difference <= 1e-4
    assert difference == max_abs_difference(path, model.eval())  # what export_onnx checked, recomputed
    _assert_matches_pytorch(path, model)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.shape == ["batch", 3, "height", "width"]  # named, dynamic batch, height and width


@pytest.mark.parametrize("size", [(49, 43), (8, 8), (33, 70)])
def test_onnxruntime_gives_pytorchs_logits_at_sizes_it_was_not_traced_at(micro_export, size):
    """Padded patches, windows and merges at 49x43 and 33x70; at 8x8 every stage is one window (the size-1
    dimensions a trace may specialise)."""
    model, path, _ = micro_export
    _assert_matches_pytorch(path, model, size=size)
    model.train()


def test_the_graph_has_only_standard_onnx_ops_where_eager_pytorch_takes_onednn(micro_export):
    _, path, _ = micro_export
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no mkldnn or custom-function ops
    assert "Gather" in {node.op_type for node in graph.node}  # _GatherTokens: shift + window partition


def test_metadata_holds_class_names_and_preprocessing_as_json(micro_export):
    _, path, _ = micro_export
    metadata = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["class_names"]) == CLASSES
    assert json.loads(metadata["preprocess"]) == PREPROCESS


def test_file_mode_follows_the_umask_and_no_temp_file_remains(micro_export):
    _, path, _ = micro_export
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 less umask 027, as open() would give
    assert [p.name for p in path.parent.iterdir()] == ["micro.onnx"]


_WITHOUT_SWIN_TRAIN = textwrap.dedent(
    """
    import sys

    class Blocker:  # installed before any other import: swin_train and torch cannot be found
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("swin_train", "torch"):
                raise ModuleNotFoundError(f"{name} is blocked")
            return None

    sys.meta_path.insert(0, Blocker())
    for blocked in ("swin_train", "torch"):
        try:
            __import__(blocked)
        except ImportError:
            continue
        raise SystemExit(f"{blocked} could be imported")

    import json
    import numpy as np
    import onnxruntime

    model_path, images_path, out_path = sys.argv[1:]
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": np.load(images_path)})
    np.save(out_path, logits)
    print(json.dumps(session.get_modelmeta().custom_metadata_map))
    assert not [m for m in sys.modules if m.split(".")[0] in ("swin_train", "torch")]
    """
)


def test_runs_in_a_process_that_cannot_import_swin_train_or_torch(micro_export, tmp_path):
    model, path, _ = micro_export
    images = torch.randn(3, 3, 32, 32)
    np.save(tmp_path / "images.npy", images.numpy())
    script = tmp_path / "serve.py"
    script.write_text(_WITHOUT_SWIN_TRAIN)
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
    )
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=0, atol=1e-4)
    assert json.loads(json.loads(result.stdout)["class_names"]) == CLASSES


def test_missing_onnxscript_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    model = create_model(**MICRO, num_classes=2)
    with pytest.raises(ExportError) as error:
        export_onnx(model, tmp_path / "m.onnx", class_names=None, preprocess=None)
    message = str(error.value)
    assert "not installed: onnxscript" in message and "pip install 'swin-train[onnx]'" in message
    assert "\n" not in message and not (tmp_path / "m.onnx").exists()


def test_a_mismatch_above_tolerance_keeps_the_old_file_and_leaves_no_temp_file(monkeypatch, tmp_path):
    # the smallest Swin (one stage, one block, one window) keeps the export short
    model = create_model(
        img_size=16, patch_size=4, embed_dim=8, depths=(1,), num_heads=(1,), window_size=4, num_classes=2
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous export")
    monkeypatch.setattr(swin_onnx, "max_abs_difference", lambda *args, **kwargs: 0.5)
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to 0.5 \(tolerance 0.0001\)"):
        export_onnx(model, path, class_names=None, preprocess=None)
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_class_names_must_fit_the_head(tmp_path):
    with pytest.raises(ConfigError, match="4 class names for a head of 5 classes"):
        export_onnx(
            create_model(**MICRO, num_classes=5),
            tmp_path / "m.onnx",
            class_names=CLASSES[:4],
            preprocess=None,
        )


@pytest.mark.slow
def test_full_size_swin_t_gives_pytorchs_logits_for_batches_of_1_and_3(tmp_path):
    torch.manual_seed(0)
    model = _randomised(create_model("swin_tiny_patch4_window7_224")).eval()
    path = tmp_path / "swin_t.onnx"
    preprocess = {**PREPROCESS, "img_size": 224}
    difference = export_onnx(model, path, class_names=None, preprocess=preprocess)
    assert 0 <= difference <= 1e-4
    _assert_matches_pytorch(path, model)
    metadata = {
        entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props
    }
    assert json.loads(metadata["preprocess"]) == preprocess and "class_names" not in metadata
    assert not [p for p in tmp_path.iterdir() if p.name != "swin_t.onnx"]  # one file: no external data
