"""How a block's (B, H, W, C) map becomes windows and back, at any H x W: index tables for the padding, the
cyclic shift and the window partition, and the shift mask.

The rule is the official detection backbone's (Swin-Transformer-Object-Detection, SwinTransformerBlock): the
map is padded right and bottom with zero tokens to whole windows (Hp x Wp), then rolled by -shift, then cut
into windows; the shift mask is the classification code's, computed on the padded map: three bands of rows
(and of columns) at the bottom and right of the rolled map, attention across bands masked. The zero tokens are
not masked in either block (the official code leaves them in): they join a border window's attention with the
key and value of a zero input. On a map that windows tile (Hp x Wp = H x W) this is the classification code's
shift, partition and mask exactly.

Every table here is computed with tensor arithmetic on (H, W), never Python loops over sizes or slices, so the
same code runs with symbolic sizes inside torch.compile and torch.export (ONNX with dynamic height and width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Logit offset for token pairs that come from different image regions after the cyclic shift. The official
# code uses -100 (not -inf), which keeps a fully masked row finite; we keep it for identical numerics.
MASKED_LOGIT = -100.0


def whole_windows(size, window: int):
    """The number of windows (or patches, or 2x2 merges) that cover `size` tokens: ceil(size / window). Written
    as a floor division of non-negative numbers: a symbolic size stays a size expression, and the ONNX exporter
    (whose integer division truncates) computes it right."""
    return (size + window - 1) // window


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window * window, C), windows in row-major order (windows tile H, W)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, C)


def window_token_order(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """(Hp*Wp,) row-major index in the H x W map of each token of window_partition(roll(pad(x), -shift)), in
    window order; padding positions hold H*W, the index of the zero token appended to the map.

    Gathering the flattened map (with its zero token) by it is the padding, the cyclic shift and the window
    partition in one copy."""
    return window_layout(H, W, window, shift, with_mask=False)[0]


def shifted_window_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, N, N) additive mask for SW-MSA on an H x W map padded to whole windows: 0 within a region,
    MASKED_LOGIT across regions.

    After the cyclic shift by `shift`, a window at the border holds tokens from up to four image regions
    that are not neighbours in the image; attention between them is masked.
    """
    return window_layout(H, W, window, shift)[2]


def window_layout(H, W, window: int, shift: int, device=None, *, with_mask: bool = True):
    """A block's tables for an H x W map: (order, inverse, mask).

    order (Hp*Wp,): for each token in window order, its index in the flattened map, H*W for padding.
    inverse (H*W,): for each token of the map, its position in window order (order[inverse] = arange(H*W)).
    mask (num_windows, N, N) float32 (shift > 0 and `with_mask`), else None.

    Each table is built on a zero tensor of its full shape plus broadcast terms (never a permute or a
    reshape that merges strided dims), which keeps symbolic sizes free of guards in torch.export.
    """
    rows_of_windows, cols_of_windows = whole_windows(H, window), whole_windows(W, window)
    Hp, Wp = rows_of_windows * window, cols_of_windows * window
    arange = lambda n: torch.arange(n, device=device)
    grid = torch.zeros(rows_of_windows, cols_of_windows, window, window, dtype=torch.long, device=device)
    # row and column of each window-order position in the rolled, padded map, (nh, nw, w, w)
    rolled_row = grid + (arange(rows_of_windows) * window)[:, None, None, None] + arange(window)[:, None]
    rolled_col = grid + (arange(cols_of_windows) * window)[:, None, None] + arange(window)
    # the rolled map's (i, j) holds the padded map's ((i + shift) % Hp, (j + shift) % Wp); the wrap is a
    # subtraction (shift < window <= Hp), which ONNX takes with symbolic sizes (a remainder not)
    row, col = _wrap(rolled_row + shift, Hp), _wrap(rolled_col + shift, Wp)
    order = torch.where((row >= H) | (col >= W), H * W, row * W + col).flatten()
    # where each map token lands: its rolled position (r - shift) % Hp, then its window and place in it
    r = _wrap(arange(H) - shift + Hp, Hp)
    c = _wrap(arange(W) - shift + Wp, Wp)
    row_offset = (r // window) * (cols_of_windows * window * window) + (r % window) * window
    col_offset = (c // window) * (window * window) + c % window
    inverse = (
        torch.zeros(H, W, dtype=torch.long, device=device) + row_offset[:, None] + col_offset
    ).flatten()
    mask = None
    if shift and with_mask:
        # the classification code's three bands per axis of the rolled map: [0, -window), [-window, -shift),
        # [-shift, end); region label = row band * 3 + column band
        band_row = (rolled_row >= Hp - window).long() + (rolled_row >= Hp - shift).long()
        band_col = (rolled_col >= Wp - window).long() + (rolled_col >= Wp - shift).long()
        region = (band_row * 3 + band_col).view(rows_of_windows * cols_of_windows, window * window)
        different = region[:, None, :] != region[:, :, None]  # (num_windows, N, N)
        mask = different.float() * MASKED_LOGIT
    return order, inverse, mask


def _wrap(index: torch.Tensor, size) -> torch.Tensor:
    """index % size for indices in [0, 2 * size)."""
    return torch.where(index >= size, index - size, index)


def pad_right_bottom(x: torch.Tensor, height, width, *, channels_first: bool = False) -> torch.Tensor:
    """A (B, H, W, C) map (or a (B, C, H, W) image with `channels_first`) padded with zeros at the bottom and
    right to height x width; the input itself when the sizes are known to be equal (plain ints, or a graph
    traced for them). A symbolic graph always pads, possibly by 0: no guard, one graph for every size."""
    H, W = x.shape[-2:] if channels_first else x.shape[1:3]
    if known_equal((H, W), (height, width)):
        return x
    pad = (0, width - W, 0, height - H)
    return F.pad(x, pad if channels_first else (0, 0, *pad))


def known_equal(sizes, others) -> bool:
    """Whether the sizes are equal without a doubt: True for equal ints (eager, or a graph traced for fixed
    sizes), False for symbolic sizes (torch.compile's dynamic shapes, torch.export), where asking would add a
    guard and a graph per answer."""
    return all(statically_known_true(a == b) for a, b in zip(sizes, others, strict=True))


class GatherTokens(torch.autograd.Function):
    """out[:, i] = x_[:, index[i]], x_ = x with a zero token appended when `index` is longer than x (the map
    padded to whole windows); its gradient is the same gather back by `back_index`.

    Both directions of a block use it: map -> windows (index `order`, which reaches the zero token) and windows
    -> map (index `inverse`, which drops the padding). Why our own: `x[:, order]` would back-propagate through
    index_put with accumulation (a scatter-add), and pad + roll + permute-copy takes several passes over the
    map; one index_select each way is the cheapest."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, back_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(back_index)
        return _with_zero_token(x, index).index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back_index,) = ctx.saved_tensors
        return _with_zero_token(grad, back_index).index_select(1, back_index), None, None


def _with_zero_token(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L + 1, C) with a zero token last when `index` may point at it (it is longer than L, or
    the sizes are symbolic: then always, so that one traced graph serves padded and unpadded maps)."""
    if statically_known_true(index.shape[0] <= x.shape[1]):
        return x
    return F.pad(x, (0, 0, 0, 1))
