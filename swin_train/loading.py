"""Turning a file into a model: the one way to load a trained model (`load_trained_model`: a swin-train
checkpoint or export with its config, class names and preprocessing), and loading foreign weights into a
model that may differ in window, image size or head (`load_pretrained`). It stands above models/, config.py
and checkpoint.py (the file format) and is what the commands, the run and `create_model(checkpoint=)` use.

`load_pretrained` does, and reports (nothing silent):
- converts the official / timm / torchvision / transformers layouts (`models/convert.py`, `models/hf.py`),
- takes a swin-train checkpoint's EMA weights instead of its model weights on request (`use_ema`),
- interpolates relative position bias tables bicubically when the window differs, table by table (each
  block's own (2w-1)x(2w-1) grid per head, align_corners=False: the official `load_pretrained` exactly),
  and absolute position embeddings when the patch grid differs,
- re-initialises the head when the number of classes differs, or selects head rows with a class map
  (22k -> 1k: one source class index per line, the official `map22kto1k.txt` format),
- refuses any other shape mismatch, naming the first mismatching key, and Swin V1 weights for a V2 model
  (or the reverse). Swin V2 weights need no interpolation at another window: its position bias is an MLP of
  the offsets, which the model computes for its own window (and pre-training window).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swin_train import simmim_weights
from swin_train.checkpoint import EXPORT_METADATA_KEYS, holds_trained_model, load_checkpoint, stored_task
from swin_train.config import ARCH_FIELDS, Config, config_from_dict, config_to_dict, load_config
from swin_train.data.transforms import Preprocess
from swin_train.errors import CheckpointError, ConfigError, SwinTrainError
from swin_train.models.backbone import build_backbone
from swin_train.models.convert import (
    check_fits,
    check_saved_geometry,
    check_version,
    convert_state_dict,
    detect_layout,
    infer_arch,
    unwrap_state_dict,
)
from swin_train.models.detection_layout import not_backbone_keys
from swin_train.models.hf import HfCheckpoint, is_hf_folder, load_hf_folder
from swin_train.models.registry import build_model, variant_arch
from swin_train.models.simmim import MaskedSwinEncoder, SimMIM, simmim_state_dict
from swin_train.models.swin import SwinTransformer
from swin_train.outputs import is_run_config
from swin_train.v2_windows import over_trained_arch

log = logging.getLogger("swin_train")
# what SwinTransformer cannot be built without: create_model's overrides lacking one go over a file's own
_ARGS = signature(SwinTransformer).parameters.values()
BUILD_FIELDS = {p.name for p in _ARGS if p.kind == p.KEYWORD_ONLY and p.default is p.empty}


@dataclass
class LoadReport:
    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # missing from the checkpoint or head replaced
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model: ignored
    dropped: list[str] = field(default_factory=list)  # a SimMIM checkpoint's mask token and decoder
    head_mapped: bool = False

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.layout} layout)"]
        if self.interpolated:
            parts.append(f"interpolated {len(self.interpolated)} ({_short(self.interpolated)})")
        if self.head_mapped:
            parts.append("selected head rows with the class map")
        if self.reinitialised:
            parts.append(f"re-initialised {len(self.reinitialised)} ({_short(self.reinitialised)})")
        if self.unexpected:
            parts.append(f"ignored {len(self.unexpected)} unexpected ({_short(self.unexpected)})")
        return "; ".join(parts)


def _short(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", +{len(names) - limit} more" if len(names) > limit else "")


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"cannot interpolate {what}: {n} entries do not form a square grid")
    return side


def resize_relative_position_bias_table(table: torch.Tensor, num_entries: int) -> torch.Tensor:
    """((2w-1)^2, heads) -> (num_entries, heads): bicubic on each head's (2w-1)x(2w-1) grid.

    Bit for bit the official `load_pretrained` (F.interpolate bicubic, align_corners=False, computed in
    float32), e.g. 169 rows (window 7) -> 529 rows (window 12).
    """
    old_side = _square_side(table.shape[0], "a relative position bias table")
    new_side = _square_side(num_entries, "a relative position bias table")
    heads = table.shape[1]
    grid = table.float().T.reshape(1, heads, old_side, old_side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def resize_absolute_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, L, C) on a square patch grid -> (1, H*W, C) on the (H, W) `grid`, bicubic (as official)."""
    old_side = _square_side(embed.shape[1], "the absolute position embedding")
    C = embed.shape[2]
    pixels = embed.float().reshape(1, old_side, old_side, C).permute(0, 3, 1, 2)
    pixels = F.interpolate(pixels, size=tuple(grid), mode="bicubic", align_corners=False)
    return pixels.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C).to(embed.dtype)


