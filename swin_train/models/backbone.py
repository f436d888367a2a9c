"""Swin as a backbone: the per-stage feature maps a detection or segmentation head reads, as the official
detection and segmentation backbone (Swin-Transformer-Object-Detection, mmdet/models/backbones) gives them.

    SwinBackbone = the classifier's skeleton (swin.py: PatchEmbed -> SwinLayer x num_stages) without its final
                   norm and head, and a LayerNorm `norm{i}` on each selected stage's output:
                   forward(x) -> [(B, C_i, H_i, W_i) for i in out_indices]

It is a SwinTransformer (the same modules, names and any-size rule), so every weight layout the classifier
reads loads into it by the same code; its state dict is our layout without `norm.*` and `head.*`, plus
`norm{i}.*`: the official detection backbone's names exactly. The detection rule holds by default: every
block keeps the configured window and its shift at every size (`always_partition`), as that backbone does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from swin_train.errors import ConfigError

from .registry import variant_arch
from .swin import SwinTransformer, stage_sizes

# the official detection backbone's default (and its Swin-T configs'), where the classifier's is 0.1
DROP_PATH_RATE = 0.2


class FeatureInfo(list):
    """One dict per returned map (`num_chs`, `reduction`, `module`) with timm's FeatureInfo accessors, so that
    code written for timm's features_only (`feature_info.channels()`) reads ours."""

    def channels(self, idx: int | None = None):
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None):
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None):
        return self._get("module", idx)

    def _get(self, key: str, idx: int | None):
        return [info[key] for info in self] if idx is None else self[idx][key]


class SwinBackbone(SwinTransformer):
    """Per-stage feature maps of a Swin V1 or V2, each through its own LayerNorm `norm{i}`.

    `out_indices`: the stages returned (in stage order; None: all); stages after the last one are not run.
    `frozen_stages` (the official detection backbone's meaning): -1 nothing frozen; 0 the patch embedding;
    1 also the absolute position embedding; k >= 2 also stages 0 .. k-2. Frozen modules have
    requires_grad=False and stay in eval mode through `.train()` (their dropout and stochastic depth off).
    `drop_path_rate` defaults to the official detection backbone's 0.2.
    `feature_info`: one dict per returned stage, as timm's: `num_chs`, `reduction` (its stride in pixels) and
    `module` (the norm whose output it is).
    """

    def __init__(
        self,
        *,
        out_indices: Sequence[int] | None = None,
        frozen_stages: int = -1,
        always_partition: bool = True,
        drop_path_rate: float = DROP_PATH_RATE,
        **arch,
    ):
        arch.pop("num_classes", None)  # no head: a classifier's architecture fields are welcome as they are
        super().__init__(
            **arch, num_classes=0, always_partition=always_partition, drop_path_rate=drop_path_rate
        )
        all_stages = range(self.num_stages)
        self.out_indices = check_out_indices(
            all_stages if out_indices is None else out_indices, self.num_stages
        )
        if not _is_stage_number(frozen_stages) or not -1 <= frozen_stages <= self.num_stages:
            raise ConfigError(
                f"frozen_stages {frozen_stages} is out of range: -1 (none) to {self.num_stages} for a "
                f"model of {self.num_stages} stages"
            )
        self.frozen_stages = frozen_stages
        del self.norm, self.head  # the classifier's; the stage norms replace them
        dims = [self.embed_dim * 2**i for i in range(self.num_stages)]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.feature_info = FeatureInfo(
            dict(num_chs=dims[i], reduction=self.patch_size * 2**i, module=f"norm{i}")
            for i in self.out_indices
        )
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        frozen = [self.patch_embed] if self.frozen_stages >= 0 else []
        if self.frozen_stages >= 2:
            frozen += [self.pos_drop, *self.layers[: self.frozen_stages - 1]]
        for module in frozen:
            module.eval()
            module.requires_grad_(False)
        if self.frozen_stages >= 1 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinBackbone:
        """Train or eval mode, the frozen stages always in eval mode (official)."""
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, in_chans, H, W) -> [(B, C_i, H_i, W_i) for i in out_indices]: H_0 = ceil(H / patch_size), then
        halved and rounded up per stage. Each map is a channels-last tensor viewed as NCHW (no copy), which
        convolutions read as torch.channels_last."""
        x = self._embed(x)
        features = []
        for i, layer in enumerate(self.layers[: self.out_indices[-1] + 1]):
            stage, x = layer(x)  # (B, H_i, W_i, C_i)
            if i in self.out_indices:
                features.append(getattr(self, f"norm{i}")(stage).permute(0, 3, 1, 2))
        return features

    def feature_shapes(self, size: int | Sequence[int]) -> list[tuple[int, int, int]]:
        """(C_i, H_i, W_i) of each returned map for an image of `size` (one side or (H, W))."""
        sizes = stage_sizes(size, self.patch_size, self.num_stages)
        return [(info["num_chs"], *sizes[i]) for i, info in zip(self.out_indices, self.feature_info)]

    def flops(self) -> int:
        """Multiply-adds per image at the configured size: patch embedding, the stages run, the stage norms."""
        grid_h, grid_w = self.stage_resolutions[0]
        total = grid_h * grid_w * self.embed_dim * self.in_chans * self.patch_size**2
        if isinstance(self.patch_embed.norm, nn.LayerNorm):
            total += grid_h * grid_w * self.embed_dim
        for i, layer in enumerate(self.layers[: self.out_indices[-1] + 1]):
            total += sum(block.flops() for block in layer.blocks)
            total += layer.downsample.flops() if layer.downsample is not None else 0
            if i in self.out_indices:
                total += layer.dim * layer.resolution[0] * layer.resolution[1]
        return total


def check_out_indices(out_indices: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """`out_indices` as a sorted tuple; ConfigError (one line) unless they are distinct stages 0..num_stages-1."""
    indices = tuple(out_indices)
    if not indices or any(not _is_stage_number(i) or not 0 <= i < num_stages for i in indices):
        raise ConfigError(
            f"out_indices {list(indices)} are out of range: give stages from 0 to {num_stages - 1} "
            f"(the model has {num_stages})"
        )
    if len(set(indices)) != len(indices):
        raise ConfigError(f"out_indices {list(indices)} name a stage twice; give each once")
    return tuple(sorted(indices))


def _is_stage_number(value) -> bool:
    """An int, not a bool (True would name a module `normTrue`) nor a float (1.5 would freeze as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def build_backbone(name: str | None = None, **overrides) -> SwinBackbone:
    """A SwinBackbone (random weights) from a variant name and/or architecture fields, as `build_model`:
    `build_backbone("swin_tiny_patch4_window7_224", out_indices=(1, 2, 3), frozen_stages=1)`. Loading weights
    is `swin_train.loading.create_model(..., features_only=True, checkpoint=...)`."""
    arch = variant_arch(name) if name else {}
    arch.update(overrides)
    return SwinBackbone(**arch)
