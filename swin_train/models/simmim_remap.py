"""Relative position bias tables of Swin V1 carried to another window (SimMIM pre-training at window 6 or 12,
fine-tuning at 7 or 14), as the official utils_simmim.remap_pretrained_keys_swin does it.

The official remap places the pre-trained table's (2 w - 1) offsets per axis at geometric-progression
coordinates (0, +-1, +-(1 + q), +-(1 + q + q^2), ..., q found by bisection so that the outermost lands near
the new window's last offset), and evaluates, per head, `scipy.interpolate.interp2d(x, y, z, kind='cubic')`
at the new window's integer offsets. interp2d was removed in SciPy 1.14. On a regular grid it fitted
FITPACK's interpolating spline (regrid, s=0): a tensor product of cubic splines whose interior knots are the
data points but the second and the second-to-last, i.e. the not-a-knot cubic spline along each axis; its
evaluation (bispev) clamps points outside the data to the edge. Here that spline is built in float64 as a
linear map per axis (`cubic_spline_matrix`), so the remap is E @ z @ E^T for every head at once, in torch
with no SciPy (which swin-train does not otherwise need); tests hold it to SciPy's RectBivariateSpline (the
same FITPACK routine) and to interp2d's numbers.

Swin V2 has no table: its attention computes the bias with a small MLP (`cpb_mlp`) from log-spaced offsets of
its current window, scaled by `pretrained_window_sizes`. The official remap interpolates nothing for V2; it
drops the derived buffers (`relative_coords_table`, `relative_position_index`, `attn_mask`), rebuilt for the
new window, and renames `rpe_mlp` to `cpb_mlp`. The official V2 fine-tuning recipe sets
`PRETRAINED_WINDOW_SIZES: [12, 12, 12, 6]` so the MLP sees the offsets of the window it was trained on.
"""

from __future__ import annotations

import torch


def geometric_offsets(src_size: int, dst_size: int) -> list[float]:
    """The official coordinates of a table side of `src_size` offsets when remapped to `dst_size`
    (sides 2 w - 1): 0, +-1, +-(1 + q), ... with q bisected in [1.01, 1.5] until the outermost, the sum
    1 + q + ... + q^(src_size // 2 - 1), is within 1e-6 of dst_size // 2 (the same float steps)."""

    def geometric_progression(a: float, r: float, n: int) -> float:
        return a * (1.0 - r**n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def cubic_spline_matrix(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(len(targets), len(x)) float64 E such that E @ y is the not-a-knot cubic spline through (x, y)
    evaluated at `targets` (clamped to [x[0], x[-1]], as FITPACK's bispev does); x increasing, >= 4 points.

    The spline's second derivatives M solve A M = B y: continuity of the first derivative at the inner
    points, and of the third at x[1] and x[-2] (not-a-knot). On [x_i, x_i+1] with h = x_i+1 - x_i, a = x_i+1 - t,
    b = t - x_i: s(t) = (a y_i + b y_i+1) / h + (a^3 - h^2 a) M_i / (6 h) + (b^3 - h^2 b) M_i+1 / (6 h).
    """
    x, t = x.double(), targets.double().clamp(x[0], x[-1])
    n = len(x)
    if n < 4:
        raise ValueError(f"a cubic spline needs at least 4 points, got {n}")
    h = x[1:] - x[:-1]
    a_mat, b_mat = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    a_mat[0, :3] = torch.stack([h[1], -(h[0] + h[1]), h[0]])
    a_mat[-1, -3:] = torch.stack([h[-1], -(h[-2] + h[-1]), h[-2]])
    for i in range(1, n - 1):
        a_mat[i, i - 1 : i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        b_mat[i, i - 1 : i + 2] = 6 * torch.stack([1 / h[i - 1], -(1 / h[i - 1] + 1 / h[i]), 1 / h[i]])
    second = torch.linalg.solve(a_mat, b_mat)  # (n, n): M = second @ y
    i = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)
    hi, a, b = h[i], x[i + 1] - t, t - x[i]
    rows = torch.arange(len(t))
    values = torch.zeros(len(t), n, dtype=torch.float64)
    values[rows, i] = a / hi
    values[rows, i + 1] += b / hi
    return (
        values
        + ((a**3 - hi**2 * a) / (6 * hi))[:, None] * second[i]
        + ((b**3 - hi**2 * b) / (6 * hi))[:, None] * second[i + 1]
    )


def remap_relative_position_bias_table(table: torch.Tensor, src_window: int, dst_window: int) -> torch.Tensor:
    """A Swin V1 attention's ((2 src - 1)^2, heads) bias table carried to a window of `dst_window`:
    ((2 dst - 1)^2, heads), each head's (2 src - 1) x (2 src - 1) grid of offsets (dh, dw) interpolated as
    the official remap_pretrained_keys_swin does (see the module docstring); the same table when the
    windows are equal. Computed in float64, returned in the table's dtype."""
    src_size, dst_size = 2 * src_window - 1, 2 * dst_window - 1
    if table.ndim != 2 or table.shape[0] != src_size**2:
        raise ValueError(
            f"a relative position bias table of window {src_window} is ({src_size**2}, heads), "
            f"got {tuple(table.shape)}"
        )
    if src_window < 3 or dst_window < 1:
        raise ValueError(
            f"remapping a bias table needs a source window of at least 3 (got {src_window}) "
            f"and a target window of at least 1 (got {dst_window})"
        )
    if src_size == dst_size:
        return table
    x = torch.tensor(geometric_offsets(src_size, dst_size), dtype=torch.float64)
    half = dst_size // 2
    spline = cubic_spline_matrix(x, torch.arange(-half, half + 1, dtype=torch.float64))  # (dst, src)
    grids = table.detach().to(torch.float64).T.reshape(-1, src_size, src_size)  # (heads, dh, dw)
    remapped = spline @ grids @ spline.T  # (heads, dst, dst)
    return remapped.reshape(table.shape[1], -1).T.contiguous().to(table.dtype)
