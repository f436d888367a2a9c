"""swin-export: write a checkpoint's weights in the layout another tool loads directly.

safetensors  our layout, tensors only; metadata holds the config, class names and preprocessing as JSON
timm         timm's SwinTransformer / SwinTransformerV2 .load_state_dict(strict=True)
torchvision  torchvision's swin_t/s/b, swin_v2_t/s/b .load_state_dict(strict=True) (with its
             relative_position_index; V2 also its relative_coords_table, ours: pre-training windows included)
official     {'model': ...} with relative_position_index / attn_mask (V2: relative_coords_table), for
             microsoft/Swin-Transformer
onnx         an ONNX graph (dynamic batch) with class names and preprocessing in its metadata, checked against
             PyTorch with onnxruntime at export time (pip install 'swin-train[onnx]')
hf           a folder for transformers' SwinForImageClassification / Swinv2ForImageClassification
             .from_pretrained (config.json with id2label, model.safetensors, preprocessor_config.json)

Bare weights carry no config: their architecture is read off them, with --model NAME giving what they do not
hold (the image size; for Swin V2, whose weights have no bias table, the window and pre-training windows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli, setup_logging
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.convert import EXPORT_FORMATS

# Formats that hold a runnable model (the others are state-dict layouts, `models.convert.EXPORT_FORMATS`)
RUNNABLE_FORMATS = ("onnx", "hf")
# Image size of bare weights by window, as in the official variant names (window7_224, window12_384).


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="swin-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="swin-train checkpoint, or weights in any Swin layout")
    p.add_argument(
        "--format", required=True, choices=(*EXPORT_FORMATS, *RUNNABLE_FORMATS), help="what to write"
    )
    p.add_argument(
        "--out", required=True, help="file to write (.safetensors, .onnx), or the folder for --format hf"
    )
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument(
        "--img-size",
        type=int,
        help="image size of bare weights (default: --model's, else 224 for window 7, 384 for window 12); "
        "a swin-train checkpoint's config already fixes it",
    )
    p.add_argument(
        "--model",
        help="variant name of bare weights, e.g. swinv2_tiny_patch4_window8_256: its window, image size and "
        "(V2) pre-training windows, which V2 weights do not hold",
    )
    add_debug_flag(p)
    return p


def _check_out(out: Path, fmt: str) -> None:
    """Loaders go by the suffix: refuse a name that another tool would misread."""
    suffix = {"safetensors": ".safetensors", "onnx": ".onnx"}.get(fmt)
    if suffix and out.suffix != suffix:
        raise ConfigError(f"--out {out} for --format {fmt}: use a {suffix} name (loaders go by the suffix)")
    if suffix is None and fmt != "hf" and out.suffix in (".safetensors", ".onnx"):
        raise ConfigError(f"--out {out} for --format {fmt}: use a name not ending in {out.suffix}")
    if not out.parent.is_dir():
        raise CheckpointError(f"output folder {out.parent} does not exist; create it or change --out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging()
    from swin_train.checkpoint import EXPORT_METADATA_KEYS, holds_trained_model, load_checkpoint
    from swin_train.loading import bare_model, load_exact_weights, load_trained_model, select_weights
    from swin_train.models.convert import (
        check_saved_geometry,
        convert_state_dict,
        save_weights,
        unwrap_state_dict,
    )

    out = Path(args.out)
    _check_out(out, args.format)
    state = load_checkpoint(args.checkpoint)
    bare = not holds_trained_model(state)
    if not bare:
        if args.img_size is not None or args.model is not None:
            raise ConfigError(
                "--img-size and --model are only for bare weights; this checkpoint's config fixes the model"
            )
        trained = load_trained_model(state, ema=args.ema)
        model, sd = trained.model, trained.model.state_dict()
        class_names, preprocess = trained.class_names, trained.preprocess.to_dict()
        metadata = {key: json.dumps(state[key]) for key in EXPORT_METADATA_KEYS}  # as stored, checked above
    else:
        raw = select_weights(state, args.ema, f"checkpoint {args.checkpoint}")
        sd = convert_state_dict(raw)
        model, class_names, preprocess, metadata = bare_model(sd, args.img_size, args.model), None, None, {}
        # the export writes the model's buffers: they must be those the weights were trained with
        check_saved_geometry(unwrap_state_dict(raw), model, args.checkpoint)
    suffix = ", EMA" if args.ema else ""
    if args.format not in RUNNABLE_FORMATS:
        count = save_weights(sd, args.format, out, model, metadata)
        log.info("wrote %d tensors (%s%s) to %s", count, args.format, suffix, out)
        return 0
    if bare:  # a real model to run
        model = bare_model(sd, args.img_size, args.model, device="cpu")
        load_exact_weights(model, sd, args.checkpoint)
    if args.format == "onnx":
        from swin_train.models.onnx import export_onnx

        difference = export_onnx(model.eval(), out, class_names=class_names, preprocess=preprocess)
        log.info("wrote %s (onnx%s); onnxruntime logits within %.2e of PyTorch's", out, suffix, difference)
    else:
        from swin_train.models.hf import write_hf_folder
        from swin_train.models.hf_layout import HF_CLASSES

        write_hf_folder(model.eval(), out, class_names=class_names, preprocess=preprocess)
        log.info("wrote %s (hf%s): %s.from_pretrained loads it", out, suffix, HF_CLASSES[model.version])
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-export", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