def read_class_map(path: str | Path) -> list[int]:
    """One source class index per line (the official map22kto1k.txt format)."""
    try:
        return [int(x) for x in Path(path).read_text().split()]
    except FileNotFoundError:
        raise CheckpointError(
            f"head map file {path} does not exist; give model.head_map a file of indices"
        ) from None
    except ValueError as e:
        raise CheckpointError(
            f"head map file {path} must hold one integer class index per line ({e})"
        ) from None


def adapt_state_dict(
    sd: dict[str, torch.Tensor],
    model: nn.Module,
    report: LoadReport,
    head_map: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Make a state dict in our layout fit `model`: interpolate, map or drop the head; record it all."""
    target = model.state_dict()
    out = {}
    head_keys = [k for k in sd if k.startswith("head.")]
    head_fits = all(k in target and target[k].shape == sd[k].shape for k in head_keys)
    if head_map is not None and not head_keys:
        raise CheckpointError(
            "a head map was given but the checkpoint has no classifier head; drop model.head_map"
        )
    if head_map is not None:
        num_source = sd["head.weight"].shape[0]
        bad = [i for i in head_map if not 0 <= i < num_source]
        if bad:
            raise CheckpointError(f"head map index {bad[0]} is outside the checkpoint's {num_source} classes")
        if "head.weight" in target and len(head_map) != target["head.weight"].shape[0]:
            num_classes = target["head.weight"].shape[0]
            raise CheckpointError(
                f"head map has {len(head_map)} entries but the model has {num_classes} classes; "
                "set model.num_classes to the number of lines in the map"
            )
        index = torch.tensor(head_map, dtype=torch.long)
        sd = {**sd, **{k: sd[k][index] for k in head_keys}}
        report.head_mapped = True
        head_fits = True
    for key, value in sd.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if key.startswith("head.") and not head_fits:
            continue  # left to the model's own initialisation, reported below
        if value.shape != want:
            # every block's table on its own: with a feature map smaller than the window, later blocks
            # shrink it, so tables of one model may differ in size
            if (
                key.endswith("relative_position_bias_table")
                and value.ndim == 2
                and value.shape[1:] == want[1:]
            ):
                value = resize_relative_position_bias_table(value, want[0])
                report.interpolated.append(key)
            elif key == "absolute_pos_embed" and value.ndim == 3 and value.shape[::2] == want[::2]:
                value = resize_absolute_pos_embed(value, model.stage_resolutions[0])
                report.interpolated.append(key)
            else:
                raise CheckpointError(
                    f"checkpoint tensor '{key}' has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(want)}; check that the model architecture matches the checkpoint"
                )
        out[key] = value
    report.loaded = [k for k in out if k not in report.interpolated]
    report.reinitialised = [k for k in target if k not in out]
    return out


def select_weights(obj: Mapping, use_ema: bool = False, source: str = "the checkpoint") -> Mapping:
    """The part of a checkpoint to load: `obj` itself (its "model"), or with `use_ema` a swin-train
    checkpoint's EMA weights `obj["ema"]["module"]`."""
    if not use_ema:
        return obj
    ema = obj.get("ema") if isinstance(obj, Mapping) else None
    if ema is None:
        raise CheckpointError(
            f"{source} holds no EMA weights (trained without train.ema, or not a swin-train checkpoint); "
            "load it without --ema"
        )
    if not isinstance(ema, Mapping) or not isinstance(ema.get("module"), Mapping):
        raise CheckpointError(
            f"{source} has an 'ema' entry without 'module' weights; it is not a swin-train checkpoint"
        )
    return ema["module"]


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping,
    *,
    head_map: str | Path | None = None,
    strict: bool = False,
    use_ema: bool = False,
    name: str | None = None,
) -> LoadReport:
    """Load weights into `model` from a file (.pth or .safetensors) or a loaded checkpoint / state dict,
    adapting window, grid and head; log a summary and return it.

    strict=True (evaluation) requires every model tensor to come from the checkpoint (interpolation allowed)
    and the buffers saved with it to agree with the model's blocks where the window is the same
    (check_saved_geometry). use_ema=True takes a swin-train checkpoint's EMA weights (CheckpointError if it
    has none). `name`: what messages call the source (default: the file, or "state dict").
    """
    is_file = isinstance(source, str | Path)
    name = name or (str(source) if is_file else "state dict")
    if is_file and is_hf_folder(source):
        if use_ema:
            raise CheckpointError(
                f"{source} is a Hugging Face folder, which holds no EMA weights; drop --ema"
            )
        obj, layout, encoder = load_hf_folder(source).state_dict, "transformers", None
    else:
        obj = load_checkpoint(source) if is_file else source
        obj = select_weights(obj, use_ema, f"checkpoint {source}" if is_file else "the checkpoint")
        obj, encoder = simmim_weights.encoder_or_weights(obj, name, model)  # a SimMIM file: its encoder
        layout = detect_layout(unwrap_state_dict(obj))
    report = LoadReport(source=name + (" (EMA)" if use_ema else ""), layout=layout)
    if layout == "mmdet":  # a detection / segmentation model: its neck and heads are ignored (and counted)
        report.unexpected = not_backbone_keys(unwrap_state_dict(obj))
    converted = simmim_weights.fit_encoder(convert_state_dict(obj), model, encoder, report)  # its own remap
    check_version(converted, model, report.source)
    if strict:
        check_saved_geometry(unwrap_state_dict(obj), model, report.source)
    class_map = read_class_map(head_map) if head_map is not None else None
    sd = adapt_state_dict(converted, model, report, class_map)
    if strict and "head.weight" in report.reinitialised and "head.weight" in converted:
        classes = converted["head.weight"].shape[0]
        raise CheckpointError(
            f"the head of {report.source} has {classes} classes, the model {model.num_classes}: "
            f"pass model.num_classes={classes}"
        )
    if strict and (report.reinitialised or report.unexpected):
        missing = report.reinitialised or report.unexpected
        kind = "missing from" if report.reinitialised else "unexpected in"
        raise CheckpointError(
            f"{len(missing)} tensors {kind} {report.source} (e.g. '{missing[0]}'); "
            "the checkpoint does not match this model (check --model / --config)"
        )
    model.load_state_dict(sd, strict=False)
    log.info(report.summary())
    return report


