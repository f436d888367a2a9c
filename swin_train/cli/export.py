"""swin-export: write a checkpoint's weights in the layout another tool loads directly.

safetensors  our layout, tensors only; metadata holds the config, class names and preprocessing as JSON
timm         timm's SwinTransformer / SwinTransformerV2 .load_state_dict(strict=True)
torchvision  torchvision's swin_t/s/b, swin_v2_t/s/b .load_state_dict(strict=True) (with its
             relative_position_index; V2 also its relative_coords_table, ours: pre-training windows included)
official     {'model': ...} with relative_position_index / attn_mask (V2: relative_coords_table), for
             microsoft/Swin-Transformer
detection    {'model': ...} for the official detection and segmentation code's `pretrained` (Swin V1): the
             backbone's weights (no final norm or head) with relative_position_index at the model's window;
             their stage norms norm{i} start fresh there
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
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli, setup_logging
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.convert import EXPORT_FORMATS

# Formats that hold a runnable model (the others are state-dict layouts, `models.convert.EXPORT_FORMATS`)
RUNNABLE_FORMATS = ("onnx", "hf")
# The run's dropout and stochastic-depth rates: a Hugging Face config.json holds them for training there
_TRAINING_RATES = ("drop_rate", "attn_drop_rate", "drop_path_rate")


@dataclass
class Exported:
    """What --checkpoint gives to write: the model, its weights in our layout, and for a trained model (not bare
    weights) its class names, preprocessing, safetensors metadata and training rates."""

    model: torch.nn.Module
    state_dict: dict
    class_names: list[str] | None = None
    preprocess: dict | None = None
    metadata: dict = field(default_factory=dict)
    rates: dict | None = None


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
        "--force",
        action="store_true",
        help="replace an existing --out file (never the input, nor a checkpoint of a training run)",
    )
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


def _check_not_replacing(out: Path, args) -> None:
    """Nothing exported replaces its input, a training run's checkpoint, or (without --force) another file."""
    from swin_train.models.hf import EXPORTED_FILES
    from swin_train.outputs import check_output_file, check_output_folder

    if args.format == "hf":
        check_output_folder(out, EXPORTED_FILES, inputs=[args.checkpoint], force=args.force)
    else:
        check_output_file(out, inputs=[args.checkpoint], force=args.force)


def _load(args) -> Exported:
    """--checkpoint read: a swin-train checkpoint or export, a Hugging Face folder, or bare weights."""
    from swin_train.checkpoint import EXPORT_METADATA_KEYS, holds_trained_model, load_checkpoint
    from swin_train.config import config_to_dict
    from swin_train.loading import bare_model, load_trained_model, select_weights
    from swin_train.models.convert import (
        check_saved_geometry,
        check_version,
        convert_state_dict,
        unwrap_state_dict,
    )
    from swin_train.models.hf import is_hf_folder
    from swin_train.simmim_weights import simmim_encoder

    hf = is_hf_folder(args.checkpoint)
    state = None if hf else load_checkpoint(args.checkpoint)
    raw = None if hf else select_weights(state, args.ema, f"checkpoint {args.checkpoint}")
    if raw is not None and (encoder := simmim_encoder(raw)) is not None:
        return _simmim_encoder(args, state, encoder)
    if hf or holds_trained_model(state):
        if args.img_size is not None or args.model is not None:
            raise ConfigError(
                "--img-size and --model are only for bare weights; this checkpoint's config fixes the model"
            )
        trained = load_trained_model(args.checkpoint if hf else state, ema=args.ema)
        preprocess = trained.preprocess.to_dict()
        if hf:  # what a swin-train export stores, so that the file works with every command
            state = {"config": config_to_dict(trained.config), "class_names": trained.class_names}
            state["preprocess"] = preprocess
        metadata = {key: json.dumps(state[key]) for key in EXPORT_METADATA_KEYS}  # checked above
        rates = {key: getattr(trained.config.model, key) for key in _TRAINING_RATES}
        model = trained.model
        return Exported(model, model.state_dict(), trained.class_names, preprocess, metadata, rates)
    sd = convert_state_dict(raw)
    if "norm.weight" not in sd and "head.weight" not in sd:  # a detection export or an mmdet / mmseg model's
        raise CheckpointError(
            f"{args.checkpoint} holds a detection backbone (no final norm or head), not a classifier; load it "
            "with swin_train.create_model(NAME or fields, features_only=True, checkpoint=...)"
        )
    model = bare_model(sd, args.img_size, args.model)
    check_version(sd, model, args.checkpoint)  # --model of the other Swin version
    # the export writes the model's buffers: they must be those the weights were trained with
    check_saved_geometry(unwrap_state_dict(raw), model, args.checkpoint)
    return Exported(model, sd)


