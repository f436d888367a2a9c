"""The bias-table remap across windows (models/simmim_remap.py) against the official SimMIM fine-tuning's
interp2d cubic interpolation: SciPy's FITPACK spline, numbers from interp2d itself, the official function."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from official import official_module

from swin_train.models.simmim_remap import (
    cubic_spline_matrix,
    geometric_offsets,
    remap_relative_position_bias_table,
)


def _table(window: int, heads: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2 * window - 1) ** 2, heads, generator=g) * 0.02 + torch.randn(heads, generator=g)


def _interp2d_cubic(x, y, z):
    """What SciPy <= 1.13's `interp2d(x, y, z, kind='cubic')` computed for z on the regular grid (len(y),
    len(x)): FITPACK's regrid with kx = ky = 3, s = 0 on z.T, evaluated by bispev and transposed back; that
    is RectBivariateSpline. (bisplrep, its scattered-data path, fits another spline.)"""
    from scipy.interpolate import RectBivariateSpline

    spline = RectBivariateSpline(np.asarray(x, float), np.asarray(y, float), np.asarray(z).T, kx=3, ky=3, s=0)
    return lambda dx, dy: spline(np.asarray(dx, float), np.asarray(dy, float)).T


def _official_math(table: torch.Tensor, src_window: int, dst_window: int) -> torch.Tensor:
    """remap_pretrained_keys_swin's loop for one table, with interp2d as `_interp2d_cubic`."""
    src, dst = 2 * src_window - 1, 2 * dst_window - 1
    x = geometric_offsets(src, dst)
    t = dst // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    heads = [
        torch.Tensor(_interp2d_cubic(x, x, table[:, i].view(src, src).float().numpy())(dx, dx))
        .contiguous()
        .view(-1, 1)
        for i in range(table.shape[1])
    ]
    return torch.cat(heads, dim=-1)


@pytest.mark.parametrize("src, dst, heads", [(6, 7, 4), (12, 14, 3), (7, 6, 2), (3, 5, 2), (6, 12, 2)])
def test_remap_equals_the_official_interp2d_cubic_through_fitpack(src, dst, heads):
    pytest.importorskip("scipy")
    table = _table(src, heads)
    ours = remap_relative_position_bias_table(table, src, dst)
    assert ours.shape == ((2 * dst - 1) ** 2, heads) and ours.dtype == torch.float32
    assert torch.equal(ours, _official_math(table, src, dst))  # float64 inside both, then float32
    in64 = remap_relative_position_bias_table(table.double(), src, dst)
    torch.testing.assert_close(in64, _official_math(table, src, dst).double(), rtol=0, atol=1e-7)


def test_remap_reproduces_numbers_from_scipy_1_13_interp2d():
    """Values printed by the official loop on scipy 1.13.1 (the last with interp2d) for this table."""
    src, heads = 11, 2
    index = torch.arange(src * src, dtype=torch.float64)[:, None] * 0.37 + torch.arange(heads)[None, :]
    table = (torch.sin(index) * 0.05).float()
    ours = remap_relative_position_bias_table(table.double(), 6, 7)
    interp2d = {
        (0, 0): -1.5015488718118884e-06,
        (6, 1): 0.014375270430823272,
        (40, 0): 0.04303131882947926,
        (84, 1): -0.04676049575209613,  # offset (0, 0): a data point, kept as it is
        (100, 0): 0.0414974824030172,
        (168, 1): 0.049414871713204384,
    }
    for (row, head), value in interp2d.items():
        assert ours[row, head].item() == pytest.approx(value, rel=1e-12, abs=1e-15), (row, head)
    assert ours[84, 1] == table[60, 1].double()


def test_remap_equals_the_official_function_from_the_snapshot(tmp_path, monkeypatch):
    """utils_simmim.remap_pretrained_keys_swin itself (SciPy's interp2d replaced by its FITPACK spline)."""
    pytest.importorskip("scipy")
    official = official_module("official_utils_simmim", "utils_simmim.py", tmp_path)
    monkeypatch.setattr(
        official.interpolate, "interp2d", lambda x, y, z, kind: _interp2d_cubic(x, y, z), raising=False
    )
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    pretrained = {key: _table(6, 4), "layers.0.blocks.1.attn.relative_position_index": torch.zeros(121)}

    class Finetuned(torch.nn.Module):
        def state_dict(self):
            return {key: torch.zeros(13 * 13, 4)}

    remapped = official.remap_pretrained_keys_swin(Finetuned(), dict(pretrained), logging.getLogger("test"))
    assert list(remapped) == [key]  # the index is rebuilt, not loaded
    torch.testing.assert_close(
        remap_relative_position_bias_table(pretrained[key], 6, 7), remapped[key], rtol=1e-5, atol=0
    )
    assert torch.equal(remap_relative_position_bias_table(pretrained[key], 6, 7), remapped[key])


def test_geometric_offsets_are_the_official_progression():
    x = geometric_offsets(11, 13)  # window 6 -> 7
    q = x[7] - x[6]
    assert len(x) == 11 and x[5] == 0.0 and x[6] == 1.0 and x[:5] == [-v for v in reversed(x[6:])]
    assert all(b - a == pytest.approx(q ** (i + 1), rel=1e-12) for i, (a, b) in enumerate(zip(x[6:], x[7:])))
    assert 1.01 < q < 1.5 and x[-1] == pytest.approx(6, abs=1e-5)  # 1 + q + ... + q^4 = 13 // 2


def test_spline_matrix_is_exact_on_cubics_and_interpolates():
    x = torch.tensor([-4.0, -2.5, -1.0, 0.0, 1.0, 2.5, 4.0], dtype=torch.float64)
    t = torch.linspace(-4, 4, 17, dtype=torch.float64)
    cubic = lambda v: 0.3 * v**3 - v**2 + 2 * v - 1  # a not-a-knot spline reproduces any cubic
    torch.testing.assert_close(cubic_spline_matrix(x, t) @ cubic(x), cubic(t), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        cubic_spline_matrix(x, x), torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12
    )
    outside = cubic_spline_matrix(x, torch.tensor([-9.0, 9.0], dtype=torch.float64))
    assert torch.equal(outside, cubic_spline_matrix(x, torch.tensor([-4.0, 4.0], dtype=torch.float64)))


def test_remap_keeps_an_equal_window_and_rejects_bad_tables():
    table = _table(7, 2)
    assert remap_relative_position_bias_table(table, 7, 7) is table
    with pytest.raises(ValueError, match=r"window 6 is \(121, heads\), got \(169, 2\)"):
        remap_relative_position_bias_table(table, 6, 7)
    with pytest.raises(ValueError, match="source window of at least 3"):
        remap_relative_position_bias_table(_table(2, 2), 2, 7)
    half = remap_relative_position_bias_table(table.half(), 7, 8)
    assert half.dtype == torch.float16 and not half.isnan().any() and math.isfinite(half.float().abs().max())
