"""transformers' Swin (V1: SwinForImageClassification; V2: Swinv2ForImageClassification) in our terms, as
pure mappings: weight names (ours <-> its file names), the architecture (our SwinTransformer arguments <-> its
SwinConfig / Swinv2Config) and the eval preprocessing (ours <-> preprocessor_config.json). Reading and
writing the folder is `hf.py`, whose docstring tables the names.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.convert import convert_state_dict, infer_arch, table_window
from swin_train.models.swin import (
    BLOCK_KEY,
    DOWNSAMPLE_KEY,
    BlockSpec,
    SwinTransformer,
    config_size,
    relative_position_index,
)

log = logging.getLogger("swin_train")

# What our blocks compute and transformers makes configurable: nn.LayerNorm's eps and the exact (erf) GELU.
_LAYER_NORM_EPS = 1e-5
_HIDDEN_ACT = "gelu"
# SwinConfig's defaults: transformers 4.x leaves values equal to them out of config.json.
_SWIN_CONFIG_DEFAULTS = dict(
    image_size=224,
    patch_size=4,
    num_channels=3,
    embed_dim=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4.0,
    qkv_bias=True,
    use_absolute_embeddings=False,
    hidden_act=_HIDDEN_ACT,
    layer_norm_eps=_LAYER_NORM_EPS,
)

# PIL resampling codes (PIL.Image.Resampling), as preprocessor_config.json stores them, by timm's names.
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAMES = {code: name for name, code in _RESAMPLE.items()}
_RESCALE = 1 / 255

# Names outside the blocks, ours -> transformers' (prefixes; the final `norm.` is the top-level LayerNorm).
_TOP_NAMES = {
    "patch_embed.proj.": "swin.embeddings.patch_embeddings.projection.",
    "patch_embed.norm.": "swin.embeddings.norm.",
    "absolute_pos_embed": "swin.embeddings.position_embeddings",
    "norm.": "swin.layernorm.",
    "head.": "classifier.",
}
# Names inside `layers.{i}.blocks.{j}.`, ours -> transformers' (qkv is split, see to_hf_state_dict); the last
# four are V2's (its layernorm_before/after are our norm1/norm2 too, applied after the branch as ours).
_BLOCK_NAMES = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.proj.": "attention.output.dense.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
    "attn.q_bias": "attention.self.query.bias",
    "attn.v_bias": "attention.self.value.bias",
    "attn.logit_scale": "attention.self.logit_scale",
    "attn.cpb_mlp.": "attention.self.continuous_position_bias_mlp.",
}
# transformers' model type, class and weight-name prefix by Swin version
HF_MODEL_TYPES = {1: "swin", 2: "swinv2"}
HF_CLASSES = {1: "SwinForImageClassification", 2: "Swinv2ForImageClassification"}
_QKV = ("query", "key", "value")  # the row blocks of our qkv, in order
# transformers 5's module names (its state_dict()) -> its file names, inside a block.
_V5_BLOCK_NAMES = {
    "attention.q_proj.": "attention.self.query.",
    "attention.k_proj.": "attention.self.key.",
    "attention.v_proj.": "attention.self.value.",
    "attention.o_proj.": "attention.output.dense.",
    "attention.relative_position_bias.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}


def _renamed(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with the first matching prefix of `table` replaced, or None when none matches."""
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def with_defaults(arch: Mapping) -> dict:
    """`arch` completed with SwinTransformer's own defaults (in_chans, num_classes, mlp_ratio, qkv_bias, ...)."""
    params = inspect.signature(SwinTransformer.__init__).parameters.values()
    block = {f.name: f.default for f in dataclasses.fields(BlockSpec)}  # SwinTransformer(**block_settings)
    return {
        **block,
        **{p.name: p.default for p in params if p.default is not inspect.Parameter.empty},
        **arch,
    }


def _hf_name(name: str, version: int) -> str:
    """transformers' name of a tensor of `_TOP_NAMES` or the encoder: under `swin.` in V1, `swinv2.` in V2."""
    return "swinv2." + name.removeprefix("swin.") if version == 2 and name.startswith("swin.") else name


