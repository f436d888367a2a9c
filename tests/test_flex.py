"""FlexAttention window attention (swin_train.models.flex) against WindowAttention's explicit math.

On CPU FlexAttention runs forward only (eager: its reference math path); torch refuses its backward there.
The gradient checks on CPU therefore lift that refusal to run FlexAttention's own reference autograd (see
`flex_cpu_backward`); the compiled Triton kernels are checked by the CUDA test where a GPU exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as fa

from swin_train.models import flex
from swin_train.models.flex import flex_attention_available, flex_window_attention
from swin_train.models.swin import WindowAttention, shifted_window_mask

# Eager flex_attention warns once that it is unfused; on CPU that is the path we test on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CUDA_FLEX = flex_attention_available("cuda")


def explicit_window_attention(q, k, v, table, index, mask, num_windows, scale):
    """WindowAttention's explicit math (swin.py's CPU branch): (B_, heads, N, D) -> (B_, heads, N, D)."""
    B_, heads, N, D = q.shape
    bias = table[index.view(-1)].view(N, N, heads).permute(2, 0, 1)  # (heads, N, N)
    if mask is not None:
        bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # (num_windows, heads, N, N)
        q, k, v = (t.view(B_ // num_windows, num_windows, heads, N, D) for t in (q, k, v))
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    return (attn.softmax(dim=-1) @ v).reshape(B_, heads, N, D)


def window_setup(
    shift: int, window: int = 7, heads: int = 2, head_dim: int = 8, images: int = 2, device="cpu"
):
    """A WindowAttention on a (2 window x 2 window) map of `images` images: 4 windows of N = window^2 tokens."""
    resolution = 2 * window
    attn = WindowAttention(heads * head_dim, window, heads).to(device)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()  # std 1 (not 0.02), so the bias visibly moves the softmax
    num_windows = (resolution // window) ** 2
    x = torch.randn(images * num_windows, window * window, heads * head_dim, device=device)  # (B_, N, C)
    mask = shifted_window_mask(resolution, resolution, window, shift).to(device) if shift else None
    return attn, x, mask, num_windows


def qkv_of(attn: WindowAttention, x: torch.Tensor):
    """q, k, v as WindowAttention.forward computes them: each (B_, heads, N, head_dim)."""
    B_, N, _ = x.shape
    qkv = attn.qkv(x).view(B_, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def flex_args(attn: WindowAttention, mask, num_windows):
    table, index = attn.relative_position_bias_table, attn.relative_position_index
    return table, index, mask, num_windows, attn.head_dim**-0.5


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """Lift torch's "no FlexAttention backward on CPU" refusal for one test.

    The refusal is in the public wrapper (`_validate_device`, and no logsumexp output on CPU); the
    higher-order op underneath has a device-generic reference autograd (the dense math path torch checks its
    compiled kernels against), which this runs. Private torch API: skips if it has changed.
    """
    if not (hasattr(fa, "_validate_device") and hasattr(fa, "_apply_kernel_options")):
        pytest.skip("this torch's FlexAttention wrapper differs; cannot lift its CPU backward refusal")
    apply_kernel_options = fa._apply_kernel_options

    def with_logsumexp(*args, **kwargs):
        options = apply_kernel_options(*args, **kwargs)
        options["OUTPUT_LOGSUMEXP"] = torch.is_grad_enabled()  # the backward needs it
        return options

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    monkeypatch.setattr(fa, "_apply_kernel_options", with_logsumexp)


def test_availability_matches_this_torch_build():
    assert flex_attention_available("cpu", backward=False)
    assert not flex_attention_available("cpu")  # torch has no FlexAttention backward on CPU
    assert not flex_attention_available("meta", backward=False)
    if not torch.cuda.is_available():
        assert not flex_attention_available("cuda")


def test_torch_refuses_flex_backward_on_cpu():
    """Tripwire: when torch adds a CPU backward, flex_attention_available("cpu") should say so."""
    attn, x, mask, num_windows = window_setup(shift=3)
    q, k, v = qkv_of(attn, x)  # require grad through attn.qkv
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_window_attention(q, k, v, *flex_args(attn, mask, num_windows))


@pytest.mark.parametrize("shift", [0, 3], ids=["W-MSA", "SW-MSA"])
def test_forward_equals_window_attention(shift):
    """WindowAttention with flex in place of its attention gives the module's output (N = 49, 2 images)."""
    attn, x, mask, num_windows = window_setup(shift)
    with torch.no_grad():
        expected = attn(x, mask)  # (B_, N, C), the explicit path
        out = flex_window_attention(*qkv_of(attn, x), *flex_args(attn, mask, num_windows))
        B_, N, C = x.shape
        got = attn.proj(out.transpose(1, 2).reshape(B_, N, C))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if shift:  # the shift mask changes the result, so the comparison above covers it
        with torch.no_grad():
            unmasked = flex_window_attention(*qkv_of(attn, x), *flex_args(attn, None, num_windows))
        assert (unmasked - out).abs().max() > 1e-2


