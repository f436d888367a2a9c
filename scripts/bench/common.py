"""What every part uses: the resolved settings (Setup), autocast dtypes, per-device defaults, the usable
CPU cores and the progress log."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU defaults keep the default invocation to a few minutes on 2 cores; CUDA ones fill a GPU.
DEFAULTS = {
    "cpu": dict(dtype="fp32", batch_size=8, warmup=2, repeats=5, iters=2),
    "cuda": dict(dtype="bf16", batch_size=128, warmup=10, repeats=5, iters=20),
}


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the table or the JSON."""
    print(msg, file=sys.stderr, flush=True)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Setup:
    """Resolved benchmark settings (command line + per-device defaults)."""

    name: str | None
    arch: dict
    num_classes: int
    drop_path: float
    batch_size: int
    dtype: str
    device: torch.device
    compile: tuple[str, ...]  # the implementations that are compiled
    grad_checkpointing: bool
    attention: str
    impls: tuple[str, ...]
    warmup: int
    repeats: int
    iters: int
    threads: int
    cpu_split: int = 1  # ours' train step in this many parts on threads (1: off)

    def config(self) -> dict:
        """These settings as the model report's "config" records them (threads are under "env")."""
        return {
            "model": self.name,
            "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in self.arch.items()},
            "num_classes": self.num_classes,
            "drop_path": self.drop_path,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "device": self.device.type,
            "compile": list(self.compile),
            "grad_checkpointing": self.grad_checkpointing,
            "cpu_split": self.cpu_split,
            "attention": self.attention,
            "impls": list(self.impls),
            "warmup": self.warmup,
            "repeats": self.repeats,
            "iters": self.iters,
        }