# -------------------------------------------------------------------------------------- trained models


@dataclass
class TrainedModel:
    """A trained model ready to run: eval mode, on the CPU, with what it was trained on."""

    model: torch.nn.Module
    config: Config
    class_names: list[str]
    preprocess: Preprocess
    source: str


def load_trained_model(source: str | os.PathLike | dict, *, ema: bool = False) -> TrainedModel:
    """The one way to load a trained model: from a training checkpoint (`ema`: its EMA weights) or a
    safetensors export that carries its config, class names and preprocessing. Used by swin-eval,
    swin-predict, swin-export and `create_model(checkpoint=...)`; a run's resume loads the same weights
    through the same checks. A Hugging Face Swin folder gives its config.json's architecture, id2label's
    class names (transformers' LABEL_i without them) and preprocessor_config.json's preprocessing."""
    where = "the checkpoint" if isinstance(source, dict) else str(source)
    if not isinstance(source, dict) and is_hf_folder(source):
        return _trained_from_hf(source, ema)
    state = source if isinstance(source, dict) else load_checkpoint(source)
    simmim_weights.refuse_pretraining(state, where)
    if not holds_trained_model(state):
        raise CheckpointError(
            f"{where} is not a swin-train checkpoint or export (no config, class names and preprocessing); bare "
            "weights need their architecture: --model NAME (swin-eval), a name or every field (create_model)"
        )
    absent = [k for k in ("model", *EXPORT_METADATA_KEYS) if k not in state]
    if absent:
        raise CheckpointError(f"swin-train checkpoint {where} lacks {', '.join(absent)}; it is damaged")
    try:
        cfg = config_from_dict(state["config"])
    except SwinTrainError as e:
        raise CheckpointError(f"the config stored in {where} is invalid: {e}") from None
    class_names = [str(c) for c in state["class_names"]]
    if len(class_names) != cfg.model.num_classes:
        raise CheckpointError(
            f"{where} names {len(class_names)} classes but its model has {cfg.model.num_classes}; it is damaged"
        )
    weights = select_weights(state, True, where) if ema else state["model"]
    model = SwinTransformer(**cfg.model_kwargs() | {"grad_checkpointing": False})
    load_exact_weights(model, weights, where)
    preprocess = Preprocess.from_dict(state["preprocess"], where)
    return TrainedModel(model.eval(), cfg, class_names, preprocess, where + (" (EMA)" if ema else ""))


