"""The model's linear layers on CPU: oneDNN matmuls where they measure faster than F.linear's MKL path.

Why our own kernel choice: on CPU, `F.linear` runs MKL's sgemm. oneDNN's fp32 matmul
(`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend uses) is faster for the
token-heavy matrices of Swin's early stages, in the forward and in the input gradient and whatever their width,
while for the last stages' few rows MKL is as fast or faster: `python scripts/benchmark.py --linear-kernels`
measures every shape. So a Linear takes oneDNN for both products from `ONEDNN_MIN_ROWS` rows, and the weight
gradient stays on MKL. Both compute in fp32: the logits agree with `F.linear`'s to about 1e-6. In inference the
first MLP layer also fuses its GELU (exact erf form) into the matmul, which saves a pass over the largest
activation. The gain in a whole step is in the README's performance section.

Everything else (CUDA, autocast, torch.compile tracing, few rows, a torch build without oneDNN) takes
`F.linear`, so the parameters, their names and the numerics are those of `nn.Linear`. Unlike `F.linear`, the
oneDNN path has no double backward (`create_graph=True` through it raises); nothing here needs one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows (tokens in the batch) from which oneDNN is at least as fast as MKL in both products, at any width
# (`benchmark.py --linear-kernels`, README); Swin-T at batch 8 has 25,088 rows in stage 1, 6,272 in stage 2,
# 1,568 in stage 3 and 392 in stage 4.
ONEDNN_MIN_ROWS = 2048


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_available()


def use_onednn(x: torch.Tensor) -> bool:
    """Whether a Linear of `x` (..., in_features) takes the oneDNN kernels: fp32 on CPU, eager, outside
    autocast, enough rows."""
    return (
        _ONEDNN
        and not torch.compiler.is_compiling()  # first: no guard on the row count in compiled graphs
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]
    )


def _onednn_matmul(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none"):
    """(M, K) @ (N, K).T + bias, then `act` ("none" or "gelu", the exact erf form) -> (M, N)."""
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x2d.contiguous(), weight.contiguous(), bias, act, [], algorithm)


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b with the forward and the input gradient on oneDNN, the weight gradient on MKL."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(x2d, weight)
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        return _onednn_matmul(x2d, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K), weight as W^T
            grad_x = _onednn_matmul(grad_2d, weight.t(), None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t() @ x2d  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the forward and the input gradient on oneDNN where that is faster (module docstring)."""
    return _OneDnnLinear.apply(x, weight, bias) if use_onednn(x) else F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU(x W^T + b); one fused oneDNN kernel when no gradient is needed."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad and use_onednn(x):
        out = _onednn_matmul(x.reshape(-1, x.shape[-1]), weight, bias, act="gelu")
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(linear(x, weight, bias))


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose product runs through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
