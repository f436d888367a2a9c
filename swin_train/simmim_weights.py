"""SimMIM pre-training checkpoints as classifier weights: recognise them (official files and swin-train's), take
their encoder, and carry its bias tables to the fine-tuning window as the official fine-tuning does.

A SimMIM state dict (the official layout, which swin-train's pre-training writes too) holds
    encoder.<classifier keys, no head.*>   encoder.mask_token (1, 1, C)   decoder.0.weight / decoder.0.bias
and official files also the encoder's buffers (relative_position_index, attn_mask, V2's relative_coords_table).
The official fine-tuning (main_simmim_ft.py -> utils_simmim.load_pretrained) keeps the `encoder.` keys with the
prefix stripped, so the mask token and the decoder are never loaded and the classifier head keeps its
initialisation; remap_pretrained_keys_swin then interpolates every V1 bias table whose window differs with its
geometric-progression cubic spline (`models.simmim_remap`), drops the buffers (rebuilt for the new window),
renames V2's old `rpe_mlp` to `cpb_mlp`, and loads with strict=False. Swin V2 has no table: nothing to remap.
An absolute position embedding (ape) is loaded as it is there, so another patch grid fails in the official
code; here it is resized bicubically as for any other source (`loading.adapt_state_dict`).

Recognised by its keys: a swin-train SimMIM checkpoint also marks the task in its config, official files hold
no config we can read (the official trainer's checkpoints store a yacs CfgNode, a pickled object, which
`checkpoint.load_checkpoint` refuses as it refuses any pickle; the released weights are `{'model': ...}`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swin_train.checkpoint import load_checkpoint, object_tree
from swin_train.config import config_from_dict
from swin_train.errors import CheckpointError, ConfigError, SwinTrainError
from swin_train.models.convert import table_window, unwrap_state_dict
from swin_train.models.simmim_remap import remap_relative_position_bias_table

log = logging.getLogger("swin_train")

ENCODER_PREFIX = "encoder."
MASK_TOKEN = "encoder.mask_token"
DECODER_PREFIX = "decoder."
# the fine-tuning recipe of the official SimMIM Swin-B (the same recipe takes any of these files)
FINETUNE_RECIPE = "configs/simmim/simmim_finetune__swin_base__img224_window7__800ep.yaml"


@dataclass
class SimMIMEncoder:
    """The encoder of a SimMIM checkpoint: `weights` with `encoder.` stripped (the official buffers kept, for
    the loaders to drop or check as for any official file) and what was `dropped` (mask token, decoder)."""

    weights: dict[str, torch.Tensor]
    dropped: list[str]


def is_simmim_state_dict(sd: Mapping) -> bool:
    """A SimMIM model's state dict: `encoder.*` keys with the mask token or the pixel decoder."""
    return any(k.startswith(ENCODER_PREFIX) for k in sd) and (
        MASK_TOKEN in sd or f"{DECODER_PREFIX}0.weight" in sd
    )


def simmim_encoder(obj: Mapping) -> SimMIMEncoder | None:
    """The encoder of `obj` (a checkpoint, `{'model': sd}` or a state dict) if it is a SimMIM model, else None."""
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointError:
        return None  # not weights at all: the caller's own loading says so
    if not is_simmim_state_dict(sd):
        return None
    weights, dropped = {}, []
    for key, value in sd.items():
        if key.startswith(ENCODER_PREFIX) and key != MASK_TOKEN:
            # the official V2 release names the position-bias MLP rpe_mlp (renamed as the official loader does)
            weights[key.removeprefix(ENCODER_PREFIX).replace(".rpe_mlp.", ".cpb_mlp.")] = value
        else:
            dropped.append(key)
    return SimMIMEncoder(weights, dropped)


def encoder_arch(obj: Mapping, where: str) -> dict | None:
    """The encoder's SwinTransformer arguments (headless) from the config a swin-train checkpoint stores (None
    for an official file)."""
    stored = obj.get("config") if isinstance(obj, Mapping) else None
    if not isinstance(stored, Mapping):
        return None
    try:
        return config_from_dict(stored).model_kwargs() | {"num_classes": 0}
    except SwinTrainError as e:
        raise CheckpointError(f"the config stored in {where} is invalid: {e}") from None


def describe(encoder: SimMIMEncoder, where: str, model: nn.Module) -> str:
    """The log line of a SimMIM checkpoint loaded into `model` (a classifier, or a backbone: no head to name)."""
    head = isinstance(getattr(model, "head", None), nn.Linear)
    return (
        f"{where} is a SimMIM pre-training checkpoint: its encoder is loaded ('{ENCODER_PREFIX}' prefix "
        f"stripped), its mask token and decoder are left out ({', '.join(encoder.dropped)})"
        + (", and the classifier head starts from its initialisation" if head else "")
    )