def _trained_from_hf(source: str | os.PathLike, ema: bool) -> TrainedModel:
    if ema:
        raise CheckpointError(f"{source} is a Hugging Face folder, which holds no EMA weights; drop --ema")
    hf = load_hf_folder(source)
    cfg = config_of_hf_folder(hf, source)
    model = SwinTransformer(**cfg.model_kwargs() | {"grad_checkpointing": False})
    load_exact_weights(model, hf.state_dict, str(source))
    names = hf.class_names or [f"LABEL_{i}" for i in range(cfg.model.num_classes)]  # transformers' own
    return TrainedModel(model.eval(), cfg, names, Preprocess.from_config(cfg), str(source))


def load_exact_weights(model: torch.nn.Module, weights: dict, where: str) -> None:
    """Load weights that must fit `model` exactly (our layout, every key and shape), naming the first misfit."""
    check_fits(weights, model, where)
    model.load_state_dict(weights)


def create_model(
    name: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    frozen_stages: int = -1,
    **overrides,
) -> nn.Module:
    """A Swin Transformer from a variant name and/or architecture fields, or a trained one from a file.

    `create_model("swin_tiny_patch4_window7_224", num_classes=10, drop_path_rate=0.2)`;
    `create_model(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=32, patch_size=2, window_size=4)`;
    `create_model(checkpoint="output/run/best.pth", num_classes=3)`: a swin-train checkpoint or export (or a
    SimMIM pre-training run's encoder, num_classes 0) in its own architecture, `overrides` over it; with a name
    or every field, `checkpoint` may hold weights of any supported layout, adapted (`load_pretrained`).
    `features_only=True`: the backbone (models/backbone.py: `out_indices`, `frozen_stages`), fresh stage norms logged.
    """
    if not features_only and (out_indices is not None or frozen_stages != -1):
        raise ConfigError("out_indices and frozen_stages are the backbone's: pass features_only=True")
    trained, source = None, checkpoint
    if checkpoint is not None and name is None and not BUILD_FIELDS <= overrides.keys():  # its architecture
        source, own = simmim_weights.source_and_arch(checkpoint)
        if own is None:  # not SimMIM: a swin-train checkpoint, export or HF folder
            trained = load_trained_model(checkpoint)
            if not features_only and not overrides:
                return trained.model
            own = trained.config.model_kwargs()
        overrides = over_trained_arch(own, overrides, always_partition=features_only)
    if features_only:
        model = build_backbone(name, out_indices=out_indices, frozen_stages=frozen_stages, **overrides)
    else:
        model = build_model(name, **overrides)
    if checkpoint is not None:
        load_pretrained(model, trained.model.state_dict() if trained else source, name=str(checkpoint))
    return model


def create_simmim(
    name_or_fields: str | Mapping | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    norm_target: int | None = None,
    **overrides,
) -> SimMIM:
    """A SimMIM pre-training model (models/simmim.py) whose `forward(images, mask)` is the official loss.

    `create_simmim("swinv2_base_patch4_window12_192_22k", norm_target=47)`; `create_simmim({"embed_dim": 32,
    ...})`; `checkpoint`: SimMIM weights, ours or the official `{'model': ...}` files; a swin-train pre-training
    checkpoint alone (no name or fields) brings its own architecture and norm_target."""
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if name_or_fields is None:
        if state is None or stored_task(state) != "simmim":
            raise ConfigError(
                "create_simmim needs a variant name or architecture fields, or a swin-train pre-training "
                "checkpoint (task: simmim) that carries its own"
            )
        cfg = config_from_dict(state["config"])
        arch, norm_target = cfg.model_kwargs(), norm_target or cfg.simmim.norm_target
    elif isinstance(name_or_fields, str):
        try:
            arch = variant_arch(name_or_fields)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    else:
        arch = dict(name_or_fields)
    model = SimMIM(MaskedSwinEncoder(**{**arch, **overrides}), norm_target)
    if state is not None:
        weights = simmim_state_dict(state)
        if not any(key.startswith("encoder.") for key in weights):
            raise CheckpointError(
                f"{checkpoint} holds classifier weights, not SimMIM's (encoder.*, decoder.*); load it with "
                "create_model"
            )
        load_exact_weights(model, weights, str(checkpoint))
    return model