def model_arch(model: SwinTransformer) -> dict:
    """SwinTransformer keyword arguments of a built model: read off its weights, plus its image size and
    windows (V2 weights do not hold them)."""
    return {
        **infer_arch(model.state_dict()),
        "img_size": config_size(model.img_size),
        "window_size": model.window_size,
        "pretrained_window_sizes": model.pretrained_window_sizes and list(model.pretrained_window_sizes),
    }


def check_hf_compatible(arch: Mapping) -> None:
    """ConfigError unless transformers' SwinForImageClassification computes this architecture as ours does."""
    arch = with_defaults(arch)
    if not arch["patch_norm"]:
        raise ConfigError(
            "transformers' Swin always normalises patches and this model has patch_norm=False; "
            "export it as safetensors or official instead"
        )
    img_size, patch, window = arch["img_size"], arch["patch_size"], arch["window_size"]
    if not isinstance(img_size, int):
        raise ConfigError(
            f"image size {'x'.join(map(str, img_size))} is not square: the transformers export writes square "
            "sizes only; export it as safetensors, official or onnx instead"
        )
    if img_size % patch:
        raise ConfigError(
            f"image size {img_size} is not a multiple of the patch size {patch}: transformers' Swin pads the "
            "image where ours drops the remainder; export it as safetensors or official instead"
        )
    if arch["version"] == 2:
        if arch["ape"]:
            raise ConfigError(
                "transformers' Swinv2 sizes its absolute position embedding for one token more than the patches "
                "and cannot run this model (ape); export it as safetensors or official instead"
            )
        return  # transformers' Swinv2 shrinks a window larger than its stage, as ours does
    grid = img_size // patch
    for stage in range(len(arch["depths"])):
        side = grid // 2**stage
        if side < window:
            raise ConfigError(
                f"layer {stage} of this model sees {side}x{side} tokens, fewer than its window {window}: ours "
                "shrinks the window there, transformers' Swin cannot; export it as safetensors or official, "
                f"or use a window of at most {side} (or a larger image size)"
            )


# ------------------------------------------------------------------------------------------- state dicts


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], arch: Mapping) -> dict[str, torch.Tensor]:
    """A Swin state dict (ours, or any layout convert_state_dict reads) -> transformers' file layout (see
    the module docstring), with each V1 block's relative_position_index (V2's index is not saved).

    `arch`: the SwinTransformer keyword arguments of these weights; ConfigError when transformers' Swin cannot
    compute that model as ours does. The q/k/v tensors are copies (safetensors refuses shared storage); the
    others are the given tensors.
    """
    arch = with_defaults(arch)
    check_hf_compatible(arch)
    version = arch["version"]
    out = {}
    for key, value in convert_state_dict(sd).items():
        if DOWNSAMPLE_KEY.match(key):
            out[_hf_name(f"swin.encoder.{key}", version)] = value  # merging ends stage i in both layouts
            continue
        if (block := BLOCK_KEY.match(key)) is None:
            out[_hf_name(_renamed(key, _TOP_NAMES), version)] = value  # only our names got this far
            continue
        prefix, part = _hf_name(f"swin.encoder.{block[0]}", version), key[block.end() :]
        if part.startswith("attn.qkv."):
            kind = part.removeprefix("attn.qkv.")  # weight, or V1's bias
            for name, rows in zip(_QKV, value.chunk(3)):
                out[f"{prefix}attention.self.{name}.{kind}"] = rows.clone()
            continue
        if part == "mlp.fc1.weight" and value.shape[0] != int(arch["mlp_ratio"] * value.shape[1]):
            raise ConfigError(
                f"'{key}' has {value.shape[0]} hidden units, but transformers' Swin sizes every MLP as "
                f"int(mlp_ratio x width) = int({arch['mlp_ratio']} x {value.shape[1]}); check mlp_ratio"
            )
        out[prefix + _renamed(part, _BLOCK_NAMES)] = value
        if part == "attn.relative_position_bias_table":
            index = relative_position_index(table_window(value, key))
            out[f"{prefix}attention.self.relative_position_index"] = index
    return out


