"""Memory: this process's malloc setting, and CPU peak RSS measured per implementation in a fresh
subprocess (`benchmark.py --memory-probe`), since a process's peak RSS never goes down."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from processes.proc import status_kib

import swin_train
from bench.common import Setup, log
from bench.models import build_model
from bench.timing import Runner
from swin_train.allocator import keep_freed_memory

# A probe is `benchmark.py --memory-probe SPEC` (a hidden flag): a fresh process whose RSS is one model's.
BENCHMARK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmark.py"


def process_malloc(args: argparse.Namespace) -> str:
    """Keep freed memory in this process as swin-train does, unless --system-malloc; says which it is."""
    return "system" if args.system_malloc or not keep_freed_memory() else "keep freed memory"


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process: eager inference then train steps of one implementation on CPU.

    Returns peak RSS (VmHWM) minus the RSS before the model was built, in MiB, after inference and
    after training (VmHWM only grows, and training needs more than inference, so the order keeps both
    readings meaningful)."""
    torch.set_num_threads(spec["threads"])
    if spec.get("malloc") != "system":
        keep_freed_memory()
    before = status_kib("VmRSS")
    if before is None:
        return {"infer": None, "train": None}
    torch.manual_seed(0)
    model = build_model(
        spec["impl"],
        spec["arch"],
        spec["num_classes"],
        spec["drop_path"],
        spec.get("grad_checkpointing", False),
    )
    runner = Runner(spec["impl"], model, torch.device("cpu"), spec["dtype"])
    size = spec["arch"]["img_size"]
    x = torch.randn(spec["batch_size"], 3, size, size)
    y = torch.randint(0, spec["num_classes"], (spec["batch_size"],))
    out = {}
    for mode, step in (("infer", lambda: runner.infer_step(x)), ("train", lambda: runner.train_step(x, y))):
        for _ in range(spec["steps"]):
            step()
        out[mode] = (status_kib("VmHWM") - before) / 1024
    return out


def cpu_memory(setup: Setup, malloc: str) -> dict[str, dict]:
    """Peak RSS of each implementation, each in its own subprocess (run side by side, before timing)."""
    package_root = str(Path(swin_train.__file__).resolve().parents[1])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    )
    procs = {}
    for impl in setup.impls:
        spec = dict(
            impl=impl,
            arch=setup.arch,
            num_classes=setup.num_classes,
            drop_path=setup.drop_path,
            batch_size=setup.batch_size,
            dtype=setup.dtype,
            threads=setup.threads,
            steps=2,
            malloc=malloc,
            grad_checkpointing=setup.grad_checkpointing,
        )
        cmd = [sys.executable, str(BENCHMARK_SCRIPT), "--memory-probe", json.dumps(spec)]
        procs[impl] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for impl, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            tail = stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"memory probe for {impl} failed: {tail[0]}")
        out[impl] = json.loads(stdout.strip().splitlines()[-1])
    return out


def peak_memory(setup: Setup, measure: bool, malloc: str) -> tuple[dict[str, dict] | None, str]:
    """(each implementation's CPU peak RSS per mode, or None where it is not measured here, and what the
    report's peak memory is): on CUDA the timed rounds measure it instead."""
    if setup.device.type == "cuda":
        note = "CUDA max_memory_allocated per round, as if alone (weights, optimizer state, input included)"
        return None, note
    if not measure or setup.compile:
        return None, "n/a: " + ("--no-memory" if not measure else "CPU memory is measured eagerly only")
    log("measuring CPU peak RSS, one subprocess per implementation")
    note = "CPU peak RSS delta (VmHWM - VmRSS before the model) in a fresh eager subprocess each"
    return cpu_memory(setup, malloc), note
