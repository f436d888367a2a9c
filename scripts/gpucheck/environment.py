"""What the check records about the machine (host, GPUs from nvidia-smi, versions, git commit) and how many
GPUs it may use; neither creates a CUDA context in this process."""

from __future__ import annotations

import os
import platform
import socket
import subprocess

from gpucheck.running import REPO


def visible_gpus() -> int:
    """CUDA devices this process may use (honours CUDA_VISIBLE_DEVICES; creates no CUDA context)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpus() -> list[dict]:
    gpus = []
    try:
        query = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,driver_version",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        for line in query.stdout.strip().splitlines():
            index, name, memory, driver = (x.strip() for x in line.split(","))
            gpus.append({"index": int(index), "name": name, "memory_mib": int(memory), "driver": driver})
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return gpus


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def environment(num_gpus: int) -> dict:
    """Host, GPUs (from nvidia-smi: no CUDA context in this process), versions and the git commit."""
    import timm
    import torch

    return {
        "host": socket.gethostname(),
        "gpus": _gpus(),
        "visible_gpus": num_gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "git_commit": _git_commit(),
    }
