"""--linear-kernels mode, the evidence for swin_train/models/ops.py: each Linear shape of a model timed with
F.linear (MKL) and with the oneDNN kernel, forward and input gradient, in GFLOP/s."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench.common import Setup, log
from bench.memory import process_malloc
from bench.report import environment
from swin_train.errors import ConfigError
from swin_train.models import ops


def linear_shapes(arch: dict, batch_size: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every distinct Linear in the blocks and patch merging, in stage order."""
    shapes = []
    grid = arch["img_size"] // arch["patch_size"]
    for i in range(len(arch["depths"])):
        rows, dim = batch_size * (grid // 2**i) ** 2, arch["embed_dim"] * 2**i
        hidden = int(dim * 4)
        shapes += [(rows, dim, 3 * dim), (rows, dim, dim), (rows, dim, hidden), (rows, hidden, dim)]
        if i < len(arch["depths"]) - 1:
            shapes.append((rows // 4, 4 * dim, 2 * dim))
    return list(dict.fromkeys(shapes))


@torch.no_grad()
def time_linear_kernels(rows: int, k: int, n: int, repeats: int, iters: int) -> dict[str, float]:
    """GFLOP/s of one (rows, k) x (k, n) product per kernel: best round, kernels interleaved in each round."""
    x, w, b, grad = torch.randn(rows, k), torch.randn(n, k), torch.randn(n), torch.randn(rows, n)
    kernels = {
        "forward_mkl": lambda: F.linear(x, w, b),
        "forward_onednn": lambda: ops._onednn_matmul(x, w, b),
        "grad_input_mkl": lambda: grad @ w,
        "grad_input_onednn": lambda: ops._onednn_matmul(grad, w.t(), None),
    }
    best = dict.fromkeys(kernels, math.inf)
    for fn in kernels.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in kernels.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / iters)
    gflop = 2 * rows * k * n / 1e9
    return {f"{name}_gflops": gflop / seconds for name, seconds in best.items()}


def check_linear_kernels(device: str) -> None:
    """ConfigError unless both kernels can run: on the CPU, with a torch built with oneDNN."""
    if device != "cpu" or not ops._ONEDNN:
        raise ConfigError(
            "--linear-kernels compares CPU kernels and needs torch with oneDNN; use --device cpu"
        )


def run_linear_kernels(setup: Setup, args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Best-of-rounds GFLOP/s of F.linear and oneDNN per shape, the two interleaved in every round."""
    torch.set_num_threads(setup.threads)
    malloc = process_malloc(args)
    results = []
    for rows, k, n in linear_shapes(setup.arch, setup.batch_size):
        gflops = time_linear_kernels(rows, k, n, setup.repeats, setup.iters)
        kernel = "oneDNN" if ops.use_onednn(torch.empty(rows, k)) else "MKL"  # swin-train's, both products
        uses = {"forward_uses": kernel, "grad_input_uses": kernel}
        results.append({"rows": rows, "in": k, "out": n, **gflops, **uses})
        log(f"  {rows} x {k} -> {n}: " + ", ".join(f"{m} {v:.0f}" for m, v in gflops.items()))
    return {
        "config": {
            "model": setup.name,
            "batch_size": setup.batch_size,
            "repeats": setup.repeats,
            "iters": setup.iters,
            "onednn_min_rows": ops.ONEDNN_MIN_ROWS,
        },
        "env": environment(setup, argv, malloc),
        "results": results,
    }
