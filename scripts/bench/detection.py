"""The official detection backbone (SwinTransformer/Swin-Transformer-Object-Detection, read from a fetched
snapshot of its git repository, never part of this one) beside ours and timm's `features_only`, with the same
weights: the features benchmark (`benchmark.py --features HxW`) and the tests' reference.

The backbone file imports mmcv and mmdet for three names only; they are replaced by stand-ins: the BACKBONES
registry (its decorator returns the class), get_root_logger (a logging logger) and load_checkpoint, which is
the snapshot's own `mmcv_custom.load_checkpoint` (the function's text) over torch.load and
nn.Module.load_state_dict(strict=False), whose missing and unexpected keys it records in `LOADED`.
"""

from __future__ import annotations

import ast
import logging
import os
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from swin_train.errors import ConfigError

DETECTION_REPO = Path(
    os.environ.get(
        "SWIN_DETECTION_REPO", "/work/.mirror/SwinTransformer+Swin-Transformer-Object-Detection/repo"
    )
)
BACKBONE_FILE = "mmdet/models/backbones/swin_transformer.py"
CHECKPOINT_FILE = "mmcv_custom/checkpoint.py"
_REPLACED_IMPORTS = (
    "from mmcv_custom import load_checkpoint\n",
    "from mmdet.utils import get_root_logger\n",
    "from ..builder import BACKBONES\n",
)
# what the stand-in load_state_dict saw, per call: {"missing": [...], "unexpected": [...]}
LOADED: list[dict[str, list[str]]] = []


class DetectionCodeMissing(ConfigError):
    """No snapshot of the official detection code (or not the file asked for)."""


