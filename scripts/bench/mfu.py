"""Model FLOP utilisation: the device's peak FLOP/s (a GPU's datasheet figure, a CPU's measured matmul
speed, or --peak-tflops) and the share of it that a measured img/s uses."""

from __future__ import annotations

import argparse
import math
import re
import time

import torch

from bench.common import DTYPES, Setup, log

# Dense peak TFLOP/s (bf16/fp16 tensor core, tf32 tensor core, fp32 non-tensor) from NVIDIA datasheets,
# matched against torch.cuda.get_device_name(). Unlisted devices (H100 NVL, H200 NVL, ...) give no MFU
# unless --peak-tflops is passed.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    (r"H200(?!.*NVL)", (989.4, 494.7, 67.0)),
    (r"H100.*PCIe", (756.0, 378.0, 51.0)),
    (r"H100.*(HBM3|SXM)", (989.4, 494.7, 67.0)),
    (r"A100", (312.0, 156.0, 19.5)),
)
# A CPU's attainable matmul peak is measured: no datasheet figure fits a shared VM's clocks and cores. Square
# products of this size reach the plateau of MKL's sgemm on the 2-core CI machine (2048: ~10% lower).
CPU_PEAK_SIZE = 4096
CPU_PEAK_REPEATS = 3


def peak_tflops(device_name: str, dtype: str, tf32: bool) -> float | None:
    """Dense peak TFLOP/s of a known GPU for the math the dtype runs on, or None when unknown."""
    for pattern, (half, tf32_peak, fp32) in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return half if dtype in ("bf16", "fp16") else tf32_peak if tf32 else fp32
    return None


def measured_matmul_tflops(dtype: str, size: int = CPU_PEAK_SIZE, repeats: int = CPU_PEAK_REPEATS) -> float:
    """TFLOP/s of the fastest of `repeats` (size x size) @ (size x size) CPU products in `dtype`, after one
    untimed product: what the model's matrix products could reach at best on this CPU."""
    a, b = (torch.randn(size, size).to(DTYPES[dtype]) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def resolve_peak(args: argparse.Namespace, setup: Setup, device_name: str) -> tuple[float | None, str]:
    """(peak TFLOP/s for MFU or None, where it comes from)."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if setup.device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        peak = peak_tflops(device_name, setup.dtype, tf32)
        return peak, ("datasheet" if peak else "unknown GPU: pass --peak-tflops")
    log(f"measuring the CPU's {setup.dtype} matmul peak ({CPU_PEAK_SIZE}x{CPU_PEAK_SIZE})")
    return measured_matmul_tflops(setup.dtype), (
        f"measured: fastest of {CPU_PEAK_REPEATS} {setup.dtype} {CPU_PEAK_SIZE}x{CPU_PEAK_SIZE} matmuls"
    )


def mfu(macs_per_image: int, img_s: float, peak: float | None, train: bool) -> float | None:
    """Model FLOP utilisation: (3 if train else 1) x 2 x MACs per image x img/s / peak FLOP/s."""
    if peak is None:
        return None
    return (3 if train else 1) * 2 * macs_per_image * img_s / (peak * 1e12)