def from_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Swin or Swinv2 weights -> our layout.

    Reads its file names (the Hub's, `save_pretrained`'s) and transformers 5's module names (its
    `state_dict()`), with the `swin.` / `swinv2.` prefix of the image classifiers or without it (SwinModel,
    Swinv2Model). The index buffers are dropped; anything else (a SimMIM decoder, a backbone's norms) raises
    CheckpointError naming the keys.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # our qkv key -> {"query": ..., "key": ..., "value": ...}
    top_names = {new.removeprefix("swin."): old for old, new in _TOP_NAMES.items()}
    block_names = {new: old for old, new in _BLOCK_NAMES.items()}
    v2 = any("continuous_position_bias_mlp" in key for key in sd)  # V2 biases are our q_bias and v_bias
    unexpected = []
    for key, value in sd.items():
        name = key.removeprefix("swinv2." if v2 else "swin.")
        if name.endswith(("relative_position_index", "relative_coords_table")):
            continue
        ours = None
        if block := re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$", name):
            prefix = f"layers.{block[1]}.blocks.{block[2]}."
            part = _renamed(block[3], _V5_BLOCK_NAMES) or block[3]
            split = re.match(r"attention\.self\.(query|key|value)\.(weight|bias)$", part)
            if split and not (v2 and split[2] == "bias"):
                qkv.setdefault(f"{prefix}attn.qkv.{split[2]}", {})[split[1]] = value
                continue
            ours = prefix + rest if (rest := _renamed(part, block_names)) else None
        elif merging := re.match(r"encoder\.layers\.(\d+)\.downsample\.(.+)$", name):
            ours = f"layers.{merging[1]}.downsample.{merging[2]}"
        else:
            ours = _renamed(name, top_names)
        if ours is None:
            unexpected.append(key)
        else:
            out[ours] = value
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else "")
        raise CheckpointError(
            f"not the weights of transformers' Swin(v2)ForImageClassification or Swin(v2)Model: unexpected {shown}"
        )
    for key, parts in qkv.items():
        missing = [p for p in _QKV if p not in parts]
        if missing:
            block = key.rsplit(".attn.", 1)[0]
            raise CheckpointError(f"the Hugging Face weights have no attention.self.{missing[0]} for {block}")
        out[key] = torch.cat([parts[p] for p in _QKV])
    return convert_state_dict(out)  # checks every name against our layout


# ------------------------------------------------------------------------------------ config.json etc.


def _labels(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"LABEL_{i}" for i in range(num_classes)]  # transformers' own placeholder names
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for a head of {num_classes} classes; they must match")
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"class name '{duplicate}' appears twice; label2id needs unique class names")
    return names