def detection_source(path: str, repo: Path = DETECTION_REPO) -> str:
    """The text of `path` at the snapshot's HEAD."""
    if not repo.is_dir():
        raise DetectionCodeMissing(
            f"no snapshot of the official detection code at {repo} (set SWIN_DETECTION_REPO)"
        )
    done = subprocess.run(
        ["git", "--git-dir", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise DetectionCodeMissing(f"the snapshot at {repo} has no {path}")
    return done.stdout


class _Registry:
    def register_module(self):
        return lambda cls: cls


def _record_load_state_dict(module, state_dict, strict=False, logger=None):
    result = module.load_state_dict(state_dict, strict=strict)
    LOADED.append({"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)})


def official_load_checkpoint(repo: Path = DETECTION_REPO):
    """mmcv_custom's load_checkpoint(model, filename, map_location, strict, logger), its own text."""
    source = detection_source(CHECKPOINT_FILE, repo)
    function = next(
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name == "load_checkpoint"
    )
    namespace = {
        "torch": torch,
        "F": F,
        "_load_checkpoint": lambda filename, map_location: torch.load(
            filename, map_location=map_location, weights_only=True
        ),
        "load_state_dict": _record_load_state_dict,
    }
    exec(compile(ast.get_source_segment(source, function), CHECKPOINT_FILE, "exec"), namespace)
    return namespace["load_checkpoint"]


def official_detection_module(repo: Path = DETECTION_REPO) -> types.ModuleType:
    """The official detection backbone file as a module (its SwinTransformer), mmcv/mmdet imports replaced."""
    source = detection_source(BACKBONE_FILE, repo)
    for line in _REPLACED_IMPORTS:
        if line not in source:
            raise DetectionCodeMissing(f"{BACKBONE_FILE} no longer has {line.strip()!r}")
        source = source.replace(line, "")
    module = types.ModuleType("official_detection_swin")
    module.__dict__.update(
        load_checkpoint=official_load_checkpoint(repo),
        get_root_logger=lambda: logging.getLogger("official_detection"),
        BACKBONES=_Registry(),
    )
    exec(compile(source, BACKBONE_FILE, "exec"), module.__dict__)
    return module


def mmdet_checkpoint(backbone_state: dict[str, torch.Tensor]) -> dict:
    """An mmdet-style checkpoint around a backbone's state dict: `backbone.*` with a neck and a head beside it."""
    state = {f"backbone.{k}": v for k, v in backbone_state.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(8, 4, 1, 1)
    state["rpn_head.rpn_conv.bias"] = torch.randn(8)
    return {"meta": {"epoch": 12}, "state_dict": state}


def official_backbone(module: types.ModuleType, arch: dict, **kwargs) -> torch.nn.Module:
    """The official detection backbone (`module`: official_detection_module()) of `arch` (our architecture
    fields), `kwargs` (ape, drop_path_rate, frozen_stages, ...) in its own names."""
    return module.SwinTransformer(pretrain_img_size=arch["img_size"], **_shape_fields(arch), **kwargs)


def timm_features(arch: dict, **kwargs) -> torch.nn.Module:
    """timm's `features_only` Swin of `arch` (our architecture fields) under the detection rule (every block
    partitioned, any image size), random weights; `kwargs` in timm's names."""
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        features_only=True,
        pretrained=False,
        always_partition=True,
        strict_img_size=False,
        dynamic_img_size=True,
        img_size=arch["img_size"],
        **_shape_fields(arch),
        **kwargs,
    )


def _shape_fields(arch: dict) -> dict:
    """The architecture fields the official backbone and timm name as we do."""
    return {k: arch[k] for k in ("patch_size", "embed_dim", "depths", "num_heads", "window_size")}


# -------------------------------------------------------------------------------------- the benchmark rows


def same_weight_backbones(arch: dict, repo: Path = DETECTION_REPO) -> dict[str, torch.nn.Module]:
    """ours (create_model features_only), official (the snapshot's backbone) and timm (features_only,
    always_partition), the official backbone's random weights in all three; stage norms applied to timm's
    maps by the benchmark (timm has none). Train mode, drop path 0 (same work in each)."""
    from swin_train import create_model
    from swin_train.models.convert import convert_state_dict, to_layout

    official = official_backbone(official_detection_module(repo), arch, drop_path_rate=0.0)
    official.init_weights()
    ours = create_model(**arch, features_only=True, drop_path_rate=0.0)
    ours.load_state_dict(convert_state_dict(mmdet_checkpoint(official.state_dict())))
    timm_model = timm_features(arch, drop_path_rate=0.0)
    stages = {k: v for k, v in ours.state_dict().items() if not k.startswith("norm")}  # timm has no norm{i}
    # features_only names timm's stages layers_{i}
    timm_model.load_state_dict(
        {k.replace("layers.", "layers_", 1): v for k, v in to_layout(stages, "timm").items()}
    )
    models = {"ours": ours, "official": official, "timm": timm_model}
    for model in models.values():
        model.train()  # the official backbone's train() returns None
    return models


def whole_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images padded at the bottom and right to whole patches, as ours and the official backbone pad them
    (timm's patch embedding asks for whole patches)."""
    H, W = images.shape[2:]
    return F.pad(images, (0, -W % patch_size, 0, -H % patch_size))


def time_backbones(models: dict, images: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward+backward (of the sum of every map's mean) of each model, in interleaved rounds;
    timm gets the images padded to whole patches."""
    patch = models["ours"].patch_size
    steps = {
        name: _step(model, whole_patches(images, patch) if name == "timm" else images)
        for name, model in models.items()
    }
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def _step(model, images):
    def run():
        model.zero_grad(set_to_none=True)
        sum(f.float().mean() for f in model(images)).backward()

    return run


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of ours / other, per other implementation (below 1: ours faster)."""
    return {
        name: statistics.median(a / b for a, b in zip(times["ours"], other))
        for name, other in times.items()
        if name != "ours"
    }


def run_features(args, argv) -> dict:
    """The features row: forward+backward of ours, the official detection backbone and timm's features_only
    at --features HxW, same weights; seconds per step and the median pairwise ratio ours / other."""
    from swin_train.cli.model import parse_size
    from swin_train.models.registry import variant_arch

    height, width = parse_size(args.features)
    arch = variant_arch(args.model)
    arch.pop("version")
    for key in ("embed_dim", "window_size", "patch_size", "img_size"):
        if getattr(args, key) is not None:
            arch[key] = getattr(args, key)
    for key in ("depths", "num_heads"):
        if getattr(args, key):
            arch[key] = tuple(getattr(args, key))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(args.seed)
    models = same_weight_backbones(arch)
    images = torch.randn(args.batch_size or 1, 3, height, width)
    with torch.no_grad():
        for model in models.values():
            model.eval()
        ours, official = models["ours"](images), models["official"](images)
        for model in models.values():
            model.train()
    difference = max(float((a - b).abs().max()) for a, b in zip(ours, official))
    times = time_backbones(models, images, args.warmup if args.warmup is not None else 1, args.repeats or 3)
    return {
        "mode": "features",
        "command": "python scripts/benchmark.py " + " ".join(argv),
        "model": args.model,
        "size": [height, width],
        "batch_size": images.shape[0],
        "threads": torch.get_num_threads(),
        "official_max_abs_diff": difference,
        "seconds": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratios": ratios(times),
    }


def format_features_table(report: dict) -> str:
    height, width = report["size"]
    lines = [
        f"forward+backward of the features model, {report['model']} at {height}x{width}, batch "
        f"{report['batch_size']}, {report['threads']} threads; features vs official max abs diff "
        f"{report['official_max_abs_diff']:.2e}",
        f"{'implementation':<16}{'median s/step':>14}{'ours / it':>11}",
    ]
    for name, median in report["median_s"].items():
        ratio = "" if name == "ours" else f"{report['ratios'][name]:.3f}"
        lines.append(f"{name:<16}{median:>14.3f}{ratio:>11}")
    return "\n".join(lines)
