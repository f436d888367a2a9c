"""Hugging Face transformers' Swin: V1 (`SwinForImageClassification`, `SwinConfig`, model_type "swin") and V2
(`Swinv2ForImageClassification`, `Swinv2Config`, model_type "swinv2"): our weights as a folder that
`from_pretrained` loads, and such folders (ours, or the Hub's microsoft/swin-* and microsoft/swinv2-*) back.
This module reads and writes the folder; the name, config and preprocessing mappings are `hf_layout.py`.

A folder holds config.json (the SwinConfig, id2label from the class names), model.safetensors and
preprocessor_config.json (for AutoImageProcessor). Weights use transformers' file names, the ones its
`save_pretrained` writes and the Hub's checkpoints hold (transformers 5 renames V1's to its module names when
it loads; `from_hf_state_dict` reads both). V2's are under `swinv2.` where V1's are under `swin.`:

    ours                                  transformers
    patch_embed.proj, patch_embed.norm    swin.embeddings.patch_embeddings.projection, swin.embeddings.norm
    absolute_pos_embed                    swin.embeddings.position_embeddings
    layers.{i}.blocks.{j}.                swin.encoder.layers.{i}.blocks.{j}.
        norm1, norm2                          layernorm_before, layernorm_after (V2: after the branch, as ours)
        attn.qkv (rows q, k, v)               attention.self.query, .key, .value
        attn.relative_position_bias_table     attention.self.relative_position_bias_table
        attn.q_bias, attn.v_bias (V2)         attention.self.query.bias, .value.bias (V2 key: no bias)
        attn.logit_scale, attn.cpb_mlp (V2)   attention.self.logit_scale, .continuous_position_bias_mlp
        attn.proj                             attention.output.dense
        mlp.fc1, mlp.fc2                      intermediate.dense, output.dense
    layers.{i}.downsample (ends stage i)  swin.encoder.layers.{i}.downsample (ends stage i too)
    norm, head                            swin.layernorm, classifier

Each V1 block also gets its (N, N) `attention.self.relative_position_index`: transformers 4.x saves it as a
buffer, 5.x ignores it on load (V2's index and coordinate table are not saved; Swinv2Config's
pretrained_window_sizes rebuilds the table). transformers builds the shifted-window mask in its forward (the
same -100 regions as ours), so no mask is stored; the official layout's `attn_mask` buffers are dropped on the
way in. transformers' Swinv2 (5.x) adds that mask twice (-200 where ours and the official code add -100):
the softmax differs only where a masked logit comes within about 20 of its row's largest, which cosine logits
(at most the head's scale, capped at 100, plus 16) allow only for a head whose scale nears the cap and whose
masked pairs are almost parallel; the logits agree to 1e-4 at scales 10 and 100 with random weights (tested).

Refused (ConfigError), because transformers' Swin would compute something else: patch_norm=False (it always
normalises patches), an image size that is not a multiple of the patch (it pads), and in V1 a stage whose
token map is smaller than the window (ours shrinks the window and its bias table there; transformers' Swin
builds every table for the full window; its Swinv2 shrinks the window as ours). qkv_bias=False is represented
(SwinConfig.qkv_bias), and so is ape (use_absolute_embeddings) for V1 in transformers 5; transformers 4.27
(checked) and its Swinv2 allocate one position too many and cannot run such a model. model.attention
("auto"/"flex") only picks kernels: the weights are the same.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from swin_train.checkpoint import write_atomically
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.convert import check_fits
from swin_train.models.hf_layout import (
    HF_MODEL_TYPES,
    arch_from_hf_config,
    class_names_from_hf,
    from_hf_state_dict,
    hf_config,
    hf_preprocessor_config,
    model_arch,
    preprocess_from_hf,
    rates_from_hf_config,
    to_hf_state_dict,
)
from swin_train.models.swin import SwinTransformer

log = logging.getLogger("swin_train")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "preprocessor_config.json"
# What an export writes (or removes: a preprocessor_config.json of another model) in its folder
EXPORTED_FILES = (WEIGHTS_FILE, PROCESSOR_FILE, CONFIG_FILE)
# Weight files transformers writes, in the order it prefers them; an index file names the shards of a split save.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# ----------------------------------------------------------------------------------------------- files


def _write_json(path: Path, data: Mapping) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_hf_folder(
    model: SwinTransformer,
    out_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None,
    preprocess: dict | None,
    rates: Mapping[str, float] | None = None,
) -> None:
    """Write `model` as a folder for transformers' `SwinForImageClassification.from_pretrained` and
    `AutoImageProcessor.from_pretrained`: model.safetensors, preprocessor_config.json (without `preprocess`
    an older one is removed) and config.json, each atomically with mode 0644; config.json comes last, so a
    folder with one is complete. The folder is created; its parent must exist. `rates`: the dropout and
    stochastic-depth rates the model was trained with (drop_rate, attn_drop_rate, drop_path_rate), which
    config.json keeps for training in transformers; without them, SwinTransformer's defaults.

    ConfigError for a model transformers' Swin cannot compute as ours does (check_hf_compatible), class names
    that do not fit the head, or preprocessing it cannot describe.
    """
    from safetensors.torch import save_file

    arch = {**model_arch(model), **(rates or {})}
    config = hf_config(arch, class_names)
    processor = hf_preprocessor_config(preprocess) if preprocess is not None else None
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(model.state_dict(), arch).items()
    }
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; give a folder for the Hugging Face export")
    if not folder.parent.is_dir():
        raise CheckpointError(f"folder {folder.parent} does not exist; create it or change the output path")
    folder.mkdir(exist_ok=True)
    write_atomically(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if processor is not None:
        _write_json(folder / PROCESSOR_FILE, processor)
    elif (folder / PROCESSOR_FILE).exists():
        (folder / PROCESSOR_FILE).unlink()  # it described another model's preprocessing
        log.info("removed %s: no preprocessing was given for this model", folder / PROCESSOR_FILE)
    _write_json(folder / CONFIG_FILE, config)


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class HfCheckpoint:
    """A transformers Swin folder in our terms."""

    state_dict: dict[str, torch.Tensor]  # our layout
    arch: dict  # SwinTransformer(**arch)
    class_names: list[str] | None  # from id2label; None for transformers' placeholder names LABEL_i
    preprocess: dict | None  # from preprocessor_config.json; None without one or when ours cannot express it
    rates: dict  # dropout and stochastic depth for training (drop_rate, attn_drop_rate, drop_path_rate)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a Hugging Face model folder (a folder with a config.json), of any architecture."""
    folder = Path(path)
    return folder.is_dir() and (folder / CONFIG_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the Hugging Face folder is damaged") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds no JSON object; the Hugging Face folder is damaged")
    return data


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or torch file, loaded without running pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"cannot read {path} ({str(exc).splitlines()[0]}); it is damaged") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" (e.g. '{found.group(1)}')" if found else ""
        raise CheckpointError(
            f"refusing to load {path}: it needs pickled Python objects{what}, which could run code; "
            "only tensors are accepted"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read {path} ({str(exc).splitlines()[0]}); it is damaged") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return dict(sd)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights, from the first file transformers would take (a sharded save: all its shards)."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, Mapping) or not weight_map:
            raise CheckpointError(f"{path} has no weight_map; the Hugging Face folder is damaged")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or not (folder / shard).is_file():
                raise CheckpointError(f"{path} names shard '{shard}', which is not a file in {folder}")
            sd.update(_read_weight_file(folder / shard))
        return sd
    raise CheckpointError(
        f"{folder} has no weights ({', '.join(_WEIGHT_FILES)}); the Hugging Face folder is incomplete"
    )