def hf_config(arch: Mapping, class_names: Sequence[str] | None) -> dict:
    """config.json for SwinForImageClassification: the architecture, id2label/label2id from `class_names`
    (transformers' placeholder names LABEL_i without them). ConfigError for what transformers cannot compute.

    Dropout and stochastic depth only matter for training in transformers; they come from `arch` when it has
    them (drop_rate, attn_drop_rate, drop_path_rate), else SwinTransformer's defaults.
    """
    arch = with_defaults(arch)
    check_hf_compatible(arch)
    labels = _labels(class_names, arch["num_classes"])
    version = arch["version"]
    windows = {}
    if version == 2:
        windows["pretrained_window_sizes"] = list(
            arch["pretrained_window_sizes"] or [0] * len(arch["depths"])
        )
    return {
        "architectures": [HF_CLASSES[version]],
        "model_type": HF_MODEL_TYPES[version],
        **windows,
        "image_size": arch["img_size"],
        "patch_size": arch["patch_size"],
        "num_channels": arch["in_chans"],
        "embed_dim": arch["embed_dim"],
        "depths": list(arch["depths"]),
        "num_heads": list(arch["num_heads"]),
        "window_size": arch["window_size"],
        "mlp_ratio": float(arch["mlp_ratio"]),
        "qkv_bias": bool(arch["qkv_bias"]),
        "use_absolute_embeddings": bool(arch["ape"]),
        "hidden_act": _HIDDEN_ACT,
        "layer_norm_eps": _LAYER_NORM_EPS,
        **{theirs: float(arch[ours]) for ours, theirs in _RATE_NAMES.items()},
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def hf_preprocessor_config(preprocess: Mapping) -> dict:
    """Our eval preprocessing (img_size, crop_pct, interpolation, mean, std) as preprocessor_config.json.

    crop_pct 1.0 (ours: a plain resize to img_size x img_size) -> ViTImageProcessor, which does just that.
    crop_pct < 1 (ours: the short side to floor(img_size / crop_pct), then a centre crop of img_size) ->
    BitImageProcessor (size.shortest_edge, then crop_size), because ViTImageProcessor cannot crop.
    Equal: output sizes, kept or changed aspect, crop size, the resampling filter, scaling by 1/255, mean and
    std. Not equal: transformers' centre crop starts at floor(excess / 2), torchvision's (ours, timm's) at
    round(excess / 2), one pixel further when the excess is 3 mod 4; and transformers' default (torchvision)
    backend resizes tensors where ours resizes the PIL image, so its values differ by up to a grey level.
    AutoImageProcessor.from_pretrained(folder, backend="pil") resizes with PIL: identical values (tested).
    """
    missing = [k for k in ("img_size", "crop_pct", "interpolation", "mean", "std") if k not in preprocess]
    if missing:
        raise ConfigError(f"the preprocessing has no {', '.join(missing)}; the checkpoint is damaged")
    img_size, crop_pct = int(preprocess["img_size"]), float(preprocess["crop_pct"])
    interpolation = str(preprocess["interpolation"])
    if interpolation not in _RESAMPLE:
        raise ConfigError(
            f"interpolation '{interpolation}' has no PIL resampling code; use {', '.join(_RESAMPLE)}"
        )
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    common = {
        "do_resize": True,
        "resample": _RESAMPLE[interpolation],
        "do_rescale": True,
        "rescale_factor": _RESCALE,
        "do_normalize": True,
        "image_mean": [float(m) for m in preprocess["mean"]],
        "image_std": [float(s) for s in preprocess["std"]],
    }
    if crop_pct == 1.0:
        return {
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": img_size, "width": img_size},
            **common,
        }
    return {
        "image_processor_type": "BitImageProcessor",
        "size": {"shortest_edge": math.floor(img_size / crop_pct)},  # timm's eval transform rounds down too
        "do_center_crop": True,
        "crop_size": {"height": img_size, "width": img_size},
        "do_convert_rgb": True,
        **common,
    }


def preprocess_from_hf(cfg: Mapping, source: Path) -> dict | None:
    """preprocessor_config.json -> our preprocess dict. Two pipelines are ours: a plain resize to S x S (no
    crop), and the short side to R, then a centre crop C x C with C < R. Anything else: None, with a warning."""

    def unsupported(why: str) -> None:
        log.warning(
            "%s: %s, which swin-train's eval transform cannot do; its preprocessing is not used", source, why
        )

    def square(value) -> int | None:
        if isinstance(value, int):
            return value
        if (
            isinstance(value, Mapping)
            and value.keys() == {"height", "width"}
            and value["height"] == value["width"]
        ):
            return int(value["height"])
        return None

    if not cfg.get("do_resize", True):
        return unsupported("it does not resize images")
    resample = _RESAMPLE_NAMES.get(cfg.get("resample"))
    if resample is None:
        return unsupported(f"it resamples with PIL code {cfg.get('resample')!r}")
    if not cfg.get("do_rescale", True) or not math.isclose(cfg.get("rescale_factor", _RESCALE), _RESCALE):
        return unsupported("it does not scale pixels by 1/255")
    size, crop = cfg.get("size"), cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
        resize_to, crop_side = int(size["shortest_edge"]), square(crop) if crop is not None else None
        if crop_side is None or not crop_side < resize_to:
            return unsupported(f"it resizes the short side to {resize_to} and then crops {crop}")
        img_size, crop_pct = crop_side, crop_side / resize_to
        if (
            math.floor(img_size / crop_pct) < resize_to
        ):  # one rounding step below: timm floors img_size/crop_pct
            crop_pct = math.nextafter(crop_pct, 0.0)
    else:
        img_size = square(size)
        if img_size is None or (crop is not None and square(crop) != img_size):
            return unsupported(f"it resizes to {size} and crops {crop}")
        crop_pct = 1.0
    if not cfg.get("do_normalize", True):
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    elif all(isinstance(cfg.get(k), int | float | Sequence) for k in ("image_mean", "image_std")):
        mean, std = (
            [float(v)] * 3 if isinstance(v, int | float) else [float(x) for x in v]
            for v in (cfg["image_mean"], cfg["image_std"])
        )
    else:
        return unsupported("it normalises without an image_mean and image_std")
    return {"img_size": img_size, "crop_pct": crop_pct, "interpolation": resample, "mean": mean, "std": std}


def arch_from_hf_config(config: Mapping, sd: Mapping[str, torch.Tensor], folder: Path) -> dict:
    """Our SwinTransformer arguments from a config.json and the weights (in our layout) beside it."""
    c = {**_SWIN_CONFIG_DEFAULTS, **config}

    def side(key: str) -> int:
        value = c[key]
        if isinstance(value, Sequence) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if not isinstance(value, int):
            raise CheckpointError(
                f"{folder}: {key} {value} is not square; swin-train's Swin takes square ones"
            )
        return value

    if c["hidden_act"] != _HIDDEN_ACT or c["layer_norm_eps"] != _LAYER_NORM_EPS:
        raise CheckpointError(
            f"{folder}: hidden_act '{c['hidden_act']}' and layer_norm_eps {c['layer_norm_eps']} differ from "
            f"swin-train's ('{_HIDDEN_ACT}', {_LAYER_NORM_EPS}); it cannot compute this model"
        )
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    labels = config.get("id2label")
    if isinstance(labels, Mapping) and labels and len(labels) != num_classes:
        raise CheckpointError(
            f"{folder}: config.json names {len(labels)} classes but the classifier has {num_classes}; "
            "the folder is inconsistent"
        )
    version = {model_type: v for v, model_type in HF_MODEL_TYPES.items()}[config.get("model_type")]
    pretrained = c.get("pretrained_window_sizes") or [0] * len(c["depths"])
    return dict(
        version=version,
        pretrained_window_sizes=[int(w) for w in pretrained] if version == 2 else None,
        img_size=side("image_size"),
        patch_size=side("patch_size"),
        in_chans=c["num_channels"],
        num_classes=num_classes,
        embed_dim=c["embed_dim"],
        depths=list(c["depths"]),
        num_heads=list(c["num_heads"]),
        window_size=c["window_size"],
        mlp_ratio=float(c["mlp_ratio"]),
        qkv_bias=bool(c["qkv_bias"]),
        ape=bool(c["use_absolute_embeddings"]),
        patch_norm=True,
    )


# our training rates and the names config.json gives them (hf_config writes them)
_RATE_NAMES = {
    "drop_rate": "hidden_dropout_prob",
    "attn_drop_rate": "attention_probs_dropout_prob",
    "drop_path_rate": "drop_path_rate",
}


def rates_from_hf_config(config: Mapping) -> dict[str, float]:
    """Dropout and stochastic-depth rates of a config.json (transformers' defaults where it has none)."""
    defaults = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.1}
    rates = {}
    for ours, theirs in _RATE_NAMES.items():
        value = config.get(theirs, defaults[theirs])
        if not isinstance(value, int | float) or not 0 <= value < 1:
            raise CheckpointError(f"config.json's {theirs} must be a number in [0, 1), got {value!r}")
        rates[ours] = float(value)
    return rates


def class_names_from_hf(config: Mapping, num_classes: int, folder: Path) -> list[str] | None:
    """Class names from id2label; None for transformers' placeholder names LABEL_i."""
    labels = config.get("id2label")
    if not num_classes or not isinstance(labels, Mapping):
        return None
    try:
        by_index = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise CheckpointError(f"{folder}: id2label keys must be class indices") from None
    if sorted(by_index) != list(range(num_classes)):
        raise CheckpointError(f"{folder}: id2label must name classes 0..{num_classes - 1}")
    names = [by_index[i] for i in range(num_classes)]
    return None if names == [f"LABEL_{i}" for i in range(num_classes)] else names
