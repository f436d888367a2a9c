"""Where and how the model runs: the device, mixed precision, and the compile/DDP wrappers.

Every device/precision combination that cannot work is refused here with a one-line ConfigError, before
any work starts (a CUDA traceback mid-run is the alternative).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from swin_train.errors import ConfigError
from swin_train.models.flex import MIN_CUDA_CAPABILITY, flex_attention_available


def resolve_device(device: str | None) -> torch.device:
    """The device asked for ("cpu", "cuda", "cuda:N"), or CUDA when available for None."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device '{device}'; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return dev


@dataclass
class Amp:
    """Mixed precision: an autocast dtype (None = fp32) and, for fp16, a GradScaler."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_amp(mode: str, device: torch.device) -> Amp:
    """'auto' is bf16 on a CUDA device that computes in bf16 (Ampere and later), else none (fp32); fp16 gets
    a GradScaler. Refuses fp16 off CUDA (CPU autocast in fp16 is slow and its GradScaler path is not what
    users mean) and bf16 on a GPU without bf16 support. torch counts bf16 emulated in fp32 (pre-Ampere GPUs)
    as supported; 'auto' does not: emulation brings bf16's rounding without its speed (amp=bf16 allows it)."""
    cuda = device.type == "cuda"
    if mode == "auto":
        mode = "bf16" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "none"
    elif mode == "fp16" and not cuda:
        raise ConfigError(f"amp=fp16 needs a CUDA GPU (this run is on {device}); use amp=bf16 or amp=none")
    elif mode == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"amp=bf16: {name} does not support bfloat16; use amp=fp16 or amp=none")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return Amp(device.type, dtype, scaler)


def check_attention_backend(attention: str, attn_drop_rate: float, device: torch.device) -> None:
    """Training with model.attention=flex needs FlexAttention with gradients on `device`, and no
    attention dropout (FlexAttention has none)."""
    if attention != "flex":
        return
    if not flex_attention_available(device):
        cc = ".".join(map(str, MIN_CUDA_CAPABILITY))
        raise ConfigError(
            f"model.attention=flex needs a CUDA GPU of compute capability {cc}+ with Triton (this run is on "
            f"{device}); use model.attention=auto"
        )
    if attn_drop_rate > 0:
        raise ConfigError(
            "model.attention=flex has no attention dropout; set model.attn_drop_rate=0 or use auto"
        )


def wrap_for_training(
    model: nn.Module, *, compile: bool, distributed: bool, device: torch.device
) -> nn.Module:
    """The module the training step calls: DDP, then compiled, as asked.

    DDP is compiled, not wrapped around a compiled model, as torch's DDP notes say: dynamo then splits the
    graph at DDP's bucket boundaries (torch._dynamo.config.optimize_ddp), so each bucket's all-reduce starts
    while the rest of the backward runs. One process compiles the model as one graph (fullgraph: a graph
    break is an error); under DDP the graph breaks at DDP's own Python around the model, by design.
    DDP syncs no buffers before each forward: a Swin's buffers are index tables and masks derived from the
    architecture, the same on every rank, never changed by training (tests/test_device_step.py). Gradients
    are views into DDP's buckets (no copy into them and out again)."""
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, gradient_as_bucket_view=True, **_NO_FORWARD_BUFFER_SYNC
        )
    if compile:
        model = torch.compile(model, fullgraph=not distributed)
    return model


# torch 2.14 renamed DDP's broadcast_buffers (its False also skipped the sync at init) to forward_sync_buffers
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
