"""ONNX export: one self-contained .onnx file with dynamic batch, height and width, checked against PyTorch in
onnxruntime before it is kept.

    logits = onnxruntime.InferenceSession("swin.onnx").run(["logits"], {"images": batch})[0]  # (B, classes)

The input `images` is (batch, in_chans, height, width) float32, preprocessed as the model was evaluated
(the `preprocess` metadata entry: its img_size is the size it was trained at; any height and width of at least
the model's `min_input_size` run, padded and masked as in PyTorch); the output `logits` is (batch, num_classes), or `features` (batch,
num_features) for a model without a head, or for a backbone (models/backbone.py) one `stage{i}` (batch, C_i, H_i,
W_i) per returned map. The file's metadata_props hold `class_names` (a JSON list) and
`preprocess` (a JSON object: img_size, crop_pct, interpolation, mean, std) when they are given, so a server
needs neither torch nor swin-train.

The exporter is torch's recommended one (`torch.onnx.export(dynamo=True)`, which needs onnxscript). It traces
with torch.export, under which `torch.compiler.is_compiling()` is true, so the model takes its portable paths:
F.linear instead of the oneDNN kernels of ops.py, and `_GatherTokens` (a custom autograd Function around
index_select) becomes an ONNX Gather. The window attention on CPU is plain matmul + softmax. With symbolic
height and width the model computes its window tables in the graph (models/windows.py), so one graph serves
every size.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config

from swin_train.checkpoint import write_atomically
from swin_train.errors import CheckpointError, ConfigError, ExportError
from swin_train.models.backbone import SwinBackbone
from swin_train.models.swin import SwinTransformer

log = logging.getLogger("swin_train")

INPUT_NAME = "images"
# Batch sizes the export is checked at; neither is the traced one, so a batch baked into the graph shows.
VERIFY_BATCH_SIZES = (1, 3)
# Tracing uses batch 2: torch.export treats sizes 0 and 1 as special, so an example of 1 would fix the batch.
_TRACE_BATCH = 2
_REQUIRED = ("onnx", "onnxruntime", "onnxscript")
# protobuf's limit for one file; beyond it weights would need external data files
_MAX_ONNX_BYTES = 2**31 - 1


def require_onnx() -> None:
    """ExportError naming the missing packages unless onnx, onnxruntime and onnxscript import."""
    missing = []
    for name in _REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(_REQUIRED)}; not installed: {', '.join(missing)}. "
            "Install them with: pip install 'swin-train[onnx]'"
        )


def output_names(model: SwinTransformer) -> list[str]:
    if isinstance(model, SwinBackbone):
        return [f"stage{i}" for i in model.out_indices]
    return ["logits" if model.num_classes > 0 else "features"]


def verify_sizes(model: SwinTransformer) -> tuple[tuple[int, int], tuple[int, int]]:
    """The image sizes an export is checked at: the configured one, and one about 1.4x larger whose patch grid
    and stages windows do not tile (every padding path runs) and that was not traced."""
    H, W = model.img_size
    return (H, W), (H + H // 2 + 1, W + W // 4 + 3)


def max_abs_difference(
    path: str | os.PathLike, model: SwinTransformer, batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES
) -> float:
    """Largest |onnxruntime - PyTorch| output difference of the ONNX file at `path` against `model` (eval
    mode, CPU) on random images of each batch size at each of `verify_sizes`; inf when an output is not finite
    or has another shape."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    checks = [(batch, size) for size in verify_sizes(model) for batch in batch_sizes]
    for batch, (height, width) in checks:
        images = torch.randn(batch, model.in_chans, height, width, generator=generator)
        with torch.no_grad():
            expected = model(images)
        expected = [expected] if isinstance(expected, torch.Tensor) else expected  # a backbone: a list
        for got, wanted in zip(session.run(output_names(model), {INPUT_NAME: images.numpy()}), expected):
            wanted = wanted.numpy()
            if got.shape != wanted.shape or not np.isfinite(got).all():
                return float("inf")
            worst = max(worst, float(np.abs(got - wanted).max()))
    return worst


def export_onnx(
    model: SwinTransformer,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None,
    preprocess: dict | None,
    tolerance: float = 1e-4,
) -> float:
    """Write `model` (float32, on the CPU) to `path` as ONNX with dynamic batch, height and width; return the
    largest absolute logit difference between onnxruntime and PyTorch over batches of VERIFY_BATCH_SIZES at
    both `verify_sizes`.

    The file is written beside `path` first and only renamed to it (mode 0644) when that difference is at
    most `tolerance`; otherwise ExportError, and `path` is untouched. ExportError also when onnx, onnxruntime
    or onnxscript is missing. `class_names` and `preprocess` go into the metadata as JSON when given. The
    model is put in eval mode for the export and its mode restored.
    """
    require_onnx()
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"output folder {path.parent} does not exist; create it or change the path")
    if class_names is not None and len(class_names) != model.num_classes:
        raise ConfigError(
            f"{len(class_names)} class names for a head of {model.num_classes} classes; they must match"
        )
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32) for t in tensors):
        raise ValueError("export_onnx takes a float32 model on the CPU; call model.float().cpu() first")
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > _MAX_ONNX_BYTES:
        raise ExportError(
            f"the weights take {size / 2**30:.1f} GiB, more than one ONNX file can hold (2 GiB)"
        )

    metadata = {}
    if class_names is not None:
        metadata["class_names"] = json.dumps([str(name) for name in class_names])
    if preprocess is not None:
        metadata["preprocess"] = json.dumps(preprocess)
    was_training = model.training
    model.eval()
    try:
        program = _onnx_program(model)
        program.model.metadata_props.update(metadata)
        difference = float("nan")

        def write_and_check(tmp: Path) -> None:
            nonlocal difference
            program.save(tmp, external_data=False)
            difference = max_abs_difference(tmp, model)
            if not difference <= tolerance:
                raise ExportError(
                    f"the ONNX model's outputs differ from PyTorch's by up to {difference:.3g} (tolerance "
                    f"{tolerance:g}); {path} was not written"
                )

        write_atomically(path, write_and_check)
    finally:
        model.train(was_training)
    log.info(
        "wrote %s (ONNX, dynamic batch, height and width; onnxruntime matches PyTorch within %.2g)",
        path,
        difference,
    )
    return difference


def _onnx_program(model: SwinTransformer):
    """torch.onnx.ONNXProgram of `model` (eval mode) with dynamic batch, height and width, graph-optimised."""
    images = torch.randn(_TRACE_BATCH, model.in_chans, *model.img_size)
    min_h, min_w = model.min_input_size
    batch = torch.export.Dim("batch", min=1)
    height, width = torch.export.Dim("height", min=min_h), torch.export.Dim("width", min=min_w)
    # size-oblivious tracing: a size that could be 1 (one window across a stage) is traced as the general case
    # rather than guarded on, so that one graph serves every height and width (the tests run it at 1 too)
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.onnx.export(
            model,
            (images,),
            dynamo=True,
            dynamic_shapes=({0: batch, 2: height, 3: width},),
            input_names=[INPUT_NAME],
            output_names=output_names(model),
            optimize=True,
            verbose=False,
        )
