"""swin-export: write a checkpoint's weights in the layout another tool loads directly.

safetensors  our layout, tensors only; metadata holds the config, class names and preprocessing as JSON
timm         timm's SwinTransformer.load_state_dict(strict=True)
torchvision  torchvision's swin_t/s/b .load_state_dict(strict=True) (with its relative_position_index)
official     {'model': ...} with relative_position_index / attn_mask, for microsoft/Swin-Transformer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swin_train.cli.common import ArgumentParser, add_debug_flag, run_cli, setup_logging
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.convert import EXPORT_FORMATS

# Image size of bare weights by window, as in the official variant names (window7_224, window12_384).
_IMG_SIZE_BY_WINDOW = {7: 224, 12: 384}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="swin-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="swin-train checkpoint, or weights in any Swin layout")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="layout to write")
    p.add_argument("--out", required=True, help="file to write (.safetensors for --format safetensors)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument(
        "--img-size",
        type=int,
        help="image size of bare weights (default: 224 for window 7, 384 for window 12); "
        "a swin-train checkpoint's config already fixes it",
    )
    add_debug_flag(p)
    return p


def _model_kwargs(state: dict, sd: dict, img_size: int | None) -> dict:
    """The architecture: a swin-train checkpoint's config, else read off the weights."""
    from swin_train.config import config_from_dict
    from swin_train.models.convert import infer_arch

    if state.get("format") == "swin-train/1" and isinstance(state.get("config"), dict):
        if img_size is not None:
            raise ConfigError(
                "--img-size is only for bare weights; this checkpoint's config fixes the image size"
            )
        return config_from_dict(state["config"]).model_kwargs()
    arch = infer_arch(sd)
    if img_size is not None:
        arch["img_size"] = img_size
    elif "img_size" not in arch:
        if arch["window_size"] not in _IMG_SIZE_BY_WINDOW:
            raise ConfigError(f"the weights use window {arch['window_size']}; pass --img-size")
        arch["img_size"] = _IMG_SIZE_BY_WINDOW[arch["window_size"]]
    return arch


def _metadata(state: dict) -> dict[str, str]:
    """What a user of a swin-train checkpoint's weights needs besides tensors, as JSON strings."""
    if state.get("format") != "swin-train/1":
        return {}
    return {key: json.dumps(state[key]) for key in ("config", "class_names", "preprocess") if state.get(key)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging()
    import torch

    from swin_train.checkpoint import load_checkpoint
    from swin_train.models.convert import convert_state_dict, save_weights
    from swin_train.models.pretrained import select_weights
    from swin_train.models.swin import SwinTransformer

    out = Path(args.out)
    if (out.suffix == ".safetensors") != (args.format == "safetensors"):
        want = "a .safetensors name" if args.format == "safetensors" else "a name not ending in .safetensors"
        raise ConfigError(f"--out {out} for --format {args.format}: use {want} (loaders go by the suffix)")
    if not out.parent.is_dir():
        raise CheckpointError(f"output folder {out.parent} does not exist; create it or change --out")
    state = load_checkpoint(args.checkpoint)
    sd = convert_state_dict(select_weights(state, args.ema, f"checkpoint {args.checkpoint}"))
    kwargs = _model_kwargs(state, sd, args.img_size)
    try:
        with torch.device(
            "meta"
        ):  # shapes and block geometry only: checks the fit, gives the official buffers
            model = SwinTransformer(**kwargs)
    except (RuntimeError, ValueError) as e:  # e.g. a feature map that windows do not tile
        raise ConfigError(
            f"cannot build the model at image size {kwargs['img_size']} (window {kwargs['window_size']}): "
            f"{str(e).splitlines()[0]}; check --img-size"
        ) from None
    count = save_weights(sd, args.format, out, model, _metadata(state))
    log.info("wrote %d tensors (%s%s) to %s", count, args.format, ", EMA" if args.ema else "", out)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-export", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
