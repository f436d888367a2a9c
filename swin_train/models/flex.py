"""Swin's window attention with FlexAttention: the relative position bias and the shift mask inside the kernel.

Why: the explicit path (`WindowAttention.forward` on CUDA) gathers the (heads, N, N) relative position bias
from its table, adds the (num_windows, N, N) shift mask and hands the sum to scaled_dot_product_attention as
a dense additive bias, materialised in memory every call and read for every (image, window, head); its
gradient is formed at the bias's broadcast size and then reduced and scattered into the table.
FlexAttention instead generates one fused kernel from a `score_mod` that adds
`table[index[i, j], h] + mask[b % num_windows, i, j]` to each logit: only the small table ((2w-1)^2 x heads),
the (N, N) index and the mask are read, nothing of size (B_, heads, N, N) is materialised, and the backward
kernel accumulates the table's gradient itself. Whether this beats the explicit path for 49-token windows
(FlexAttention tiles the sequence in blocks of up to 128 tokens, padding N = 49 inside the kernel) is what
`scripts/benchmark.py --attention flex` measures on a GPU (README, Performance).

Numerics are those of the official code: the shift mask is the additive MASKED_LOGIT (-100), not a block
mask with -inf; with Swin's region layout every row keeps at least its own token, so no row is all masked.

Where it runs (torch 2.14): on CUDA, compiled (`torch.compile(flex_attention)`, Triton kernels, forward and
backward). On CPU, FlexAttention runs forward only: eager `flex_attention` takes its reference math path
(correct, unfused), `torch.compile` its C++ kernel; the public API refuses inputs that require grad on CPU
("FlexAttention does not support backward on CPU"). `flex_attention_available` encodes this.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

try:  # FlexAttention is in torch >= 2.5; setup.cfg allows 2.4
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    flex_attention = None

# Dynamo compiles `flex_attention` once per distinct call signature: heads and head_dim are static, and grad
# mode, dtype and which score_mod (with or without the shift mask) are guarded on. Swin-T alone needs 7 graphs
# (3 stages x {W-MSA, SW-MSA} + the last stage) per grad mode, so training + evaluation exceeds dynamo's
# default of 8 per function, after which it silently falls back to the unfused eager path. The limit is raised
# only around our calls; the batch dimension is marked dynamic so new batch sizes do not add graphs.
RECOMPILE_LIMIT = 64

# Compute capability FlexAttention's Triton kernels are tested on (torch's own test suite requires sm80+).
MIN_CUDA_CAPABILITY = (8, 0)


def flex_attention_available(device: torch.device | str, *, backward: bool = True) -> bool:
    """Whether `flex_window_attention` runs on `device` in this torch build (with gradients if `backward`)."""
    if flex_attention is None or not torch._dynamo.is_dynamo_supported():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return (
            torch.cuda.is_available()
            and has_triton()
            and torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
        )
    # CPU: forward only (torch has no FlexAttention backward on CPU).
    return device.type == "cpu" and not backward


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """`torch.compile(flex_attention)`, built once per process (the compiled graphs are cached by dynamo)."""
    return torch.compile(flex_attention)


@contextlib.contextmanager
def _recompile_limit(limit: int) -> Iterator[None]:
    """Raise dynamo's per-function recompile limit to at least `limit` (renamed in torch 2.7)."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: max(limit, getattr(torch._dynamo.config, name))}):
        yield


def flex_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor,
    relative_index: torch.Tensor,
    mask: torch.Tensor | None,
    num_windows: int,
    scale: float,
    *,
    compiled: bool | None = None,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias[h, i, j] + mask[w, i, j]) v per window, the bias and mask added in-kernel.

    q, k, v: (B * num_windows, heads, N, head_dim), rows ordered (image, window) as `window_partition` makes
    them, so row b is window b % num_windows. bias_table: ((2w-1)^2, heads), gathered by relative_index (N, N)
    inside the kernel, so its gradient is computed by FlexAttention's backward. mask: (num_windows, N, N)
    additive (0 or MASKED_LOGIT) for shifted windows, or None. Returns (B * num_windows, heads, N, head_dim).
    Swin V2 passes its computed table (16 sigmoid of the position MLP; the gradient flows on into the MLP),
    its logit scale folded into q, and scale 1.

    `compiled` (default: on CUDA) runs the Triton kernels of `torch.compile(flex_attention)`; eager flex is
    the unfused reference path. `kernel_options` passes through to flex_attention (block sizes, for tuning).
    Inside an already compiled model, flex_attention is traced into the model's graph.
    """
    if flex_attention is None:
        raise RuntimeError("FlexAttention needs torch >= 2.5; check flex_attention_available(device) first")
    B_, heads, N, _ = q.shape
    if relative_index.shape != (N, N) or bias_table.shape[1] != heads:
        raise ValueError(
            f"relative_index {tuple(relative_index.shape)} / bias_table {tuple(bias_table.shape)} do not fit "
            f"{heads} heads of {N} tokens; pass the block's relative_position_index and bias table"
        )
    if mask is not None and (mask.shape != (num_windows, N, N) or B_ % num_windows):
        raise ValueError(
            f"mask {tuple(mask.shape)} does not fit {B_} rows of {num_windows} windows of {N} tokens; "
            "pass the block's attn_mask and its number of windows"
        )

    if mask is None:

        def score_mod(score, b, h, i, j):  # each argument a scalar: the logit and its (batch, head, q, kv)
            return score + bias_table[relative_index[i, j], h]

    else:

        def score_mod(score, b, h, i, j):
            return score + bias_table[relative_index[i, j], h] + mask[b % num_windows, i, j]

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale, kernel_options=kernel_options)
    if compiled is None:
        compiled = q.is_cuda
    if compiled:
        for t in (q, k, v):  # one graph for every batch size (a batch of 1 may still specialise)
            torch._dynamo.maybe_mark_dynamic(t, 0)
    attend = compiled_flex_attention() if compiled else flex_attention
    with _recompile_limit(RECOMPILE_LIMIT):
        return attend(q, k, v, score_mod=score_mod, scale=scale, kernel_options=kernel_options)
