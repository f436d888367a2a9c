"""Swin Transformer V1 (Liu et al., 2021) and V2 (Liu et al., 2022), written to read like the papers.

Hierarchy (both versions):
    SwinTransformer = PatchEmbed -> SwinLayer x num_stages -> LayerNorm -> average pool -> head
    SwinLayer (a stage) = SwinBlock x depth (alternating W-MSA and SW-MSA) -> optional PatchMerging
    SwinBlock V1 (pre-norm):      x + DropPath(WindowAttention(LN(x)));  x + DropPath(MLP(LN(x)))
    SwinBlock V2 (res-post-norm): x + DropPath(LN(CosineWindowAttention(x)));  x + DropPath(LN(MLP(x)))
    PatchMerging V1: LN(4C) -> Linear(4C, 2C);  V2: Linear(4C, 2C) -> LN(2C)

The attention of each version (and what else differs there: the position bias, the qkv biases) is in
attention.py. Tensors between modules are channels-last feature maps (B, H, W, C). Parameter names follow the
official repository (`layers.{i}.blocks.{j}.attn.qkv.weight`, `layers.{i}.downsample.reduction.weight`, ...),
so its checkpoints load once their derived buffers (index tables, masks, V2's coordinate tables) are dropped;
those buffers are rebuilt from the architecture here and never saved.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from torch import nn

# WindowAttention, sdpa_windows, relative_position_index, ATTENTION_BACKENDS: re-exported, looked up here too
from .attention import ATTENTION_BACKENDS as ATTENTION_BACKENDS
from .attention import BlockSpec as BlockSpec
from .attention import CosineWindowAttention
from .attention import WindowAttention as WindowAttention
from .attention import relative_position_index as relative_position_index
from .attention import sdpa_windows as sdpa_windows
from .ops import Linear, linear_gelu

# the window tables (windows.py), re-exported: tests and convert.py look them up here
from .windows import MASKED_LOGIT as MASKED_LOGIT
from .windows import GatherTokens, known_equal, pad_right_bottom, whole_windows, window_layout
from .windows import GatherTokens as _GatherTokens  # noqa: F401 (its name before windows.py)
from .windows import shifted_window_mask as shifted_window_mask
from .windows import window_partition as window_partition
from .windows import window_token_order as window_token_order

# Sizes whose window tables a block keeps besides its configured one (a few evaluation or detection sizes;
# swin-predict at each image's own size would otherwise keep one per photograph)
CACHED_SIZES = 8


def image_size(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of an image size given as one side (square) or [H, W]."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def stage_sizes(size: int | Sequence[int], patch_size: int, num_stages: int) -> list[tuple[int, int]]:
    """(H_i, W_i) of each stage's map for an image of `size`: the patch grid (the image padded to whole
    patches), then halved and rounded up at each merge."""
    sizes = [tuple(whole_windows(side, patch_size) for side in image_size(size))]
    for _ in range(num_stages - 1):
        sizes.append(tuple(whole_windows(side, 2) for side in sizes[-1]))
    return sizes


def config_size(size: int | Sequence[int]) -> int | list[int]:
    """An image size as a config writes it (`data.img_size`): one int when square, else [H, W]."""
    height, width = image_size(size)
    return height if height == width else [height, width]


# Parameter-name patterns of our (the official) layout: `layers.{stage}.blocks.{block}.` and the patch merging
# that ends a stage, `layers.{stage}.downsample.`; group 1 is the stage, group 2 the block.
BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.")


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to `embed_dim` (a strided conv). An image
    that patches do not tile is padded with zeros at the bottom and right first (the official detection
    backbone's rule)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, ceil(H/p), ceil(W/p), embed_dim)."""
        H, W, p = x.shape[2], x.shape[3], self.patch_size
        x = pad_right_bottom(x, whole_windows(H, p) * p, whole_windows(W, p) * p, channels_first=True)
        x = self.proj(x)  # (B, C, H/p, W/p)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class Mlp(nn.Module):
    """The feed-forward branch: Linear -> GELU -> Dropout -> Linear -> Dropout, applied to every token."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        hidden = linear_gelu(x, self.fc1.weight, self.fc1.bias)  # (..., hidden); GELU fused in inference
        return self.drop(self.fc2(self.drop(hidden)))


_thread_rng = threading.local()


@contextmanager
def stochastic_depth_generator(generator: torch.Generator):
    """Draw this thread's stochastic-depth masks from `generator` for the duration. Threads that run parts of
    one batch at once (`swin_train.cpu_split`) each need their own: draws from the shared default generator
    would come in whichever order the threads reach them, and a run would not repeat."""
    previous = getattr(_thread_rng, "generator", None)
    _thread_rng.generator = generator
    try:
        yield
    finally:
        _thread_rng.generator = previous


class Residual(nn.Module):
    """x + DropPath(branch(x)): a residual branch with per-sample stochastic depth (Huang et al., 2016).

    Why not timm's DropPath: it runs the branch on every sample and multiplies the dropped ones by zero. Here,
    on CPU in eager mode, the branch runs on the kept samples only, which saves the dropped share of the work
    (drop_path_rate / 2 on average over a model whose rates grow linearly from 0). The mask is drawn as timm
    draws it (one Bernoulli(1 - drop_prob) per sample from the same generator) and kept samples are scaled by
    1 / (1 - drop_prob). Elsewhere (CUDA, where reading the mask would wait for the device; compiled graphs,
    which want fixed shapes) the mask multiplies the branch as in timm."""

    # The branch's batch is rounded up to a multiple of batch / SIZES (the rest filled with dropped samples,
    # whose outputs are discarded). With every possible kept count, the varying activation sizes fragmented
    # glibc's heap: a micro model's peak RSS grew by 100 MB over 60 steps; with at most 8 sizes it did not.
    SIZES = 8

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, branch) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x + branch(x)
        keep = 1.0 - self.drop_prob
        generator = getattr(_thread_rng, "generator", None)  # None: the default generator
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(
            keep, generator=generator
        )  # (B, 1, ...)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            flat = mask.view(-1)
            kept = flat.nonzero().squeeze(1)
            granule = max(1, len(x) // self.SIZES)
            rows = -(-len(kept) // granule) * granule  # kept count rounded up to a multiple of the granule
            # none kept: the branch still runs on all (below), so that its parameters get gradients
            if 0 < len(kept) and rows < len(x):
                dropped = (flat == 0).nonzero().squeeze(1)
                computed = branch(x.index_select(0, torch.cat([kept, dropped[: rows - len(kept)]])))
                return x.index_add(0, kept, computed[: len(kept)], alpha=1.0 / keep)
        return x + branch(x) * (mask / keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class SwinBlock(nn.Module):
    """One Swin block: (shifted) window attention and an MLP, each a residual branch; V1 normalises a branch's
    input (pre-norm), V2 its output (res-post-norm, which keeps activations from growing with depth).

    The window and shift are fixed here, from the `resolution` the model is configured for. The
    classification rule (the official classification code's): when the map's smaller side is not larger than
    the window, the window shrinks to it and no shift is used (there is then a single window, or a row of
    them, and nothing to shift). `always_partition` (the detection rule, timm's name): every block keeps the
    configured window and shift, whatever the map.

    The block runs on any H x W: the map is padded to whole windows and the shift masked as the official
    detection backbone does (windows.py). Its tables for the configured resolution are buffers; those of other
    sizes are made on first use and kept per (H, W, device), so a loop at a fixed size computes them once.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        *,
        window: int,
        shift: int = 0,
        spec: BlockSpec = BlockSpec(),
        drop_path: float = 0.0,
        pretrained_window: int = 0,
        always_partition: bool = False,
    ):
        super().__init__()
        self.resolution = tuple(resolution)
        if not always_partition and min(resolution) <= window:
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.post_norm = spec.version == 2
        self.norm1 = nn.LayerNorm(dim)
        if spec.version == 1:
            self.attn = WindowAttention(dim, window, num_heads, spec)
        else:
            self.attn = CosineWindowAttention(dim, window, num_heads, spec, pretrained_window)
        self.drop_path = Residual(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio), spec.drop_rate)
        # order: pad + shift + partition as one gather; inverse: its way back (windows.window_layout)
        order, inverse, mask = window_layout(*self.resolution, window, shift)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.register_buffer("token_order", order, persistent=False)
        self.register_buffer("token_order_inverse", inverse, persistent=False)
        self._layouts: dict[tuple, tuple] = {}  # (H, W, device) -> (order, inverse, mask), other sizes

    def layout(self, H, W, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(order, inverse, mask) of this block on an H x W map: the buffers at the configured resolution, the
        cached tables of another size, or (inside torch.compile / torch.export at other or symbolic sizes)
        the tables computed in the graph from the sizes, where a Python cache cannot live."""
        if known_equal((H, W), self.resolution):
            return self.token_order, self.token_order_inverse, self.attn_mask
        if torch.compiler.is_compiling():
            return window_layout(H, W, self.window, self.shift, device)
        key = (H, W, device)
        tables = self._layouts.pop(
            key, None
        )  # re-inserted last: the dict's order is least recently used first
        if tables is None:
            tables = window_layout(H, W, self.window, self.shift, device)
            while len(self._layouts) >= CACHED_SIZES:
                del self._layouts[next(iter(self._layouts))]
        self._layouts[key] = tables
        return tables

    def forward(self, x: torch.Tensor, tables: tuple | None = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C). `tables`: this block's `layout` for the map's size, when the stage has
        it already (its blocks of one shift share them)."""
        tables = tables or self.layout(x.shape[1], x.shape[2], x.device)
        x = self.drop_path(x, lambda t: self.attention_branch(t, tables))
        return self.drop_path(x, self.mlp_branch)

    def attention_branch(self, x: torch.Tensor, tables: tuple) -> torch.Tensor:
        """(Shifted) window attention of LN(x) (V1), or LN of the attention of x (V2), back in map layout:
        (B, H, W, C) -> (B, H, W, C). `tables`: (order, inverse, mask) of `layout`."""
        B, H, W, C = x.shape
        order, inverse, mask = tables
        tokens = (x if self.post_norm else self.norm1(x)).reshape(B, H * W, C)
        # zero padding to whole windows, cyclic shift by -shift and window partition in one gather:
        # (B, H*W, C) -> (B, Hp*Wp, C) in window order = (B*nW, N, C)
        windows = GatherTokens.apply(tokens, order, inverse)
        # explicit sizes, not -1: the ONNX exporter turns a -1 into the traced size (wrong at other sizes)
        N, tokens_in_windows = self.window * self.window, order.shape[0]
        windows = self.attn(windows.view(B * (tokens_in_windows // N), N, C), mask)  # (B*nW, N, C)
        # window reverse, the shift back and the padding dropped, again one gather
        out = GatherTokens.apply(windows.view(B, tokens_in_windows, C), inverse, order)
        return self.norm1(out.view(B, H, W, C)) if self.post_norm else out.view(B, H, W, C)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.mlp(x)) if self.post_norm else self.mlp(self.norm2(x))

    def flops(self) -> int:
        """Multiply-adds, counted as the official repository does (norms, attention, MLP; V2 as V1)."""
        H, W = self.resolution
        dim, N, heads = self.attn.dim, self.window * self.window, self.attn.num_heads
        num_windows = whole_windows(H, self.window) * whole_windows(W, self.window)  # padded to whole windows
        attn = N * dim * 3 * dim + 2 * heads * N * N * (dim // heads) + N * dim * dim
        mlp = 2 * H * W * dim * self.mlp.fc1.out_features
        return 2 * H * W * dim + num_windows * attn + mlp


class PatchMerging(nn.Module):
    """Downsample 2x: concatenate each 2x2 neighbourhood (4C) and project it to 2C; V1 normalises the 4C input,
    V2 (`norm_last`) the 2C output. A map of odd height or width is padded with zeros at the bottom or right
    first (the official detection backbone's rule): H x W -> ceil(H/2) x ceil(W/2)."""

    def __init__(self, dim: int, resolution: tuple[int, int], norm_last: bool = False):
        super().__init__()
        self.resolution, self.norm_last = resolution, norm_last
        self.norm = nn.LayerNorm(2 * dim if norm_last else 4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        B, H, W, C = x.shape
        h, w = whole_windows(H, 2), whole_windows(W, 2)
        x = pad_right_bottom(x, 2 * h, 2 * w)
        # Channel order (row, col) offsets (0,0), (1,0), (0,1), (1,1), as in the official code.
        x = x.reshape(B, h, 2, w, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, h, w, 4 * C)
        return self.norm(self.reduction(x)) if self.norm_last else self.reduction(self.norm(x))

    def flops(self) -> int:
        """The norm (over 4C, or 2C in V2) and the reduction at the merged resolution."""
        H, W = self.resolution
        dim = self.reduction.out_features // 2
        merged = whole_windows(H, 2) * whole_windows(W, 2)
        return merged * (self.norm.normalized_shape[0] + 4 * dim * 2 * dim)


class SwinLayer(nn.Module):
    """One stage: `depth` blocks alternating regular (shift 0) and shifted (shift window//2) windows,
    then optional patch merging. `pretrained_window` (V2): the window the stage was pre-trained with (0: this
    one), which scales its position bias's offsets."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        *,
        window: int,
        spec: BlockSpec = BlockSpec(),
        drop_path: list[float] | tuple[float, ...] = (),
        downsample: bool = False,
        grad_checkpointing: bool = False,
        pretrained_window: int = 0,
        always_partition: bool = False,
    ):
        super().__init__()
        self.dim, self.resolution, self.depth = dim, tuple(resolution), depth
        self.grad_checkpointing = grad_checkpointing
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                resolution,
                num_heads,
                window=window,
                shift=0 if j % 2 == 0 else window // 2,
                spec=spec,
                drop_path=drop_path[j],
                pretrained_window=pretrained_window,
                always_partition=always_partition,
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution, norm_last=spec.version == 2) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), next stage input (B, ceil(H/2), ceil(W/2), 2C) or the
        same)."""
        by_shift = {}  # the window tables, made (or looked up) once per shift for the stage's blocks
        for block in self.blocks:
            if block.shift not in by_shift:
                by_shift[block.shift] = block.layout(x.shape[1], x.shape[2], x.device)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, by_shift[block.shift], use_reentrant=False)
            else:
                x = block(x, by_shift[block.shift])
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinTransformer(nn.Module):
    """Swin Transformer V1 or V2 (`version`) for image classification (num_classes=0: a feature extractor).

    The architecture is given whole (`create_model(name)` takes it from the registry); the rest are
    training choices with the official defaults. `pretrained_window_sizes` (V2 only): each stage's window in
    pre-training, 0 for this one (the default); see SwinLayer.

    `img_size` (one side, or (H, W)) is the configured size: it fixes the blocks' windows and shifts (the
    classification rule, or with `always_partition` the detection rule: SwinBlock) and the grid of an absolute
    position embedding. The model runs on any image of at least `min_input_size`: the image is padded to whole
    patches, each stage's map to whole windows, odd maps before merging (docs/design.md, "Any image size")."""

    def __init__(
        self,
        *,
        img_size: int | Sequence[int],
        patch_size: int,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: int,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        grad_checkpointing: bool = False,
        pretrained_window_sizes: Sequence[int] | None = None,
        always_partition: bool = False,
        **block_settings,
    ):
        super().__init__()
        spec = BlockSpec(
            **block_settings
        )  # mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, attention, version
        _check_pretrained_windows(spec.version, pretrained_window_sizes, len(depths))
        self.version = spec.version
        self.pretrained_window_sizes = (
            None if spec.version == 1 else tuple(pretrained_window_sizes or [0] * len(depths))
        )
        self.img_size, self.patch_size, self.in_chans = image_size(img_size), patch_size, in_chans
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.depths, self.num_heads, self.window_size = tuple(depths), tuple(num_heads), window_size
        self.always_partition = always_partition
        self.num_stages = len(depths)
        self.num_features = embed_dim * 2 ** (self.num_stages - 1)
        self.stage_resolutions = stage_sizes(self.img_size, patch_size, self.num_stages)  # configured size
        grid_h, grid_w = self.stage_resolutions[0]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        # (1, L, C) as in the official checkpoints; viewed as (1, H, W, C) when added, interpolated at other sizes
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid_h * grid_w, embed_dim)) if ape else None
        self.pos_drop = nn.Dropout(spec.drop_rate)
        # Stochastic depth rate grows linearly from 0 to drop_path_rate over all blocks.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(
                SwinLayer(
                    dim=embed_dim * 2**i,
                    resolution=self.stage_resolutions[i],
                    depth=depth,
                    num_heads=num_heads[i],
                    window=window_size,
                    spec=spec,
                    drop_path=rates[first : first + depth],
                    downsample=i < self.num_stages - 1,
                    grad_checkpointing=grad_checkpointing,
                    pretrained_window=self.pretrained_window_sizes[i] if spec.version == 2 else 0,
                    always_partition=always_partition,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if (
            spec.version == 2
        ):  # each residual branch starts at zero: its post-norm's gain and bias are 0 (official)
            for layer in self.layers:
                for block in layer.blocks:
                    for norm in (block.norm1, block.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @property
    def min_input_size(self) -> tuple[int, int]:
        """The smallest (H, W) image the model takes: one first-stage window of patches each way (a smaller
        image would be mostly padding)."""
        side = self.layers[0].blocks[0].window * self.patch_size
        return side, side

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError (one line) unless `x` is a (B, in_chans, H, W) batch of at least `min_input_size`."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"the model takes images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[2:]
        min_h, min_w = self.min_input_size
        if H < min_h or W < min_w:
            window = self.layers[0].blocks[0].window
            raise ValueError(
                f"a {H}x{W} image is {whole_windows(H, self.patch_size)}x{whole_windows(W, self.patch_size)} "
                f"patches, smaller than one window ({window}x{window}); give images of at least {min_h}x{min_w}"
            )

    def absolute_position_embedding(self, height, width) -> torch.Tensor:
        """(1, height, width, C): the absolute position embedding on a height x width patch grid, bicubically
        interpolated from the configured grid elsewhere (as the official detection backbone does)."""
        grid_h, grid_w = self.stage_resolutions[0]
        embed = self.absolute_pos_embed.view(1, grid_h, grid_w, -1)
        if known_equal((height, width), (grid_h, grid_w)):
            return embed
        embed = F.interpolate(
            embed.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
        )
        return embed.permute(0, 2, 3, 1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.patch_embed(x)  # (B, H/p, W/p, C)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_position_embedding(x.shape[1], x.shape[2])
        return self.pos_drop(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage feature maps, channels-last (B, H_i, W_i, C_i), taken after the stage's blocks (before
        merging), at any input size: H_0 = ceil(H / patch_size), then halved and rounded up per stage."""
        x = self._embed(x)
        stages = []
        for layer in self.layers:
            stage_output, x = layer(x)
            stages.append(stage_output)
        return stages

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-stage feature maps, each (B, C_i, H_i, W_i) (views of `forward_stages`'s maps)."""
        return [stage.permute(0, 3, 1, 2) for stage in self.forward_stages(x)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) final-stage map -> (B, num_classes) logits (or pooled features)."""
        x = self.norm(x).mean(dim=(1, 2))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_classes), H x W at least `min_input_size`."""
        x = self._embed(x)
        for layer in self.layers:
            _, x = layer(x)
        return self.forward_head(x)

    def flops(self) -> int:
        """Multiply-adds per image at the configured size, counted as the official repository (and the paper)
        does (windows of a padded map counted whole)."""
        grid_h, grid_w = self.stage_resolutions[0]
        total = grid_h * grid_w * self.embed_dim * self.in_chans * self.patch_size**2
        if isinstance(self.patch_embed.norm, nn.LayerNorm):
            total += grid_h * grid_w * self.embed_dim
        for layer in self.layers:
            total += sum(block.flops() for block in layer.blocks)
            total += layer.downsample.flops() if layer.downsample is not None else 0
        final_h, final_w = self.stage_resolutions[-1]
        total += self.num_features * final_h * final_w  # final norm
        total += self.num_features * self.num_classes  # head
        return total


def _check_pretrained_windows(version: int, windows: Sequence[int] | None, stages: int) -> None:
    """ValueError unless `windows` (V2's pretrained_window_sizes) is None, or one window per stage of a V2
    model, each 0 or at least 2."""
    if windows is None:
        return
    if version == 1:
        raise ValueError("pretrained_window_sizes is a Swin V2 setting; give version=2 or leave it None")
    if len(windows) != stages:
        raise ValueError(f"pretrained_window_sizes needs one window per stage ({stages})")
    if any(w < 0 or w == 1 for w in windows):
        # the offsets are divided by (window - 1): a window of 1 has no offsets, a negative one no meaning
        raise ValueError(f"pretrained_window_sizes: 0 or windows >= 2, got {list(windows)}")


def _init_weights(module: nn.Module) -> None:
    """Official initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