def remap_bias_tables(
    sd: dict[str, torch.Tensor], model: nn.Module, interpolated: list[str]
) -> dict[str, torch.Tensor]:
    """`sd` (our layout) with each V1 bias table whose window differs from `model`'s carried to it the way the
    official SimMIM fine-tuning does (geometric-progression cubic spline); the keys are added to `interpolated`.

    Two interpolations exist because two official pipelines do: classification checkpoints are fine-tuned
    at another window with a bicubic resize of the table (utils.load_pretrained; `loading.adapt_state_dict`
    does it for every other source), SimMIM checkpoints with this remap (utils_simmim). Each source gets the
    one its own fine-tuning used, so the numbers are those of the official fine-tuning from that file. A
    table of window 2 or less (a stage shrunk to a 2 x 2 map) has too few offsets for the cubic spline (the
    official code fails there): it is left to the bicubic resize.
    """
    target = model.state_dict()
    out = dict(sd)
    for key, table in sd.items():
        want = target.get(key)
        if (
            not key.endswith("relative_position_bias_table")
            or want is None
            or table.ndim != 2
            or want.ndim != 2
            or table.shape[1] != want.shape[1]  # other heads: adapt_state_dict names the misfit
            or table.shape[0] == want.shape[0]
        ):
            continue
        src, dst = table_window(table, key), table_window(want, key)
        if src >= 3:
            out[key] = remap_relative_position_bias_table(table, src, dst)
            interpolated.append(key)
    return out


# ------------------------------------------------------------- the hooks in loading.py (one line each there)


def encoder_or_weights(obj: Mapping, where: str, model: nn.Module) -> tuple[Mapping, SimMIMEncoder | None]:
    """(what load_pretrained loads into `model`, the SimMIM encoder or None): a SimMIM checkpoint's encoder alone
    (logged), anything else as it is."""
    encoder = simmim_encoder(obj)
    if encoder is None:
        return obj, None
    log.info(describe(encoder, where, model))
    return encoder.weights, encoder


def fit_encoder(sd: dict[str, torch.Tensor], model: nn.Module, encoder: SimMIMEncoder | None, report) -> dict:
    """`sd` (our layout) made to fit `model` as the SimMIM fine-tuning does (remap_bias_tables), and the
    loading.LoadReport told what it is and what was left out; `sd` as it is for any other source."""
    if encoder is None:
        return sd
    report.layout, report.dropped = f"SimMIM encoder, {report.layout}", encoder.dropped
    return remap_bias_tables(sd, model, report.interpolated)


def refuse_pretraining(state: Mapping, where: str) -> None:
    """A classifier's loader (swin-eval, swin-predict) on a SimMIM checkpoint: one line on how to fine-tune it."""
    if simmim_encoder(state) is not None:
        raise pretraining_checkpoint_error(where)


def source_and_arch(checkpoint: str | os.PathLike) -> tuple:
    """(what create_model loads, its architecture arguments or None) for a file given without a variant name or
    every field: a SimMIM file's loaded checkpoint and its encoder's architecture (encoder_fields); anything else
    as given, with None."""
    if not is_simmim_file(checkpoint):
        return checkpoint, None
    state = load_checkpoint(checkpoint)
    return state, encoder_fields(state, str(checkpoint))


def pretraining_checkpoint_error(where: str) -> CheckpointError:
    """What a command that needs a classifier (swin-eval, swin-predict) says about a SimMIM checkpoint."""
    return CheckpointError(
        f"{where} is a SimMIM pre-training checkpoint (an encoder and a pixel decoder, no classifier head); "
        f"fine-tune it first with model.pretrained in a classification recipe, e.g. "
        f"swin-train --config {FINETUNE_RECIPE} model.pretrained={where}"
    )


def is_simmim_file(path: str | os.PathLike) -> bool:
    """Whether the file `path` holds a SimMIM model, read without its tensor data (`object_tree`; safetensors' keys);
    False for anything this cannot read (folders, legacy torch files): their own loader says what they are."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return is_simmim_state_dict(dict.fromkeys(f.keys()))
        try:
            state = object_tree(path)
        except RuntimeError:  # a legacy (not zip) torch file cannot be mapped: read it whole
            state = torch.load(path, map_location="cpu", weights_only=True)
        return is_simmim_state_dict(unwrap_state_dict(state))
    except Exception:  # noqa: BLE001 - any failure to read means "not recognised here", never an error
        return False


def encoder_fields(state: Mapping, where: str) -> dict:
    """SwinTransformer arguments for `create_model(checkpoint=SimMIM file)`: the encoder's own (its config;
    num_classes 0, a feature extractor); ConfigError for an official file, which records none."""
    arch = encoder_arch(state, where)
    if arch is None:
        raise ConfigError(
            f"{where} is an official SimMIM checkpoint, which holds no architecture: pass the classifier's "
            "variant name or fields, e.g. create_model('swin_base_patch4_window7_224', checkpoint=..., "
            "num_classes=N)"
        )
    return arch
