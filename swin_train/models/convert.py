"""Checkpoint layouts: recognise official / timm / torchvision / swin-train state dicts and convert them,
in both directions (`convert_state_dict` reads any layout, `to_layout` writes one, `save_weights` a file).

Our layout is the official one without its derived buffers. The differences:
- official: `layers.{i}.downsample` ends stage i; buffers `relative_position_index`, `attn_mask` (and V2's
  `relative_coords_table`) saved.
- timm: the same names, but patch merging starts the next stage (`layers.{i+1}.downsample`), `head.fc`;
  its index/mask/coordinate buffers are non-persistent (not saved).
- torchvision: `features.0.{0,2}` patch embed, `features.{2i+1}.{j}` blocks (`mlp.0`/`mlp.3`),
  `features.{2i+2}` patch merging, flat `relative_position_index` buffers (persistent); its V2 saves
  `relative_coords_table` too and holds one `qkv.bias` whose key third it zeroes in its forward, where ours
  (and the official) have `q_bias` and `v_bias`.
Swin V2 weights (any layout) are told apart by their attention's `logit_scale` and `cpb_mlp` (`swin_version`);
they do not hold their window (V2 has no bias table), so writing a V2 layout that stores window-sized buffers
(official, torchvision) needs the model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from swin_train.errors import CheckpointError
from swin_train.models.attention import log_spaced_coords
from swin_train.models.detection_layout import from_detection, is_detection_checkpoint, to_detection
from swin_train.models.swin import (
    BLOCK_KEY,
    DOWNSAMPLE_KEY,
    SwinBlock,
    relative_position_index,
    shifted_window_mask,
)

LAYOUTS = ("swin-train", "official", "timm", "torchvision")
EXPORT_FORMATS = ("safetensors", "timm", "torchvision", "official", "detection")
_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "relative_coords_table")
# Key patterns of our layout; anything else is unexpected.
_OUR_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)|absolute_pos_embed"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table"
    r"|layers\.\d+\.blocks\.\d+\.attn\.(q_bias|v_bias|logit_scale|cpb_mlp\.0\.(weight|bias)|cpb_mlp\.2\.weight)"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)"
    r"|norm\d*\.(weight|bias)|head\.(weight|bias))$"  # norm{i}: a backbone's stage norms (backbone.py)
)
# What only Swin V2's attention has (any layout): its per-head logit scale and position bias MLP
_V2_KEY = re.compile(r"attn\.(logit_scale|cpb_mlp\.)")


def swin_version(sd: Mapping[str, torch.Tensor]) -> int:
    """2 for Swin V2 weights (cosine attention: logit_scale, cpb_mlp), else 1."""
    return 2 if any(_V2_KEY.search(k) for k in sd) else 1


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
    """'official' (with buffers), 'timm', 'torchvision', 'mmdet' (a detection or segmentation model) or
    'swin-train' (official names, no buffers)."""
    keys = list(sd)
    if is_detection_checkpoint(sd):
        return "mmdet"
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if "head.fc.weight" in sd or "head.fc.bias" in sd:
        return "timm"
    downsample_stages = {int(m.group(1)) for k in keys if (m := DOWNSAMPLE_KEY.match(k))}
    if downsample_stages and 0 not in downsample_stages:
        return "timm"  # headless timm state dict: merging starts stages 1.., never stage 0
    if any(k.endswith(_BUFFER_SUFFIXES) for k in keys):
        return "official"
    return "swin-train"


def _from_timm(key: str) -> str:
    key = DOWNSAMPLE_KEY.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
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
    layout raise CheckpointError naming them. Of an mmdet / mmseg model, only its backbone is read.
    """
    sd = unwrap_state_dict(obj)
    layout = detect_layout(sd)
    if layout == "mmdet":
        sd = from_detection(sd)
    rename = {"timm": _from_timm, "torchvision": _from_torchvision}.get(layout, lambda k: k)
    out = {}
    for key, value in sd.items():
        if key.endswith(_BUFFER_SUFFIXES):
            continue
        out[rename(key)] = value
    if layout == "torchvision" and swin_version(out) == 2:
        out = _split_qkv_bias(out)
    unexpected = [k for k in out if not _OUR_KEY.match(k)]
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        raise CheckpointError(f"not a Swin checkpoint in a known layout ({layout}?): unexpected keys {shown}")
    return out


