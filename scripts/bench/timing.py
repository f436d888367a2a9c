"""Timing: one Runner per implementation (model, optimizer, train and inference steps), rounds interleaved
across implementations, and the ratios of their img/s taken round by round."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from bench.common import DTYPES, Setup, log
from swin_train.config import TrainConfig
from swin_train.cpu_split import CpuSplit
from swin_train.optim import build_optimizer

try:
    import resource
except ImportError:  # not on Windows
    resource = None

MODES = ("train", "infer")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build_trainer_optimizer(impl: str, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (lr 1e-5, weight decay 0.05) built the way each implementation's own training script builds it.

    ours: swin_train.optim.build_optimizer (fused kernel on CPU and CUDA); timm: timm.optim.create_optimizer_v2
    as timm's train.py calls it; torchvision: torch.optim.AdamW with torch's defaults, as its reference
    train.py. torch's default is foreach on CUDA and the per-tensor loop on CPU."""
    if impl == "ours":
        return build_optimizer(model, TrainConfig(weight_decay=0.05), lr=1e-5, device_type=device.type)
    if impl == "timm":
        return create_optimizer_v2(model, opt="adamw", lr=1e-5, weight_decay=0.05)
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)


class Runner:
    """One implementation: its (optionally compiled) model, AdamW, loss scaler, and its two step kinds."""

    def __init__(
        self,
        impl: str,
        model: nn.Module,
        device: torch.device,
        dtype: str,
        compile: bool = False,
        cpu_split: CpuSplit | None = None,
    ):
        self.model = model.to(device)
        self.cpu_split = cpu_split  # the train step's batch in parts on threads, as swin-train runs it on CPU
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.run_model = torch.compile(model) if compile else model
        self.optimizer = build_trainer_optimizer(impl, model, device)
        autocast_dtype = DTYPES[dtype]
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=autocast_dtype))
            if autocast_dtype != torch.float32
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    def forward(self, x: torch.Tensor, y: torch.Tensor, share: float = 1.0):
        """(loss, what to backpropagate), as swin-train's train step computes them"""
        with self.autocast():
            loss = F.cross_entropy(self.run_model(x), y)
        return loss.detach(), self.scaler.scale(loss * share) if self.scaler is not None else loss * share

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.run_model.train()
        if self.cpu_split is not None:
            self.cpu_split.run(self.forward, x, y, self.trainable)
        else:
            self.forward(x, y)[1].backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer_step(self, x: torch.Tensor) -> None:
        self.run_model.eval()
        with torch.inference_mode(), self.autocast():
            self.run_model(x)

    def step(self, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
        """One step of `mode` (train or infer) on the batch (x, y), as a call without arguments."""
        return (lambda: self.train_step(x, y)) if mode == "train" else (lambda: self.infer_step(x))

    def resident_bytes(self, train: bool) -> int:
        """What this implementation keeps allocated between steps (grads are freed after each step)."""
        total = tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers())
        if train:
            total += sum(tensor_bytes(s.values()) for s in self.optimizer.state.values())
        return total


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def timed_round(
    step: Callable[[], None], iters: int, device: torch.device
) -> tuple[float, float | None, int]:
    """(seconds for `iters` steps, CUDA peak bytes allocated above the level before the round or None,
    minor page faults during the round)."""
    synchronize(device)
    faults = minor_faults()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return seconds, extra, minor_faults() - faults


def compile_and_warm_up(
    runners: dict[str, Runner], x: torch.Tensor, y: torch.Tensor, setup: Setup
) -> dict[str, dict[str, float]]:
    """Untimed warm-up steps per implementation and mode; returns the seconds of each compiled model's
    first call per mode (it compiles, so it is timed on its own)."""
    compile_s: dict[str, dict[str, float]] = {}
    for impl, runner in runners.items():
        for mode in MODES:
            step = runner.step(mode, x, y)
            if impl in setup.compile:
                seconds, _, _ = timed_round(step, 1, setup.device)
                compile_s.setdefault(impl, {})[mode] = seconds
                log(f"{impl} {mode}: first call (compile) {seconds:.1f} s")
            for _ in range(setup.warmup):
                step()
    return compile_s


@dataclass
class Rounds:
    """Per implementation and mode: each timed round's seconds and minor page faults per step, and the
    largest CUDA peak of a round in bytes as if the implementation ran alone (0 on CPU)."""

    seconds: dict[str, dict[str, list[float]]]
    faults_per_step: dict[str, dict[str, list[float]]]
    cuda_peak_bytes: dict[str, dict[str, int]]


def interleaved_rounds(runners: dict[str, Runner], x: torch.Tensor, y: torch.Tensor, setup: Setup) -> Rounds:
    """`setup.repeats` rounds of `setup.iters` steps, each round timing every mode of every implementation
    in turn (A B A B ...), so that slow drifts of the machine reach all of them alike."""
    log(f"timing {setup.repeats} rounds x {setup.iters} iterations, interleaved")
    input_bytes = tensor_bytes([x, y])
    rounds = Rounds(
        seconds={impl: {mode: [] for mode in MODES} for impl in runners},
        faults_per_step={impl: {mode: [] for mode in MODES} for impl in runners},
        cuda_peak_bytes={impl: {mode: 0 for mode in MODES} for impl in runners},
    )
    for r in range(setup.repeats):
        for mode in MODES:
            for impl, runner in runners.items():
                s, extra, round_faults = timed_round(runner.step(mode, x, y), setup.iters, setup.device)
                rounds.seconds[impl][mode].append(s)
                rounds.faults_per_step[impl][mode].append(round_faults / setup.iters)
                if extra is not None:
                    alone = extra + runner.resident_bytes(train=mode == "train") + input_bytes
                    rounds.cuda_peak_bytes[impl][mode] = max(rounds.cuda_peak_bytes[impl][mode], alone)
        log(
            f"  round {r + 1}/{setup.repeats}: "
            + "  ".join(
                f"{impl} {setup.batch_size * setup.iters / rounds.seconds[impl]['train'][-1]:.2f}/"
                f"{setup.batch_size * setup.iters / rounds.seconds[impl]['infer'][-1]:.2f}"
                for impl in runners
            )
            + " img/s (train/infer)"
        )
    return rounds


def median_pairwise_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], float]:
    """Ratios a[i] / b[i] of round i and their median."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return ratios, statistics.median(ratios)


def pairwise_ratios(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per pair "a/b" of the implementations in `results` and per mode: the img/s ratios of round i of a
    over round i of b, and their median."""
    ratios = {}
    for a, b in (("ours", "timm"), ("ours", "torchvision"), ("torchvision", "timm")):
        if a in results and b in results:
            ratios[f"{a}/{b}"] = {}
            for mode in MODES:
                pairwise, median = median_pairwise_ratio(results[a][mode]["img_s"], results[b][mode]["img_s"])
                ratios[f"{a}/{b}"][mode] = {"pairwise": pairwise, "median": median}
    return ratios
