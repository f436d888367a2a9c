"""The Layer/Block hierarchy of a SwinTransformer with parameters and FLOPs, as plain data."""

from __future__ import annotations

from torch import nn

from swin_train.models.swin import SwinTransformer


def _params(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe_model(model: SwinTransformer) -> dict:
    """Per-module params and multiply-adds (the paper's "FLOPs"); totals equal model.flops()/param count."""
    grid_h, grid_w = model.stage_resolutions[0]
    has_norm = isinstance(model.patch_embed.norm, nn.LayerNorm)
    embed_flops = grid_h * grid_w * model.embed_dim * (model.in_chans * model.patch_size**2 + has_norm)
    layers = []
    for i, layer in enumerate(model.layers):
        blocks = [
            {
                "index": j,
                "type": "SW-MSA" if block.shift else "W-MSA",
                "window": block.window,
                "shift": block.shift,
                "params": _params(block),
                "flops": block.flops(),
            }
            for j, block in enumerate(layer.blocks)
        ]
        merge = layer.downsample
        layers.append(
            {
                "index": i,
                "resolution": list(layer.resolution),
                "dim": layer.dim,
                "heads": layer.blocks[0].attn.num_heads,
                "window": layer.blocks[0].window,
                "pretrained_window": getattr(layer.blocks[0].attn, "pretrained_window", None),  # V2 only
                "depth": layer.depth,
                "blocks": blocks,
                "downsample": None
                if merge is None
                else {"params": _params(merge), "flops": merge.flops(), "out_dim": 2 * layer.dim},
                "params": _params(layer),
                "flops": sum(b["flops"] for b in blocks) + (merge.flops() if merge is not None else 0),
            }
        )
    head_flops = model.flops() - embed_flops - sum(layer["flops"] for layer in layers)
    ape = model.absolute_pos_embed.numel() if model.absolute_pos_embed is not None else 0
    return {
        "version": model.version,
        "img_size": list(model.img_size),  # [H, W]
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "num_classes": model.num_classes,
        "patch_embed": {
            "resolution": [grid_h, grid_w],
            "params": _params(model.patch_embed) + ape,
            "flops": embed_flops,
        },
        "layers": layers,
        "head": {"params": _params(model.norm) + _params(model.head), "flops": head_flops},
        "params": _params(model),
        "flops": model.flops(),
    }
