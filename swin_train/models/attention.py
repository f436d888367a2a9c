"""Window attention of Swin V1 and Swin V2: where the two versions differ most, side by side.

Both attend within each window of N = w*w tokens, add a relative position bias (and, for shifted windows, the
region mask) to the logits, and share one forward with its kernels (the math written out on CPU, SDPA on CUDA,
optionally FlexAttention). What differs is how q, k, v and the bias are made:

    V1 WindowAttention:        logits = q k^T / sqrt(head_dim)    + table[index]
                               table: a learned ((2w-1)^2, heads) parameter; one qkv bias
    V2 CosineWindowAttention:  logits = cos(q, k) * exp(min(logit_scale, log 100))
                                        + 16 sigmoid(cpb_mlp(log-spaced offsets))[index]
                               logit_scale a learned per-head parameter; q and v biases, none for k

The V2 bias is a function of the relative offset, not a table of the window, so a model pre-trained with one
window runs at another (192/w12 -> 256/w16 or 384/w24) with its weights as they are; only the offsets, scaled
by the pre-training window (`pretrained_window`), are recomputed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .flex import flex_attention_available, flex_window_attention
from .ops import Linear, linear

# The attention's kernels: "auto" (SDPA on CUDA, the math written out on CPU) or "flex" (FlexAttention)
ATTENTION_BACKENDS = ("auto", "flex")
# Swin V1 (Liu et al., 2021) and Swin V2 (Liu et al., 2022)
SWIN_VERSIONS = (1, 2)

# V2: the cosine logits' per-head scale starts at 10 and is clamped at 100 (official), so logits stay in [-100, 100]
INITIAL_LOGIT_SCALE = 10.0
MAX_LOG_LOGIT_SCALE = math.log(1.0 / 0.01)
# V2: the continuous position bias MLP (2 -> CPB_HIDDEN -> heads) and the bias range 16 * sigmoid, in (0, 16)
CPB_HIDDEN = 512
CPB_BIAS_RANGE = 16.0


@dataclass(frozen=True)
class BlockSpec:
    """What every block shares, handed as one object from the model down to its attention: a new block
    setting is a field here (named as in `config.ModelConfig`) and the line that uses it."""

    mlp_ratio: float = 4.0  # MLP hidden width / dim
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after attention and MLP projections (and on the embedding)
    attn_drop_rate: float = 0.0  # dropout on attention weights
    attention: str = "auto"  # ATTENTION_BACKENDS
    version: int = (
        1  # SWIN_VERSIONS: the block's norm placement, attention and position bias (module docstring)
    )

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.version not in SWIN_VERSIONS:
            raise ValueError(f"version must be one of {SWIN_VERSIONS}, got {self.version!r}")


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table for every pair of tokens in a window (N = w*w)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), each in [-w+1, w-1]
    relative += window - 1  # shift to [0, 2w-2]
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def log_spaced_coords(window: int, pretrained_window: int = 0) -> torch.Tensor:
    """((2w-1)^2, 2) input of V2's position bias MLP: every offset (dy, dx) in [-(w-1), w-1]^2, in the row
    order of `relative_position_index`'s table, divided by (pretrained_window - 1) (by (w - 1) when
    pretrained_window is 0), times 8, then sign(x) * log2(1 + |x|) / log2(8) (the official table).

    Dividing by the pre-training window keeps the offsets it was trained on where they were; the log spacing
    keeps a larger window's new offsets close to them (V2 paper, Sec. 3.3). max(., 1): a window of 1 has only
    the offset 0 (the official code would divide 0 by 0)."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)  # (2w-1, 2w-1, 2)
    coords = coords / max((pretrained_window or window) - 1, 1) * 8
    return (torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)).reshape(-1, 2)


@functools.cache
def _flex_runs_on(device: torch.device) -> bool:
    """FlexAttention with gradients on `device` (a model trained with it falls back to SDPA elsewhere)."""
    return flex_attention_available(device)