def _split_qkv_bias(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's V2 `attn.qkv.bias` (3C) -> our `attn.q_bias` and `attn.v_bias`; its key third is unused
    (torchvision zeroes it in the forward, as the official code has no key bias)."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace(".qkv.bias", ".q_bias")], out[key.replace(".qkv.bias", ".v_bias")] = q, v
        else:
            out[key] = value
    return out


def _join_qkv_bias(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of _split_qkv_bias: q_bias, zeros, v_bias as one `attn.qkv.bias`, where q_bias stood."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".attn.q_bias"):
            v_bias = sd[key.replace(".q_bias", ".v_bias")]
            out[key.replace(".q_bias", ".qkv.bias")] = torch.cat((value, torch.zeros_like(value), v_bias))
        elif not key.endswith(".attn.v_bias"):
            out[key] = value
    return out


# ------------------------------------------------------------------------------------ our layout -> theirs


def _to_timm(key: str) -> str:
    key = DOWNSAMPLE_KEY.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
    return re.sub(r"^head\.", "head.fc.", key)


def _to_torchvision(key: str) -> str:
    key = re.sub(r"^patch_embed\.proj\.", "features.0.0.", key)
    key = re.sub(r"^patch_embed\.norm\.", "features.0.2.", key)
    key = BLOCK_KEY.sub(lambda m: f"features.{2 * int(m.group(1)) + 1}.{m.group(2)}.", key)
    key = DOWNSAMPLE_KEY.sub(lambda m: f"features.{2 * int(m.group(1)) + 2}.", key)
    return key.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.3.")


def table_window(table: torch.Tensor, key: str = "relative_position_bias_table") -> int:
    """Window size w of a ((2w-1)^2, heads) relative position bias table."""
    side = math.isqrt(table.shape[0])
    if table.ndim != 2 or side * side != table.shape[0] or side % 2 == 0:
        raise CheckpointError(
            f"'{key}' has shape {tuple(table.shape)}, not ((2w-1)^2, heads); it is not a Swin table"
        )
    return (side + 1) // 2


def check_version(sd: Mapping[str, torch.Tensor], model: nn.Module, where: str = "the weights") -> None:
    """CheckpointError when Swin V1 weights meet a Swin V2 model or the reverse: no tensor of one fits the
    other's attention, so nothing is loaded partly."""
    theirs, ours = swin_version(sd), getattr(model, "version", 1)
    if theirs != ours:
        hint = "a swinv2_ variant or model.version=2" if theirs == 2 else "a swin_ variant or model.version=1"
        raise CheckpointError(
            f"{where} holds Swin V{theirs} weights but the model is Swin V{ours}; load them into a Swin "
            f"V{theirs} model ({hint})"
        )


def check_fits(sd: Mapping[str, torch.Tensor], model: nn.Module, where: str = "the weights") -> None:
    """CheckpointError naming the first tensor whose name or shape differs from `model.state_dict()` (or the
    two Swin versions, when they differ)."""
    check_version(sd, model, where)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in sd:
            raise CheckpointError(f"{where} does not fit this model: it has no '{key}'; check the config")
        if sd[key].shape != tensor.shape:
            raise CheckpointError(
                f"{where} does not fit this model: '{key}' has shape {tuple(sd[key].shape)}, the model "
                f"{tuple(tensor.shape)}; check the config (model section, data.img_size)"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise CheckpointError(f"{where} does not fit this model: unexpected '{extra[0]}'; check the config")


def _block_windows(sd: Mapping[str, torch.Tensor], model: nn.Module | None) -> set[int]:
    """The windows of the blocks: the model's, else read off V1's bias tables."""
    if model is not None:
        return {block.window for block in model.modules() if isinstance(block, SwinBlock)}
    return {table_window(v, k) for k, v in sd.items() if k.endswith("relative_position_bias_table")}


def _check_foreign(sd: Mapping[str, torch.Tensor], layout: str, model: nn.Module | None) -> None:
    """timm's and torchvision's Swin always normalise patches and have no absolute position embedding;
    torchvision also uses one window in every stage (it pads where ours and the official code shrink it)."""
    if "absolute_pos_embed" in sd:
        raise CheckpointError(
            f"{layout}'s Swin has no absolute position embedding (ape); "
            "export these weights as safetensors or official"
        )
    if "patch_embed.norm.weight" not in sd:
        raise CheckpointError(
            f"{layout}'s Swin always normalises patches; "
            "export these weights (patch_norm=False) as safetensors or official"
        )
    if layout == "torchvision" and len(windows := _block_windows(sd, model)) > 1:
        raise CheckpointError(
            f"torchvision's Swin uses one window in every stage, these weights use {sorted(windows)} "
            "(a feature map smaller than the window shrinks it); export them as safetensors or official"
        )


def block_buffers(model: nn.Module, flat_index: bool = False) -> dict[str, torch.Tensor]:
    """The buffers the official model saves (ours are non-persistent): each block's (N, N)
    `attn.relative_position_index` ((N*N,) with `flat_index`, as torchvision has it), for shifted blocks its
    (num_windows, N, N) `attn_mask`, and in V2 its (1, 2w-1, 2w-1, 2) `attn.relative_coords_table`.

    Computed from each block's window, shift, resolution and pre-training window exactly as SwinBlock.__init__
    does, so a model built on the meta device (no weight initialisation, which takes seconds for Swin-L on a
    CPU) will do.
    """
    out = {}
    for name, block in model.named_modules():
        if isinstance(block, SwinBlock):
            index = relative_position_index(block.window)
            out[f"{name}.attn.relative_position_index"] = index.flatten() if flat_index else index
            if block.shift:
                out[f"{name}.attn_mask"] = shifted_window_mask(*block.resolution, block.window, block.shift)
            if block.post_norm:  # V2
                side = 2 * block.window - 1
                coords = log_spaced_coords(block.window, block.attn.pretrained_window)
                out[f"{name}.attn.relative_coords_table"] = coords.view(1, side, side, 2)
    return out


def saved_pretrained_window(table: torch.Tensor) -> int:
    """The pre-training window p a saved (1, 2w-1, 2w-1, 2) V2 `relative_coords_table` was normalised by (w
    itself for p = 0): the offset +1 is stored as log2(1 + 8 / (p - 1)) / log2(8) (log_spaced_coords)."""
    side = table.shape[1]
    if side < 3:  # a window of 1 has only the offset 0: nothing to tell
        return 1
    value = float(table[0, side // 2, side // 2 + 1, 1])  # offset (0, +1)
    return round(1 + 8 / (2 ** (value * math.log2(8)) - 1))


def check_saved_geometry(raw: Mapping[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """CheckpointError when the buffers saved with the weights (official and torchvision layouts) show that a
    block of `model` at the same window computes something else than it did: V2 offsets normalised by another
    pre-training window, or torchvision's window at a stage smaller than it, which torchvision pads where
    we (and the official code) shrink the window. convert_state_dict drops these buffers; a model that
    must give the checkpoint's own outputs (evaluation, export) checks them first."""
    layout = detect_layout(raw)
    if layout not in ("official", "torchvision"):
        return
    rename = _from_torchvision if layout == "torchvision" else (lambda k: k)
    saved = {rename(k): v for k, v in raw.items() if k.endswith(_BUFFER_SUFFIXES)}
    for name, block in model.named_modules():
        if not isinstance(block, SwinBlock):
            continue
        stage = int(BLOCK_KEY.match(name + ".")[1])
        index = saved.get(f"{name}.attn.relative_position_index")
        window = math.isqrt(math.isqrt(index.numel())) if index is not None else block.window  # N*N, N = w*w
        if layout == "torchvision" and window == getattr(model, "window_size", window) > block.window:
            H, W = block.resolution
            raise CheckpointError(
                f"{where}: torchvision's Swin pads stage {stage} ({H}x{W}) to its window {window}, where this "
                f"model (as the official code) shrinks the window to {block.window}: its outputs would differ "
                "from torchvision's; use an image size whose stages are at least the window, or fine-tune "
                "from these weights with model.pretrained"
            )
        table = saved.get(f"{name}.attn.relative_coords_table")
        if table is None or not block.post_norm or table.shape[1] != 2 * block.window - 1:
            continue  # another window: V2's bias is computed for the model's own
        # read off one offset (exact for tables saved in fp16 too), not compared entry by entry
        theirs, mine = saved_pretrained_window(table), block.attn.pretrained_window or block.window
        if theirs != mine:
            raise CheckpointError(
                f"{where}: stage {stage} was trained with pre-training window {theirs} (its saved "
                f"relative_coords_table) but the model's is {mine}; name the variant the weights were trained "
                "with (--model, model.name) or set model.pretrained_window_sizes"
            )


def official_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of the official layout (block_buffers)."""
    return block_buffers(model)


def to_layout(
    sd: Mapping[str, torch.Tensor], layout: str, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """A Swin state dict (any layout; normally ours) -> one in `layout`: the reverse of convert_state_dict.

    - 'swin-train': our names, no buffers (also what the safetensors export holds),
    - 'timm': `layers.{i+1}.downsample`, `head.fc.*`, no buffers (timm's are non-persistent),
    - 'torchvision': `features.*` names and a flat (N*N,) int64 `relative_position_index` per block (V2: also
      its `relative_coords_table` and one `qkv.bias`),
    - 'official': our names plus each block's (N, N) `relative_position_index`, for shifted blocks its
      `attn_mask` and in V2 its `relative_coords_table` (see block_buffers; the model is required).
    With `model`, the weights must fit it exactly (keys and shapes). Tensors are not copied. V2 weights do not
    hold their windows, so V2's torchvision layout needs the model too.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    sd = convert_state_dict(sd)
    if model is not None:
        check_fits(sd, model)
    if layout == "swin-train":
        return sd
    if layout == "official" or (layout == "torchvision" and swin_version(sd) == 2):
        if model is None:
            raise ValueError(
                f"the {layout} layout of these weights needs the model: its buffers depend on it"
            )
    if layout == "official":
        return {**sd, **official_buffers(model)}
    _check_foreign(sd, layout, model)
    if layout == "timm":
        return {_to_timm(k): v for k, v in sd.items()}
    if swin_version(sd) == 2:
        buffers = block_buffers(model, flat_index=True)
        renamed = {_to_torchvision(k): v for k, v in _join_qkv_bias(sd).items()}
        return {
            **renamed,
            **{_to_torchvision(k): v for k, v in buffers.items() if not k.endswith("attn_mask")},
        }
    out = {}
    for key, value in sd.items():
        out[_to_torchvision(key)] = value
        if key.endswith(".attn.relative_position_bias_table"):
            # torchvision's define_relative_position_index is ours, flattened to (N*N,)
            window = table_window(value, key)
            index_key = _to_torchvision(key).replace(
                "relative_position_bias_table", "relative_position_index"
            )
            out[index_key] = relative_position_index(window).flatten()
    return out


def infer_arch(sd: Mapping[str, torch.Tensor]) -> dict:
    """SwinTransformer keyword arguments read off a state dict in our layout.

    Everything but `img_size`, which weights fix only through an absolute position embedding (then it is
    included); the caller supplies it otherwise. V2 weights hold no window either (no bias table): for them
    the caller supplies `window_size` (and `pretrained_window_sizes`) too.
    """
    version = swin_version(sd)
    try:
        embed_dim, in_chans, patch_size, _ = sd["patch_embed.proj.weight"].shape
        blocks = sorted({(int(m[1]), int(m[2])) for k in sd if (m := BLOCK_KEY.match(k))})
        num_stages = blocks[-1][0] + 1 if blocks else 0
        depths = [1 + max((j for i, j in blocks if i == stage), default=-1) for stage in range(num_stages)]
        if not num_stages or 0 in depths:
            raise CheckpointError("cannot tell the architecture from the weights: stages without blocks")
        head_of = "logit_scale" if version == 2 else "relative_position_bias_table"
        tables = [sd[f"layers.{i}.blocks.0.attn.{head_of}"] for i in range(num_stages)]
        arch = dict(
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=[t.shape[0 if version == 2 else 1] for t in tables],
            mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
            qkv_bias=f"layers.0.blocks.0.attn.{'q_bias' if version == 2 else 'qkv.bias'}" in sd,
            ape="absolute_pos_embed" in sd,
            patch_norm="patch_embed.norm.weight" in sd,
            version=version,
        )
        if version == 1:
            arch["window_size"] = table_window(tables[0])
    except KeyError as e:
        raise CheckpointError(
            f"cannot tell the architecture from the weights: '{e.args[0]}' is missing"
        ) from None
    if arch["ape"]:
        arch["img_size"] = math.isqrt(sd["absolute_pos_embed"].shape[1]) * patch_size
    return arch


# ------------------------------------------------------------------------------------------------ files


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage (safetensors refuses shared memory); copies only sharers."""
    seen, out = set(), {}
    for key, value in sd.items():
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def save_weights(
    sd: Mapping[str, torch.Tensor],
    fmt: str,
    path: str | os.PathLike,
    model: nn.Module | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `sd` (any Swin layout) atomically as `fmt` (EXPORT_FORMATS); returns the number of tensors.

    'safetensors' holds our layout with `metadata` (str -> str); 'timm' and 'torchvision' are bare state dicts
    for their models' `load_state_dict`; 'official' is `{'model': sd}` with the buffers (needs `model`);
    'detection' is `{'model': sd}` for the official detection / segmentation configs' `pretrained`
    (detection_layout.to_detection, at the model's window).
    """
    from swin_train.checkpoint import save_checkpoint

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    out = to_layout(sd, "swin-train" if fmt in ("safetensors", "detection") else fmt, model)
    if fmt == "detection":
        if model is None:
            raise ValueError("the detection layout needs the model: its window fixes the saved index tables")
        out = to_detection(out, model.window_size)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        from swin_train.checkpoint import write_atomically

        meta = {"format": "pt", "layout": "swin-train", **(metadata or {})}
        tensors = _unshared(out)
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        out = {k: v.detach() for k, v in out.items()}
        save_checkpoint({"model": out} if fmt in ("official", "detection") else out, path)
    return len(out)
