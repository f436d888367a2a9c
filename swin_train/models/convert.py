"""Checkpoint layouts: recognise official / timm / torchvision / swin-train state dicts and convert them.

Our layout is the official one without its derived buffers. The differences (see shared/REFERENCE.md):
- official: `layers.{i}.downsample` ends stage i; buffers `relative_position_index`, `attn_mask` saved.
- timm: the same names, but patch merging starts the next stage (`layers.{i+1}.downsample`), `head.fc`.
- torchvision: `features.0.{0,2}` patch embed, `features.{2i+1}.{j}` blocks (`mlp.0`/`mlp.3`),
  `features.{2i+2}` patch merging, flat `relative_position_index` buffers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from swin_train.errors import CheckpointError

LAYOUTS = ("swin-train", "official", "timm", "torchvision")
_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")
# Key patterns of our layout; anything else is unexpected.
_OUR_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)|absolute_pos_embed"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)"
    r"|norm\.(weight|bias)|head\.(weight|bias))$"
)


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: `{'model': sd}`, `{'state_dict': sd}` or `sd` itself, with the
    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes removed."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "the checkpoint holds no state dict of tensors (expected {'model': ...} or tensors)"
        )
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """'official' (with buffers), 'timm', 'torchvision' or 'swin-train' (official names, no buffers)."""
    keys = list(sd)
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if "head.fc.weight" in sd or "head.fc.bias" in sd:
        return "timm"
    downsample_stages = {int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    if downsample_stages and 0 not in downsample_stages:
        return "timm"  # headless timm state dict: merging starts stages 1.., never stage 0
    if any(k.endswith(_BUFFER_SUFFIXES) for k in keys):
        return "official"
    return "swin-train"


def _from_timm(key: str) -> str:
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
    return re.sub(r"^head\.fc\.", "head.", key)


def _from_torchvision(key: str) -> str:
    key = re.sub(r"^features\.0\.0\.", "patch_embed.proj.", key)
    key = re.sub(r"^features\.0\.2\.", "patch_embed.norm.", key)

    def stage(m: re.Match) -> str:
        index = int(m.group(1))
        if index % 2 == 1:  # blocks of stage (index-1)/2
            return f"layers.{(index - 1) // 2}.blocks."
        return f"layers.{index // 2 - 1}.downsample."

    key = re.sub(r"^features\.(\d+)\.", stage, key)
    key = key.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
    return key


def convert_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Any supported Swin checkpoint (or its state dict) -> a state dict in our layout.

    Derived buffers are dropped (they are rebuilt from the architecture). Keys that belong to no known
    layout raise CheckpointError naming them.
    """
    sd = unwrap_state_dict(obj)
    layout = detect_layout(sd)
    rename = {"timm": _from_timm, "torchvision": _from_torchvision}.get(layout, lambda k: k)
    out = {}
    for key, value in sd.items():
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        out[rename(key)] = value
    unexpected = [k for k in out if not _OUR_KEY.match(k)]
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        raise CheckpointError(f"not a Swin checkpoint in a known layout ({layout}?): unexpected keys {shown}")
    return out
