"""The layouts of the official detection and segmentation code (Swin-Transformer-Object-Detection,
Swin-Transformer-Semantic-Segmentation, both on mmcv): reading their trained checkpoints, writing what they
load as `pretrained`.

Their backbone's names are ours (the official classifier's: `patch_embed.*`, `layers.{i}.blocks.{j}.*`,
`layers.{i}.downsample.*`, which ends stage i) without the final `norm.*` and `head.*`, plus a LayerNorm
`norm{i}.*` per output stage; it saves each block's `relative_position_index` (not its `attn_mask`, which it
computes per size) and holds `absolute_pos_embed` as (1, C, H, W) where we hold (1, H*W, C).
- mmdet / mmseg checkpoints: `{'state_dict': {'backbone.<backbone names>': ..., 'neck.*' / 'rpn_head.*' /
  'decode_head.*' ...: ...}, 'meta': ...}`; only `backbone.*` is Swin.
- `pretrained` for their configs: read by `mmcv_custom.load_checkpoint`, which takes `{'state_dict': sd}`,
  `{'model': sd}` or `sd`, reshapes a (1, L, C) `absolute_pos_embed` and interpolates bias tables.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from swin_train.errors import CheckpointError

from .swin import BLOCK_KEY, relative_position_index

BACKBONE_PREFIX = "backbone."
# what the classifier has and the detection backbone has not
CLASSIFIER_ONLY = ("norm.", "head.")


def is_detection_checkpoint(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is an mmdet / mmseg model's (Swin under `backbone.`)."""
    return any(key.startswith(BACKBONE_PREFIX) for key in sd)


def not_backbone_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of an mmdet / mmseg state dict outside its backbone (neck, heads): not ours to load."""
    return [key for key in sd if not key.startswith(BACKBONE_PREFIX)]


def from_detection(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmdet / mmseg state dict -> its backbone's tensors in our names (stage norms `norm{i}` kept, buffers
    left for convert_state_dict to drop), the absolute position embedding as (1, H*W, C)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(BACKBONE_PREFIX):
            out[key.removeprefix(BACKBONE_PREFIX)] = value
    embed = out.get("absolute_pos_embed")
    if embed is not None and embed.ndim == 4:  # (1, C, H, W) -> (1, H*W, C)
        out["absolute_pos_embed"] = embed.flatten(2).transpose(1, 2).contiguous()
    return out


def to_detection(sd: Mapping[str, torch.Tensor], window_size: int) -> dict[str, torch.Tensor]:
    """A state dict in our layout -> what the official detection / segmentation backbone loads as `pretrained`
    with only its stage norms `norm{i}` missing (unless `sd` has them): our names without the classifier's
    final norm and head, and each block's `relative_position_index` for `window_size` (that backbone's window
    in every stage: the detection rule). Swin V1 only: that code has no V2."""
    if any(".attn.logit_scale" in key for key in sd):
        raise CheckpointError(
            "the official detection and segmentation code has Swin V1 only, these are Swin V2 weights; "
            "export them as safetensors (swin-train reads them as a backbone: create_model(features_only=True))"
        )
    out = {key: value for key, value in sd.items() if not key.startswith(CLASSIFIER_ONLY)}
    index = relative_position_index(window_size)
    for block in sorted({m.group(0) for key in out if (m := BLOCK_KEY.match(key))}):
        out[f"{block}attn.relative_position_index"] = index.clone()
    return out
