"""The oneDNN linear kernels give F.linear's numbers, and are only taken where they apply."""

import pytest
import torch
import torch.nn.functional as F

from swin_train.models import SwinTransformer, ops

pytestmark = pytest.mark.skipif(not ops._ONEDNN, reason="this torch build has no oneDNN linear kernel")

ROWS = ops.ONEDNN_MIN_ROWS + 8
WIDE = 104


def _inputs(rows=ROWS, k=WIDE, n=WIDE):
    x = torch.randn(2, rows // 2, k, requires_grad=True)
    w = (torch.randn(n, k) * 0.2).requires_grad_()
    b = torch.randn(n, requires_grad=True)
    return x, w, b


def _value_and_grads(fn, x, w, b, grad_out):
    for t in (x, w, b):
        t.grad = None
    out = fn(x, w, b)
    out.backward(grad_out)
    return out.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()


@pytest.mark.parametrize(
    "fn, reference",
    [
        (ops.linear, F.linear),
        (ops.linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b))),
    ],
)
@pytest.mark.parametrize("k", [WIDE, 24])  # 24: a narrow input gradient, on oneDNN as well
def test_same_values_and_gradients_as_torch(fn, reference, k):
    x, w, b = _inputs(k=k)
    assert ops.use_onednn(x)
    grad_out = torch.randn(*x.shape[:-1], w.shape[0])
    ours = _value_and_grads(fn, x, w, b, grad_out)
    theirs = _value_and_grads(reference, x, w, b, grad_out)
    for name, a, e in zip(("out", "grad x", "grad w", "grad b"), ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("k, n", [(WIDE, 24), (24, WIDE), (48, 48)])
def test_forward_and_input_gradient_take_onednn_at_any_width(monkeypatch, k, n):
    """Narrow outputs or inputs (a micro model's fc2, fc1) as wide ones: the forward and the input gradient on
    oneDNN, the weight gradient on MKL. Values and gradients stay F.linear's."""
    x, w, b = _inputs(k=k, n=n)
    calls = []
    onednn = ops._onednn_matmul
    monkeypatch.setattr(
        ops, "_onednn_matmul", lambda a, weight, *r: calls.append(a.shape[1]) or onednn(a, weight, *r)
    )
    grad_out = torch.randn(*x.shape[:-1], n)
    ours = _value_and_grads(ops.linear, x, w, b, grad_out)
    assert calls == [k, n]  # forward: (M, K) x W^T; input gradient: (M, N) x W
    theirs = _value_and_grads(F.linear, x, w, b, grad_out)
    for name, a, e in zip(("out", "grad x", "grad w", "grad b"), ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


def test_non_contiguous_input_and_fused_gelu_in_inference():
    x, w, b = _inputs()
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not x_t.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x_t, w, b), F.linear(x_t, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ops.linear_gelu(x_t, w, b), F.gelu(F.linear(x_t, w, b)), rtol=1e-5, atol=1e-5
        )


def test_onednn_only_where_it_applies():
    x, _, _ = _inputs()
    assert ops.use_onednn(x)
    assert not ops.use_onednn(x[:, :100])  # too few rows: MKL is as fast
    assert not ops.use_onednn(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ops.use_onednn(x)  # autocast must see F.linear to cast it
    compiled = torch.compile(
        lambda t: t * (2.0 if ops.use_onednn(t) else 3.0), backend="eager", fullgraph=True
    )
    assert torch.equal(compiled(torch.ones(ROWS, 4)), torch.full((ROWS, 4), 3.0))


def test_model_gradients_do_not_depend_on_the_kernel(monkeypatch):
    """A micro model whose first stage has 4,096+ token rows: every gradient as with F.linear."""
    # every Linear of stage 1 takes oneDNN (4,096 rows), stage 2's (1,024 rows) MKL
    arch = dict(img_size=64, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4)
    x = torch.randn(4, 3, 64, 64)  # 4 x 32 x 32 = 4,096 rows in stage 1
    fast = SwinTransformer(**arch, num_classes=5, drop_path_rate=0.0)
    plain = SwinTransformer(**arch, num_classes=5, drop_path_rate=0.0)
    plain.load_state_dict(fast.state_dict())
    fast(x).square().sum().backward()
    monkeypatch.setattr(ops, "_ONEDNN", False)
    plain(x).square().sum().backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