def sdpa_windows(
    q, k, v, bias: torch.Tensor, dropout: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """scaled_dot_product_attention over windows: q, k, v (B * num_windows, heads, N, head_dim) and an additive
    bias (heads, N, N) or (num_windows, heads, N, N) -> (B, num_windows * heads, N, head_dim).

    SDPA's fused kernels (memory-efficient / cuDNN) take an additive bias but only 4-D inputs, so the windows
    join the head dimension and the bias broadcasts over the images as a view (no (B, ...) copy of it).
    `scale`: the logits' factor (None: SDPA's own 1 / sqrt(head_dim))."""
    bias = bias.reshape(1, -1, *bias.shape[-2:]).to(q.dtype)  # (1, num_windows * heads, N, N)
    B = q.shape[0] * q.shape[1] // bias.shape[1]
    q, k, v = (t.reshape(B, bias.shape[1], *t.shape[-2:]) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


class _WindowAttention(nn.Module):
    """The forward both versions share: q, k, v from `queries_keys_values`, the bias gathered from
    `bias_table()`, attention per window (with the shift mask), the output projection.

    The bias (and, for shifted windows, the region mask) enters scaled_dot_product_attention as one additive
    attention bias, so torch's fused attention kernels apply where they exist."""

    def relative_position_bias(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """(heads, N, N) bias gathered from the ((2w-1)^2, heads) table (default: `bias_table()`)."""
        N = self.window * self.window
        table = self.bias_table() if table is None else table
        bias = table[self.relative_position_index.view(-1)]  # (N*N, heads)
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * num_windows, N, C); mask: (num_windows, N, N) or None -> (B * num_windows, N, C)."""
        B_, N, C = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v, scale = self.queries_keys_values(x)  # each (B_, heads, N, head_dim); scale None: in q
        table = self.bias_table()  # ((2w-1)^2, heads)
        dropout = self.attn_drop if self.training else 0.0
        num_windows = mask.shape[0] if mask is not None else 1
        # FlexAttention has no attention dropout; compiled training has checked the GPU already (trainer)
        use_flex = self.attention == "flex" and q.is_cuda and not dropout
        if use_flex and (torch.compiler.is_compiling() or _flex_runs_on(q.device)):
            index = self.relative_position_index
            out = flex_window_attention(q, k, v, table, index, mask, num_windows, scale or 1.0)
        else:
            bias = self.relative_position_bias(table)  # (heads, N, N)
            if mask is not None:
                bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # (num_windows, heads, N, N)
            if q.is_cuda:
                # V1's scale is SDPA's default 1 / sqrt(head_dim); V2's is in q already (factor 1)
                out = sdpa_windows(q, k, v, bias, dropout, scale=None if scale is not None else 1.0)
            else:
                # On CPU, SDPA with a float bias falls back to its generic math path with extra copies; the
                # same math written out is faster for small windows (README, Performance).
                # (B, num_windows, heads, N, ...) views: the bias broadcasts over the images without a copy.
                q, k, v = (t.view(B_ // num_windows, num_windows, heads, N, head_dim) for t in (q, k, v))
                attn = (q if scale is None else q * scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
                attn = F.dropout(attn.softmax(dim=-1), dropout, self.training)
                out = attn @ v
        out = out.reshape(B_, heads, N, head_dim).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))


class WindowAttention(_WindowAttention):
    """Swin V1: multi-head self-attention inside each window, scaled dot products and a learned relative
    position bias table."""

    def __init__(self, dim: int, window: int, num_heads: int, spec: BlockSpec = BlockSpec()):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.attention = spec.attention
        self.head_dim = dim // num_heads
        self.attn_drop = spec.attn_drop_rate
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = Linear(dim, 3 * dim, bias=spec.qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(spec.drop_rate)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def bias_table(self) -> torch.Tensor:
        return self.relative_position_bias_table

    def queries_keys_values(self, x: torch.Tensor):
        """(B_, N, C) -> q, k, v (each (B_, heads, N, head_dim)) and the logits' scale 1 / sqrt(head_dim)."""
        B_, N, _ = x.shape
        qkv = self.qkv(x).view(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v, self.head_dim**-0.5


class CosineWindowAttention(_WindowAttention):
    """Swin V2: scaled cosine attention inside each window, with a continuous relative position bias.

    cos(q, k) bounds the logits where V1's dot products grew with depth in large models; each head learns how
    sharp its attention is (logit_scale, clamped). The per-head scale is folded into the unit queries,
    (s * q/|q|) . k/|k| = s cos(q, k), so the shared forward (and SDPA, whose scale is one number) runs unchanged;
    it is computed in fp32 from the fp32 parameter, under autocast too, as in the official code."""

    def __init__(
        self, dim: int, window: int, num_heads: int, spec: BlockSpec = BlockSpec(), pretrained_window: int = 0
    ):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.pretrained_window = pretrained_window
        self.attention = spec.attention
        self.head_dim = dim // num_heads
        self.attn_drop = spec.attn_drop_rate
        self.logit_scale = nn.Parameter(torch.log(torch.full((num_heads, 1, 1), INITIAL_LOGIT_SCALE)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN, num_heads, bias=False)
        )
        coords = log_spaced_coords(window, pretrained_window)  # ((2w-1)^2, 2)
        self.register_buffer("relative_coords_table", coords, persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = Linear(dim, 3 * dim, bias=False)
        # biases for q and v only, as the official code (the key's is fixed at zero)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if spec.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if spec.qkv_bias else None
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(spec.drop_rate)

    def bias_table(self) -> torch.Tensor:
        """((2w-1)^2, heads): 16 sigmoid(MLP(offset)); the sigmoid is taken before the gather, on the
        (2w-1)^2 rows rather than the N^2 pairs (the same values)."""
        table = self.cpb_mlp(self.relative_coords_table)  # ((2w-1)^2, heads)
        return CPB_BIAS_RANGE * torch.sigmoid(table)

    def queries_keys_values(self, x: torch.Tensor):
        """(B_, N, C) -> s * q/|q|, k/|k|, v (each (B_, heads, N, head_dim)) and None: the scale is in q."""
        B_, N, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = linear(x, self.qkv.weight, bias).view(B_, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale = self.logit_scale.float().clamp(max=MAX_LOG_LOGIT_SCALE).exp()  # (heads, 1, 1)
        q = (F.normalize(q, dim=-1) * scale).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        return q, k, v, None

    def extra_repr(self) -> str:
        return f"window={self.window}, pretrained_window={self.pretrained_window}, num_heads={self.num_heads}"
