"""Fine-tuning a Swin V2 at another window: the windows its position-bias offsets are normalised by.

A V2 block's position bias is an MLP of its relative offsets divided by (p - 1), p the stage's pre-training
window (`model.pretrained_window_sizes`; 0: the block's own window). Weights trained at window 8 and loaded
into a window-16 model that keeps p = 0 see every offset halved: the tables are silently renormalised, which
the official fine-tuning configs avoid by naming the pre-training window. `fit_pretrained_windows` takes the
windows from what the weights' file records, or warns when it records none.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from swin_train.checkpoint import object_tree
from swin_train.config import Config, config_from_dict
from swin_train.errors import SwinTrainError
from swin_train.models.convert import saved_pretrained_window, swin_version, unwrap_state_dict
from swin_train.models.hf import CONFIG_FILE, is_hf_folder
from swin_train.models.hf_layout import arch_from_hf_config
from swin_train.models.swin import SwinTransformer
from swin_train.simmim_weights import simmim_encoder

log = logging.getLogger("swin_train")

_COORDS_TABLE = re.compile(r"^layers\.(\d+)\.blocks\.0\.attn\.relative_coords_table$")


def stage_windows(**model_kwargs) -> list[int]:
    """Per stage, the window that normalises a V2 model's offsets: its pre-training window, else the stage's
    own window (shrunk to a map smaller than the window). Built on the meta device: no weights."""
    with torch.device("meta"):
        model = SwinTransformer(**model_kwargs)
    return [layer.blocks[0].attn.pretrained_window or layer.blocks[0].window for layer in model.layers]


def trained_windows(source: str | os.PathLike) -> tuple[int | None, list[int] | None]:
    """(Swin version, stage_windows of the model the weights were trained as) from what `source` records: a
    swin-train checkpoint's or export's config, a transformers folder's config.json, the official layout's
    relative_coords_table buffers. None for what it does not record (timm's and torchvision's files, bare
    weights), or cannot be read here (load_pretrained says why)."""
    path = Path(source)
    try:
        if is_hf_folder(path):
            config = json.loads((path / CONFIG_FILE).read_text())
            arch = arch_from_hf_config({**config, "id2label": None}, {}, path)
            return arch["version"], stage_windows(**arch) if arch["version"] == 2 else None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                stored = (f.metadata() or {}).get("config")
                keys = list(f.keys())
            if stored is not None:
                return _from_config(config_from_dict(json.loads(stored)))
            return (2 if swin_version(dict.fromkeys(keys)) == 2 else 1), None
        state = object_tree(path)  # no tensor data: the weights are read once, by load_pretrained
    except (OSError, ValueError, SwinTrainError, RuntimeError, KeyError, TypeError):
        return None, None
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        try:
            return _from_config(config_from_dict(state["config"]))
        except SwinTrainError:
            return None, None
    try:
        sd = unwrap_state_dict(state)
    except SwinTrainError:
        return None, None
    if (encoder := simmim_encoder(sd)) is not None:  # a SimMIM file records its encoder's buffers
        sd = encoder.weights
    if swin_version(sd) == 1:
        return 1, None
    tables = {int(m[1]): t for k, t in sd.items() if (m := _COORDS_TABLE.match(k))}
    if not tables or sorted(tables) != list(range(len(tables))):
        return 2, None
    return 2, [saved_pretrained_window(tables[i]) for i in range(len(tables))]


def _from_config(cfg: Config) -> tuple[int, list[int] | None]:
    kwargs = cfg.model_kwargs()
    return kwargs["version"], stage_windows(**kwargs) if kwargs["version"] == 2 else None


def fit_pretrained_windows(cfg: Config) -> None:
    """A Swin V2 fine-tune from `model.pretrained` normalises its offsets as the weights were trained: with
    model.pretrained_window_sizes unset (0), they are taken from the file when they differ from the model's
    own windows (logged); a file that does not record them, or set windows that differ, get a warning."""
    m = cfg.model
    if m.version != 2 or not m.pretrained:
        return
    version, theirs = trained_windows(m.pretrained)
    if version == 1:
        return  # V1 weights for a V2 model: load_pretrained refuses them
    ours = stage_windows(**cfg.model_kwargs())
    chosen = any(m.pretrained_window_sizes or ())
    if theirs is None:
        if not chosen:
            log.warning(
                "%s does not record the windows its Swin V2 position bias was trained with: offsets are "
                "normalised by this model's windows %s; if the weights were trained at another window, set "
                "model.pretrained_window_sizes to it (per stage)",
                m.pretrained,
                ours,
            )
        return
    if len(theirs) != len(ours) or theirs == ours:
        return  # another number of stages: load_pretrained names the misfit
    if chosen:
        log.warning(
            "model.pretrained_window_sizes=%s normalises offsets by %s, %s was trained with %s: its position "
            "bias is rescaled",
            m.pretrained_window_sizes,
            ours,
            m.pretrained,
            theirs,
        )
        return
    m.pretrained_window_sizes = theirs = [w if w > 1 else 0 for w in theirs]  # a window of 1: no offsets
    log.info(
        "model.pretrained_window_sizes=%s: the windows %s was trained with (this model's are %s), so that its "
        "position bias sees the offsets it learned; set model.pretrained_window_sizes to choose others",
        theirs,
        m.pretrained,
        ours,
    )


def over_trained_arch(own: dict, overrides: dict, always_partition: bool = False) -> dict:
    """SwinTransformer arguments `own` (a trained file's architecture) with `overrides` over them, as
    create_model(checkpoint=FILE, window_size=...) builds: a Swin V2 whose windows change (another window, or a
    backbone's `always_partition` where the classifier shrank a stage) keeps the ones its weights learned their
    offsets at (fit_pretrained_windows' rule), unless `overrides` set them."""
    arch = own | overrides
    if arch.get("version") != 2 or "pretrained_window_sizes" in overrides:
        return arch
    theirs, ours = stage_windows(**own), stage_windows(**{"always_partition": always_partition, **arch})
    if len(theirs) == len(ours) and theirs != ours:
        arch["pretrained_window_sizes"] = [w if w > 1 else 0 for w in theirs]  # a window of 1: no offsets
        log.info(
            "pretrained_window_sizes=%s: the windows the weights were trained with (this model's are %s)",
            arch["pretrained_window_sizes"],
            ours,
        )
    return arch