@pytest.mark.parametrize("shift", [0, 3], ids=["W-MSA", "SW-MSA"])
def test_gradients_equal_explicit_math(shift, flex_cpu_backward):
    """Gradients w.r.t. q, k, v and the bias table (through the in-kernel gather) equal the explicit path's."""
    attn, x, mask, num_windows = window_setup(shift)
    q, k, v = (t.detach().requires_grad_() for t in qkv_of(attn, x))
    table, index, mask, num_windows, scale = flex_args(attn, mask, num_windows)
    weight = torch.randn_like(q)  # a loss whose gradient reaches every output element differently

    expected = explicit_window_attention(q, k, v, table, index, mask, num_windows, scale)
    expected_grads = torch.autograd.grad((expected * weight).sum(), (q, k, v, table))
    out = flex_window_attention(q, k, v, table, index, mask, num_windows, scale)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v, table))

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for name, got, want in zip(("q", "k", "v", "bias_table"), grads, expected_grads):
        assert want.abs().max() > 1e-3, name  # a gradient that is really there
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_compiled_calls_do_not_fall_back_to_eager(monkeypatch):
    """W-MSA, SW-MSA and a grad-mode switch (train -> eval) each get a graph, beyond dynamo's recompile limit.

    Dynamo's backend is swapped for one that counts graphs (the guards under test are dynamo's, the same on
    every device); with the limit at 1, a fallback to eager flex would leave the count at 1.
    """
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def compile_counting():
        return torch.compile(fa.flex_attention, backend=counting_backend)

    torch._dynamo.reset()
    monkeypatch.setattr(flex, "compiled_flex_attention", compile_counting)
    # torch's own patch, not monkeypatch: pytest >= 9.2 undoes a setattr on a module whose attribute is
    # not in its __dict__ with delattr, which hides the dynamo setting for every later compile
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            # the last call: a new batch size (3 images) in a known signature
            for shift, grad, images in [(0, False, 2), (3, False, 2), (0, True, 2), (0, False, 3)]:
                attn, x, mask, num_windows = window_setup(shift, window=4, images=images)
                with torch.no_grad():
                    q, k, v = qkv_of(attn, x)
                    expected = explicit_window_attention(q, k, v, *flex_args(attn, mask, num_windows))
                with torch.set_grad_enabled(grad):  # nothing requires grad: CPU flex runs forward only
                    out = flex_window_attention(q, k, v, *flex_args(attn, mask, num_windows), compiled=True)
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
            assert len(graphs) == 3  # the batch dimension is dynamic: 3 images reuse the 2-image graph
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not CUDA_FLEX, reason="needs a CUDA GPU (sm80+) with Triton for compiled FlexAttention")
@pytest.mark.parametrize("shift", [0, 3], ids=["W-MSA", "SW-MSA"])
def test_compiled_cuda_equals_explicit_math(shift):
    """The compiled Triton kernels: outputs and gradients (bias table included) equal the explicit path."""
    attn, x, mask, num_windows = window_setup(shift, device="cuda")
    q, k, v = (t.detach().requires_grad_() for t in qkv_of(attn, x))
    table, index, mask, num_windows, scale = flex_args(attn, mask, num_windows)
    weight = torch.randn_like(q)

    expected = explicit_window_attention(q, k, v, table, index, mask, num_windows, scale)
    expected_grads = torch.autograd.grad((expected * weight).sum(), (q, k, v, table))
    out = flex_window_attention(q, k, v, table, index, mask, num_windows, scale)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v, table))

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("q", "k", "v", "bias_table"), grads, expected_grads):
        # the table's gradient sums B_ * N * N / (2w-1)^2 terms per entry in the kernel's (atomic) order
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d/d{n}: {m}")