# ------------------------------------------------------------------------------------- for the commands

# what fixes the weights' shapes: a trained checkpoint's are not changed by --config or overrides
ARCH_KEYS = (*ARCH_FIELDS, "img_size", "num_classes", "ape", "patch_norm", "qkv_bias", "mlp_ratio")
# the image size of bare V1 weights, whose tables fix only the window: the official 224/w7 and 384/w12
_IMG_SIZE_BY_WINDOW = {7: 224, 12: 384}


def load_for_evaluation(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
    ema: bool = False,
    data_path: str | None = None,
) -> tuple[nn.Module, Config, list[str] | None]:
    """(model with weights, config, class names or None) for swin-eval. A swin-train checkpoint or export
    carries its own architecture, class names and preprocessing (a config or overrides may change the rest,
    not the architecture); bare weights take them from the variant `model_name` (--model) or `config`
    (--config); a transformers folder from its config.json and preprocessor_config.json. `data_path`
    (--data-path) replaces the config's; data sources the user did not type that come from a file (the
    checkpoint's config, a run folder's config.yaml) are only plain local paths (data.build.check_stored_paths)."""
    overrides = list(overrides)
    if is_hf_folder(source):
        if ema or model_name:
            raise ConfigError(
                f"{source} is a Hugging Face folder with its own architecture and no EMA weights; "
                "drop --model / --ema"
            )
        hf = load_hf_folder(source)
        cfg = config_of_hf_folder(hf, source, config, overrides)
        model = SwinTransformer(**cfg.model_kwargs())
        load_exact_weights(model, hf.state_dict, str(source))
        model, class_names, stored = model.eval(), hf.class_names, None
    else:
        state = load_checkpoint(source)
        if holds_trained_model(state):
            model, cfg, class_names = _trained_for_evaluation(
                state, source, config, model_name, overrides, ema
            )
            stored = None if config else f"the config stored in {source}"
        else:
            model, cfg, class_names = _bare_for_evaluation(state, source, config, model_name, overrides, ema)
            stored = None
    if data_path:
        cfg.data.data_path = data_path
    if stored is None and config and is_run_config(config):
        stored = str(config)
    if stored:
        from swin_train.data.build import DATA_SOURCE_KEYS, check_stored_paths, typed_keys

        typed = typed_keys(overrides) | ({"data.data_path"} if data_path else set())
        check_stored_paths(cfg, stored, typed, DATA_SOURCE_KEYS)  # evaluation reads only data
    return model, cfg, class_names


def _trained_for_evaluation(state, source, config, model_name, overrides, ema):
    trained = load_trained_model(state, ema=ema)
    own = trained.config.model_kwargs()
    if model_name:
        arch = variant_arch(model_name)
        differs = [f"{k} {own[k]} (--model: {arch[k]})" for k in arch if _plain(own[k]) != _plain(arch[k])]
        if differs:
            raise ConfigError(
                f"{source} is a swin-train checkpoint with its own architecture, which --model "
                f"{model_name} contradicts ({'; '.join(differs[:3])}); drop --model"
            )
    base = None if config else config_to_dict(trained.config)
    if base is not None:  # what training read its weights from: done, the weights hold it
        base["model"].update(pretrained=None, head_map=None)
    cfg = load_config(config, overrides, base=base)
    changed = {k for k, v in cfg.model_kwargs().items() if k in ARCH_KEYS and v != own[k]}
    if changed:
        raise ConfigError(
            f"{source} carries its own architecture; the config or overrides change "
            f"{', '.join(sorted(changed))}: drop them"
        )
    return trained.model, cfg, trained.class_names