def _simmim_encoder(args, state, encoder) -> Exported:
    """A SimMIM pre-training checkpoint: its encoder (no head, no mask token, no decoder), in the architecture
    its config records (an official file's: read off the weights, with --model / --img-size)."""
    from swin_train.loading import bare_model, load_exact_weights
    from swin_train.models.convert import check_saved_geometry, convert_state_dict
    from swin_train.models.swin import SwinTransformer
    from swin_train.simmim_weights import encoder_arch

    if args.format == "hf":
        raise ConfigError(
            f"{args.checkpoint} is a SimMIM pre-training checkpoint: its encoder has no classifier head for "
            f"transformers' ImageClassification; export it as {', '.join(EXPORT_FORMATS)} or onnx"
        )
    sd = convert_state_dict(encoder.weights)
    arch = encoder_arch(state, args.checkpoint)
    if arch is not None and (args.img_size is not None or args.model is not None):
        raise ConfigError(
            "--img-size and --model are only for bare weights; this checkpoint's config fixes the model"
        )
    if arch is None:
        model = bare_model(sd, args.img_size, args.model, device="cpu")
        check_saved_geometry(encoder.weights, model, args.checkpoint)
    else:
        model = SwinTransformer(**arch | {"grad_checkpointing": False})
    load_exact_weights(model, sd, args.checkpoint)
    logging.getLogger("swin_train").info(
        "%s is a SimMIM pre-training checkpoint: exporting its encoder (no classifier head; %d tensors of "
        "pre-training left out: mask token, decoder)",
        args.checkpoint,
        len(encoder.dropped),
    )
    # the config (safetensors metadata) keeps what the weights do not hold: a V2 encoder's windows
    return Exported(model.eval(), sd, metadata={"config": json.dumps(state["config"])} if arch else {})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging()
    from swin_train.loading import bare_model, load_exact_weights
    from swin_train.models.convert import save_weights

    out = Path(args.out)
    _check_out(out, args.format)
    loaded = _load(args)  # what is wrong with the input is said first
    _check_not_replacing(out, args)
    model, suffix = loaded.model, ", EMA" if args.ema else ""
    if args.format not in RUNNABLE_FORMATS:
        count = save_weights(loaded.state_dict, args.format, out, model, loaded.metadata)
        log.info("wrote %d tensors (%s%s) to %s", count, args.format, suffix, out)
        return 0
    if loaded.model.patch_embed.proj.weight.is_meta:  # bare weights: a real model to run
        model = bare_model(loaded.state_dict, args.img_size, args.model, device="cpu")
        load_exact_weights(model, loaded.state_dict, args.checkpoint)
    names, preprocess = loaded.class_names, loaded.preprocess
    if args.format == "onnx":
        from swin_train.models.onnx import export_onnx

        difference = export_onnx(model.eval(), out, class_names=names, preprocess=preprocess)
        log.info("wrote %s (onnx%s); onnxruntime logits within %.2e of PyTorch's", out, suffix, difference)
    else:
        from swin_train.models.hf import write_hf_folder
        from swin_train.models.hf_layout import HF_CLASSES

        write_hf_folder(model.eval(), out, class_names=names, preprocess=preprocess, rates=loaded.rates)
        log.info("wrote %s (hf%s): %s.from_pretrained loads it", out, suffix, HF_CLASSES[model.version])
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-export", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