def load_hf_folder(path: str | os.PathLike) -> HfCheckpoint:
    """Read a transformers Swin folder (config.json with model_type "swin" or "swinv2", model.safetensors or
    pytorch_model.bin, optional preprocessor_config.json): weights in our layout, the architecture, class
    names and preprocessing. CheckpointError for another architecture, missing or damaged files, and weights
    that do not fit the config."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; a Hugging Face model is a folder with a config.json"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; it is not a Hugging Face model folder")
    config = _read_json(folder / CONFIG_FILE)
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES.values():
        raise CheckpointError(
            f"{folder} holds a Hugging Face '{model_type}' model, not a Swin Transformer (model_type 'swin' "
            "or 'swinv2')"
        )
    sd = from_hf_state_dict(_read_weights(folder))
    arch = arch_from_hf_config(config, sd, folder)
    try:
        with torch.device("meta"):  # shapes only: checks that weights and config agree
            model = SwinTransformer(**arch)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{folder}: config.json describes no buildable Swin ({str(exc).splitlines()[0]})"
        ) from None
    check_fits(sd, model, where=f"the weights in {folder}")
    processor = folder / PROCESSOR_FILE
    preprocess = preprocess_from_hf(_read_json(processor), processor) if processor.is_file() else None
    names = class_names_from_hf(config, arch["num_classes"], folder)
    return HfCheckpoint(sd, arch, names, preprocess, rates_from_hf_config(config))