def _bare_for_evaluation(state, source, config, model_name, overrides, ema):
    if model_name:
        overrides.append(f"model.name={model_name}")
    if config:
        cfg = load_config(config, overrides)
    elif model_name:  # bare weights of a named variant: its image size and the official eval crop
        img_size = variant_arch(model_name)["img_size"]
        crop = 1.0 if img_size == 384 else 0.875  # the official configs crop except at 384
        cfg = load_config(None, [f"data.img_size={img_size}", f"eval.crop_pct={crop}", *overrides])
    else:
        raise ConfigError(f"{source} holds bare weights without a config; pass --model NAME or --config YAML")
    model = SwinTransformer(**cfg.model_kwargs())
    load_pretrained(model, state, strict=True, use_ema=ema, name=str(source))
    return model, cfg, None


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# preprocessor_config.json's settings, as config keys and Preprocess fields
_HF_PREPROCESS_KEYS = {
    "eval.crop_pct": "crop_pct",
    "data.interpolation": "interpolation",
    "data.mean": "mean",
    "data.std": "std",
}


def config_of_hf_folder(hf: HfCheckpoint, source, config=None, overrides: Sequence[str] = ()) -> Config:
    """The config of a transformers Swin folder: the architecture from its config.json, which `config` and
    `overrides` may not change (ConfigError), the eval preprocessing from its preprocessor_config.json, which
    they may (said in the log), the rest from `config` and `overrides`."""
    arch = dict(hf.arch)
    hf_overrides = [
        f"data.img_size={arch.pop('img_size')}",
        *(f"model.{k}={json.dumps(v)}" for k, v in (arch | hf.rates).items()),
    ]
    if hf.preprocess:
        hf_overrides += [
            f"{key}={json.dumps(hf.preprocess[name])}" for key, name in _HF_PREPROCESS_KEYS.items()
        ]
    cfg = load_config(config, [*hf_overrides, *overrides])
    ours = cfg.model_kwargs()
    changed = [k for k in ARCH_KEYS if k in hf.arch and _plain(ours[k]) != _plain(hf.arch[k])]
    if changed:
        shown = "; ".join(f"{k} {hf.arch[k]} -> {ours[k]}" for k in changed[:3])
        raise ConfigError(
            f"{source} carries its own architecture (config.json), which the overrides change ({shown}); "
            "drop them"
        )
    if not hf.preprocess:
        log.warning(
            "%s has no preprocessor_config.json swin-train can follow: it is fed as the config says "
            "(crop_pct %s, %s, mean %s, std %s)",
            source,
            cfg.eval.crop_pct,
            cfg.data.interpolation,
            cfg.data.mean,
            cfg.data.std,
        )
    else:
        mine = Preprocess.from_config(cfg).to_dict()
        for key, name in _HF_PREPROCESS_KEYS.items():
            if _plain(mine[name]) != _plain(hf.preprocess[name]):
                log.warning(
                    "%s=%s replaces %s's preprocessor_config.json (%s)",
                    key,
                    mine[name],
                    source,
                    hf.preprocess[name],
                )
    return cfg


def bare_model(sd: dict, img_size: int | None, name: str | None, device: str = "meta"):
    """A model for bare weights, its architecture read off them (and the variant `name`'s window, image size
    and pre-training windows); on the meta device by default (shapes and block geometry only: checks the fit,
    gives the official buffers, costs no initialisation)."""
    arch = infer_arch(sd)
    if name is not None:
        try:
            arch.update(variant_arch(name))  # the weights must then fit it (check_fits names what does not)
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"") + "; pass --model with a known name") from None
    elif arch["version"] == 2:
        raise ConfigError(
            "Swin V2 weights are read without their window and pre-training windows (V2 has no bias table to "
            "read them from); pass --model NAME, "
            "e.g. --model swinv2_tiny_patch4_window8_256"
        )
    if img_size is not None:
        arch["img_size"] = img_size
    elif "img_size" not in arch:
        if arch["window_size"] not in _IMG_SIZE_BY_WINDOW:
            raise ConfigError(f"the weights use window {arch['window_size']}; pass --img-size")
        arch["img_size"] = _IMG_SIZE_BY_WINDOW[arch["window_size"]]
    try:
        with torch.device(device):
            return SwinTransformer(**arch)
    except (RuntimeError, ValueError) as e:  # e.g. a feature map that windows do not tile
        raise ConfigError(
            f"cannot build the model at image size {arch['img_size']} (window {arch['window_size']}): "
            f"{str(e).splitlines()[0]}; check --img-size"
        ) from None
