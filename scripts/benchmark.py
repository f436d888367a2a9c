"""Benchmark our Swin against timm's (and torchvision's) in one process, side by side.

Model mode (default): every implementation gets the same weights (timm's random init, converted into
ours with `convert_state_dict`, and from ours into torchvision's layout), the logits are compared, then
train steps (forward, backward, AdamW) and inference are timed in rounds interleaved A B A B ...
Ratios ours/timm and ours/torchvision are taken round by round (round i of ours over round i of timm)
and reported as the median of those pairwise ratios, so slow drifts of the machine cancel.

    python scripts/benchmark.py                                    # CPU: Swin-T, fp32, batch 8, 224
    python scripts/benchmark.py --device cuda --dtype bf16 --batch-size 128 --compile --json

Data mode (`--data-loader DIR`): decode + the official train transform over the images under DIR, in a
DataLoader with each of `--workers` worker counts; prints img/s per worker, i.e. how many CPU cores a
GPU needs to be fed at a given training speed. `--data-shards OUT` (OUT from `swin-data pack DIR OUT`)
times the same images read from shards and prints the file opens per epoch of each.

Peak memory: on CUDA, max_memory_allocated over a round minus what was allocated before it, plus what
the implementation keeps resident (weights, buffers, AdamW state for training, the input batch), i.e.
its peak as if it ran alone. On CPU, peak RSS is process-wide and never goes down, so each
implementation is measured eagerly in a fresh subprocess: VmHWM minus the VmRSS before the model was
built (it includes allocator slack and oneDNN scratch); with --compile it is reported as n/a.

MFU: 2 x the model's multiply-adds per image (x3 for a train step) x img/s over the peak FLOP/s: the GPU's
datasheet figure, or on CPU the measured speed of a large square matmul. Its inverse for timm is printed as
the ceiling: how much faster than timm any implementation could be if every FLOP ran at that peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re

try:
    import resource
except ImportError:  # not on Windows
    resource = None
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.optim import create_optimizer_v2
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

import swin_train
from swin_train.allocator import keep_freed_memory
from swin_train.config import TrainConfig
from swin_train.errors import ConfigError, DataError
from swin_train.models import convert_state_dict, create_model, ops
from swin_train.models.convert import to_layout
from swin_train.models.flex import flex_attention_available
from swin_train.models.registry import variant_arch
from swin_train.models.swin import ATTENTION_BACKENDS
from swin_train.optim import build_optimizer

IMPLS = ("ours", "timm", "torchvision")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torchvision ships these three architectures (swin_t/s/b); it is benchmarked by default only for them.
TORCHVISION_VARIANTS = {
    "swin_tiny_patch4_window7_224": "swin_t",
    "swin_small_patch4_window7_224": "swin_s",
    "swin_base_patch4_window7_224": "swin_b",
}
# Dense peak TFLOP/s (bf16/fp16 tensor core, tf32 tensor core, fp32 non-tensor) from NVIDIA datasheets,
# matched against torch.cuda.get_device_name(). Unlisted devices (H100 NVL, H200 NVL, ...) give no MFU
# unless --peak-tflops is passed.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    (r"H200(?!.*NVL)", (989.4, 494.7, 67.0)),
    (r"H100.*PCIe", (756.0, 378.0, 51.0)),
    (r"H100.*(HBM3|SXM)", (989.4, 494.7, 67.0)),
    (r"A100", (312.0, 156.0, 19.5)),
)
# CPU defaults keep the default invocation to a few minutes on 2 cores; CUDA ones fill a GPU.
DEFAULTS = {
    "cpu": dict(dtype="fp32", batch_size=8, warmup=2, repeats=5, iters=2),
    "cuda": dict(dtype="bf16", batch_size=128, warmup=10, repeats=5, iters=20),
}
MiB = 2**20
# A CPU's attainable matmul peak is measured: no datasheet figure fits a shared VM's clocks and cores. Square
# products of this size reach the plateau of MKL's sgemm on the 2-core CI machine (2048: ~10% lower).
CPU_PEAK_SIZE = 4096
CPU_PEAK_REPEATS = 3


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the table or the JSON."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--model", default="swin_tiny_patch4_window7_224", help="registry variant name")
    arch = p.add_argument_group("architecture overrides (micro models for tests)")
    arch.add_argument("--embed-dim", type=int)
    arch.add_argument("--depths", type=int, nargs="+")
    arch.add_argument("--num-heads", type=int, nargs="+")
    arch.add_argument("--window-size", type=int)
    arch.add_argument("--patch-size", type=int)
    arch.add_argument("--num-classes", type=int, default=1000)
    arch.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate, same for all")
    p.add_argument("--img-size", type=int, help="default: the variant's")
    p.add_argument("--batch-size", type=int, help="default: 8 on CPU, 128 on CUDA (data-loader mode: 32)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="autocast dtype; default fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--compile",
        nargs="*",
        choices=IMPLS,
        metavar="IMPL",
        help="torch.compile each model (compile time reported); with names, only those\n"
        "(e.g. --compile ours: ours compiled against timm eager, in one run)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="our window attention: auto (SDPA on CUDA, written out on CPU) or flex (FlexAttention, CUDA)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="activation checkpointing per block in ours and timm (torchvision has none)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls for fp32 on CUDA")
    p.add_argument(
        "--impls", nargs="+", choices=IMPLS, help="default: ours timm (+torchvision for T/S/B 224)"
    )
    p.add_argument("--warmup", type=int, help="untimed iterations per implementation and mode")
    p.add_argument("--repeats", type=int, help="timed rounds (interleaved across implementations)")
    p.add_argument("--iters", type=int, help="iterations per timed round")
    p.add_argument("--threads", type=int, help="torch intra-op threads; default: the usable CPU cores")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's malloc defaults; by default the process keeps freed memory as swin-train does\n"
        "(swin_train/allocator.py), which speeds up every implementation alike on CPU",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="device peak for MFU; default: looked up by GPU name on CUDA, measured on CPU\n"
        f"(the fastest of {CPU_PEAK_REPEATS} {CPU_PEAK_SIZE}x{CPU_PEAK_SIZE} matrix products in --dtype)",
    )
    p.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON (raw rounds, medians, ratios, env)")
    data = p.add_argument_group("data-loader mode")
    data.add_argument("--data-loader", metavar="DIR", help="time decode + train transform over DIR instead")
    data.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    data.add_argument("--data-images", type=int, default=256, help="images timed per measurement")
    data.add_argument(
        "--data-shards",
        metavar="DIR",
        help="also time the same images packed as shards (swin-data pack DIR): img/s and file opens",
    )
    p.add_argument(
        "--linear-kernels",
        action="store_true",
        help="time each Linear shape of --model at --batch-size on CPU: F.linear (MKL) against the oneDNN\n"
        "kernel of swin_train/models/ops.py, forward and input gradient, GFLOP/s",
    )
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one CPU memory measurement
    return p


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


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve(args: argparse.Namespace) -> Setup:
    """Fill per-device defaults, resolve the architecture and validate; ConfigError on bad input."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available; run with --device cpu")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "repeats", "iters"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    try:
        arch = variant_arch(args.model)
    except KeyError as e:
        raise ConfigError(f"{e.args[0]}; pass a registry name to --model") from None
    overrides = {
        "embed_dim": args.embed_dim,
        "depths": tuple(args.depths) if args.depths else None,
        "num_heads": tuple(args.num_heads) if args.num_heads else None,
        "window_size": args.window_size,
        "patch_size": args.patch_size,
        "img_size": args.img_size,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    arch.update(overrides)
    check_arch(arch)
    custom = bool(set(overrides) - {"img_size"}) or arch["img_size"] != variant_arch(args.model)["img_size"]
    name = None if custom else args.model
    impls = (
        tuple(args.impls)
        if args.impls
        else ("ours", "timm") + (("torchvision",) if name in TORCHVISION_VARIANTS else ())
    )
    if "ours" not in impls or len(impls) < 2:
        raise ConfigError("--impls must include 'ours' and at least one of timm, torchvision")
    if args.grad_checkpointing and "torchvision" in impls:
        raise ConfigError("torchvision's Swin has no gradient checkpointing; pass --impls ours timm")
    if args.attention == "flex" and not flex_attention_available(args.device):
        raise ConfigError("--attention flex needs a CUDA GPU of compute capability 8.0+ with Triton")
    compiled = () if args.compile is None else tuple(args.compile or impls)
    if set(compiled) - set(impls):
        raise ConfigError(f"--compile {' '.join(compiled)}: only implementations in --impls can be compiled")
    return Setup(
        name=name,
        arch=arch,
        num_classes=args.num_classes,
        drop_path=args.drop_path,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=torch.device(args.device),
        compile=tuple(i for i in IMPLS if i in compiled),
        grad_checkpointing=args.grad_checkpointing,
        attention=args.attention,
        impls=tuple(i for i in IMPLS if i in impls),
        warmup=args.warmup,
        repeats=args.repeats,
        iters=args.iters,
        threads=args.threads or usable_cores(),
    )


def check_arch(arch: dict) -> None:
    """Every stage's feature map must split into whole windows (and whole 2x2 patches to merge)."""
    if len(arch["depths"]) != len(arch["num_heads"]):
        raise ConfigError(f"--depths {arch['depths']} and --num-heads {arch['num_heads']} differ in length")
    if arch["img_size"] % arch["patch_size"]:
        raise ConfigError(
            f"--img-size {arch['img_size']} is not a multiple of the patch size {arch['patch_size']}"
        )
    grid = arch["img_size"] // arch["patch_size"]
    for i in range(len(arch["depths"])):
        side = grid // 2**i
        if side * 2**i != grid or side % min(arch["window_size"], side):
            raise ConfigError(
                f"stage {i} feature map {side}x{side} does not split into {arch['window_size']}-windows; "
                "pick --img-size / --window-size that divide"
            )


# ----------------------------------------------------------------------------------------------
# Models with the same weights


def build_model(
    impl: str,
    arch: dict,
    num_classes: int,
    drop_path: float,
    grad_checkpointing: bool = False,
    attention: str = "auto",
) -> nn.Module:
    """One implementation of the architecture, randomly initialised, in train mode."""
    if impl in ("ours", "timm"):
        build = partial(create_model, attention=attention) if impl == "ours" else TimmSwin
        model = build(**arch, num_classes=num_classes, drop_path_rate=drop_path)
        model.set_grad_checkpointing(grad_checkpointing)
        return model
    p, w = arch["patch_size"], arch["window_size"]
    return TorchvisionSwin(
        patch_size=[p, p],
        embed_dim=arch["embed_dim"],
        depths=list(arch["depths"]),
        num_heads=list(arch["num_heads"]),
        window_size=[w, w],
        stochastic_depth_prob=drop_path,
        num_classes=num_classes,
    )


def build_same_weight_models(setup: Setup) -> dict[str, nn.Module]:
    """timm's random weights -> ours (convert_state_dict) -> torchvision (to_layout)."""
    models = {
        impl: build_model(
            impl, setup.arch, setup.num_classes, setup.drop_path, setup.grad_checkpointing, setup.attention
        )
        for impl in setup.impls
    }
    ours_sd = convert_state_dict(models["timm"].state_dict()) if "timm" in models else None
    if ours_sd is not None:
        models["ours"].load_state_dict(ours_sd, strict=True)
    ours_sd = models["ours"].state_dict()
    if "torchvision" in models:
        tv = models["torchvision"]
        tv.load_state_dict(to_layout(ours_sd, "torchvision"), strict=True)
        back = convert_state_dict(tv.state_dict())
        assert all(torch.equal(back[k], ours_sd[k]) for k in ours_sd), "torchvision weights differ from ours"
    return models


@torch.no_grad()
def logits_max_abs_diff(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """max |logits_ours - logits_other| in fp32 eval mode, per other implementation."""
    out = {}
    for impl, model in models.items():
        model.eval()
        out[impl] = model(x).float()
        model.train()
    return {impl: (out["ours"] - logits).abs().max().item() for impl, logits in out.items() if impl != "ours"}


# ----------------------------------------------------------------------------------------------
# Timing


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

    def __init__(self, impl: str, model: nn.Module, device: torch.device, dtype: str, compile: bool = False):
        self.model = model.to(device)
        self.run_model = torch.compile(model) if compile else model
        self.optimizer = build_trainer_optimizer(impl, model, device)
        autocast_dtype = DTYPES[dtype]
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=autocast_dtype))
            if autocast_dtype != torch.float32
            else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.run_model.train()
        with self.autocast():
            loss = F.cross_entropy(self.run_model(x), y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer_step(self, x: torch.Tensor) -> None:
        self.run_model.eval()
        with torch.inference_mode(), self.autocast():
            self.run_model(x)

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


def median_pairwise_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], float]:
    """Ratios a[i] / b[i] of round i and their median."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return ratios, statistics.median(ratios)


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


# ----------------------------------------------------------------------------------------------
# CPU memory: one fresh process per implementation


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process: eager inference then train steps of one implementation on CPU.

    Returns peak RSS (VmHWM) minus the RSS before the model was built, in MiB, after inference and
    after training (VmHWM only grows, and training needs more than inference, so the order keeps both
    readings meaningful)."""
    torch.set_num_threads(spec["threads"])
    if spec.get("malloc") != "system":
        keep_freed_memory()
    before = _proc_status_kib("VmRSS")
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
        out[mode] = (_proc_status_kib("VmHWM") - before) / 1024
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)]
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


# ----------------------------------------------------------------------------------------------
# Model benchmark


def process_malloc(args: argparse.Namespace) -> str:
    """Keep freed memory in this process as swin-train does, unless --system-malloc; says which it is."""
    return "system" if args.system_malloc or not keep_freed_memory() else "keep freed memory"


def environment(setup: Setup, argv: Sequence[str]) -> dict:
    if setup.device.type == "cuda":
        device_name = torch.cuda.get_device_name(setup.device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        device_name = m.group(1).strip() if m else platform.processor() or "cpu"
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_name": device_name,
        "cuda": torch.version.cuda if setup.device.type == "cuda" else None,
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "command": shlex.join(["scripts/benchmark.py", *argv]),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_models(setup: Setup, argv: Sequence[str], args: argparse.Namespace) -> dict:
    torch.set_num_threads(setup.threads)
    malloc = process_malloc(args)
    if args.tf32 and setup.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    env = environment(setup, argv)
    env["malloc"] = malloc
    torch.manual_seed(args.seed)
    log(
        f"building {', '.join(setup.impls)} ({setup.name or 'custom architecture'}, img {setup.arch['img_size']})"
    )
    models = build_same_weight_models(setup)
    params = {impl: sum(p.numel() for p in m.parameters()) for impl, m in models.items()}
    macs = models["ours"].flops()

    size = setup.arch["img_size"]
    x = torch.randn(setup.batch_size, 3, size, size, device=setup.device)
    y = torch.randint(0, setup.num_classes, (setup.batch_size,), device=setup.device)
    for model in models.values():
        model.to(setup.device)
    diffs = logits_max_abs_diff(models, x[:2])
    log("logits max abs diff vs ours (fp32, eval): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))

    memory_note = (
        "CUDA max_memory_allocated per round, as if alone (weights, optimizer state, input included)"
    )
    cpu_mem = None
    if setup.device.type == "cpu":
        if not args.memory or setup.compile:
            memory_note = "n/a: " + (
                "--no-memory" if not args.memory else "CPU memory is measured eagerly only"
            )
        else:
            log("measuring CPU peak RSS, one subprocess per implementation")
            cpu_mem = cpu_memory(setup, malloc)
            memory_note = (
                "CPU peak RSS delta (VmHWM - VmRSS before the model) in a fresh eager subprocess each"
            )

    runners = {
        impl: Runner(impl, m, setup.device, setup.dtype, compile=impl in setup.compile)
        for impl, m in models.items()
    }
    input_bytes = tensor_bytes([x, y])
    modes = {
        "train": lambda r: lambda: r.train_step(x, y),
        "infer": lambda r: lambda: r.infer_step(x),
    }
    compile_s: dict[str, dict[str, float]] = {}
    for impl, runner in runners.items():
        for mode, make_step in modes.items():
            step = make_step(runner)
            if impl in setup.compile:  # the first call compiles; time it on its own
                seconds, _, _ = timed_round(step, 1, setup.device)
                compile_s.setdefault(impl, {})[mode] = seconds
                log(f"{impl} {mode}: first call (compile) {seconds:.1f} s")
            for _ in range(setup.warmup):
                step()
    log(f"timing {setup.repeats} rounds x {setup.iters} iterations, interleaved")
    seconds = {impl: {mode: [] for mode in modes} for impl in runners}
    cuda_peak = {impl: {mode: 0 for mode in modes} for impl in runners}
    faults = {impl: {mode: [] for mode in modes} for impl in runners}
    for r in range(setup.repeats):
        for mode, make_step in modes.items():
            for impl, runner in runners.items():
                s, extra, round_faults = timed_round(make_step(runner), setup.iters, setup.device)
                seconds[impl][mode].append(s)
                faults[impl][mode].append(round_faults / setup.iters)
                if extra is not None:
                    alone = extra + runner.resident_bytes(train=mode == "train") + input_bytes
                    cuda_peak[impl][mode] = max(cuda_peak[impl][mode], alone)
        log(
            f"  round {r + 1}/{setup.repeats}: "
            + "  ".join(
                f"{impl} {setup.batch_size * setup.iters / seconds[impl]['train'][-1]:.2f}/"
                f"{setup.batch_size * setup.iters / seconds[impl]['infer'][-1]:.2f}"
                for impl in runners
            )
            + " img/s (train/infer)"
        )

    peak, peak_source = resolve_peak(args, setup, env["device_name"])
    results = {}
    for impl in runners:
        results[impl] = {"params": params[impl], "compile_s": compile_s.get(impl)}
        for mode in modes:
            img_s = [setup.batch_size * setup.iters / s for s in seconds[impl][mode]]
            median = statistics.median(img_s)
            if cpu_mem is not None:
                mem = cpu_mem[impl][mode]
            elif setup.device.type == "cuda":
                mem = cuda_peak[impl][mode] / MiB
            else:
                mem = None
            results[impl][mode] = {
                "round_s": seconds[impl][mode],
                "img_s": img_s,
                "median_img_s": median,
                "peak_mem_mib": mem,
                "mfu": mfu(macs, median, peak, train=mode == "train"),
                "minor_faults_per_step": statistics.median(faults[impl][mode]),
            }
    ratios = {}
    for a, b in (("ours", "timm"), ("ours", "torchvision"), ("torchvision", "timm")):
        if a in results and b in results:
            ratios[f"{a}/{b}"] = {}
            for mode in modes:
                pairwise, median = median_pairwise_ratio(results[a][mode]["img_s"], results[b][mode]["img_s"])
                ratios[f"{a}/{b}"][mode] = {"pairwise": pairwise, "median": median}
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "mode": "models",
        "config": {
            "model": setup.name,
            "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in setup.arch.items()},
            "num_classes": setup.num_classes,
            "drop_path": setup.drop_path,
            "batch_size": setup.batch_size,
            "dtype": setup.dtype,
            "device": setup.device.type,
            "compile": list(setup.compile),
            "grad_checkpointing": setup.grad_checkpointing,
            "attention": setup.attention,
            "impls": list(setup.impls),
            "warmup": setup.warmup,
            "repeats": setup.repeats,
            "iters": setup.iters,
            "peak_tflops": peak,
            "peak_source": peak_source,
        },
        "env": env,
        "macs_per_image": macs,
        "logits_max_abs_diff": diffs,
        "memory_note": memory_note,
        "results": results,
        "ratios": ratios,
    }


def format_table(report: dict) -> str:
    """The human-readable summary of a model benchmark report."""
    cfg, env, results, ratios = report["config"], report["env"], report["results"], report["ratios"]

    def num(v: float | None, fmt: str, unit: str = "") -> str:
        return "n/a" if v is None else format(v, fmt) + unit

    def pct(v: float | None) -> str:
        return num(None if v is None else 100 * v, ".1f", "%")

    def vs_timm(impl: str, mode: str) -> str:
        if impl == "timm":
            return "1.000x"
        r = ratios.get(f"{impl}/timm")
        return num(r and r[mode]["median"], ".3f", "x")

    arch = cfg["model"] or "custom " + json.dumps(cfg["arch"])
    lines = [
        f"{arch} | {cfg['device']} {env['device_name']} | {cfg['dtype']} | batch {cfg['batch_size']} | "
        f"img {cfg['arch']['img_size']} | compiled: {' '.join(cfg['compile']) or 'none'} | "
        f"grad checkpointing {cfg['grad_checkpointing']} | threads {env['threads']} | "
        f"{cfg['repeats']} rounds x {cfg['iters']} iters, medians | malloc: {env.get('malloc')}",
        "optimizers: each as its own training script builds it (ours fused AdamW; timm create_optimizer_v2; "
        "torchvision torch.optim.AdamW defaults)",
        "logits max abs diff vs ours: "
        + ", ".join(f"{k} {v:.2e}" for k, v in report["logits_max_abs_diff"].items()),
        "",
        f"{'impl':<12} {'train img/s':>11} {'infer img/s':>11} {'train mem':>10} {'infer mem':>10} "
        f"{'MFU train':>9} {'MFU infer':>9} {'train vs timm':>13} {'infer vs timm':>13}",
    ]
    for impl, res in results.items():
        train, infer = res["train"], res["infer"]
        lines.append(
            f"{impl:<12} {train['median_img_s']:>11.2f} {infer['median_img_s']:>11.2f} "
            f"{num(train['peak_mem_mib'], '.0f', ' MiB'):>10} {num(infer['peak_mem_mib'], '.0f', ' MiB'):>10} "
            f"{pct(train['mfu']):>9} {pct(infer['mfu']):>9} "
            f"{vs_timm(impl, 'train'):>13} {vs_timm(impl, 'infer'):>13}"
        )
    if "ours/torchvision" in ratios:
        r = ratios["ours/torchvision"]
        lines.append(
            f"ours vs torchvision: train {r['train']['median']:.3f}x, infer {r['infer']['median']:.3f}x"
        )
    for impl, res in results.items():
        if res["compile_s"]:
            lines.append(
                f"compile {impl}: train {res['compile_s']['train']:.1f} s, infer {res['compile_s']['infer']:.1f} s"
            )
    lines.append("ratios: median over rounds of (round i of impl) / (round i of timm); higher is faster")
    if cfg["peak_tflops"] is not None:
        lines.append(
            f"MFU: 2 x multiply-adds per image (x3 for a train step) x img/s / {cfg['peak_tflops'] * 1e3:.1f} "
            f"GFLOP/s ({cfg['peak_source']})"
        )
        if "timm" in results:  # the fastest any implementation could be: every FLOP at the peak
            lines.append(
                f"ceiling vs timm (a step at 100% MFU): train {1 / results['timm']['train']['mfu']:.2f}x, "
                f"infer {1 / results['timm']['infer']['mfu']:.2f}x"
            )
    lines.append(
        "minor page faults per step (train/infer): "
        + ", ".join(
            f"{impl} {res['train']['minor_faults_per_step']:.0f}/{res['infer']['minor_faults_per_step']:.0f}"
            for impl, res in results.items()
        )
    )
    lines.append(f"memory: {report['memory_note']}")
    lines.append(f"load average at start / end: {env['loadavg_start']} / {env['loadavg_end']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Data-loader benchmark


class ImageFiles(torch.utils.data.Dataset):
    """The images under a folder (an ImageFolder tree or a flat folder), decoded to RGB and transformed."""

    def __init__(self, paths: list[Path], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            return self.transform(img.convert("RGB"))


def find_images(root: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"--data-loader {root} is not a directory; pass an ImageFolder or a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
    paths = [p for p in paths if not p.name.startswith(".")]
    if not paths:
        raise DataError(f"no JPEG/PNG images under {root}; pass an ImageFolder or a folder of images")
    return paths


def time_loader(dataset: ImageFiles, workers: int, batch_size: int, images: int) -> float:
    """img/s of a DataLoader with `workers` workers, excluding start-up: the clock starts once every
    worker has delivered its first batch."""
    warm = max(workers, 1)
    batches = warm + math.ceil(images / batch_size)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batches * batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    counted, start = 0, None
    for i, batch in enumerate(loader):
        if i == warm - 1:
            start = time.perf_counter()
        elif i >= warm:
            counted += batch.shape[0]
    return counted / (time.perf_counter() - start)


def time_shard_loader(
    root: Path, transform: Callable, workers: int, batch_size: int, images: int
) -> tuple[float, int]:
    """(img/s, shard files opened) of swin-train's shard reader over the train split of `root`, excluding
    start-up as in time_loader; it reads whole epochs until `images` images were timed."""
    from swin_train.data import shards

    split = shards.resolve_split(str(root), "train")
    dataset = shards.ShardTrainDataset(split, transform, batch_size=batch_size, num_workers=workers)
    loader = shards.build_shard_loader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=False, drop_last=True
    )
    warm, counted, seconds, epoch = max(workers, 1), 0, 0.0, 0
    while counted < images:  # workers start anew each epoch: each epoch's clock starts after its warm-up
        dataset.set_epoch(epoch)
        start = None
        for i, (batch, _) in enumerate(loader):
            if i == warm - 1:
                start = time.perf_counter()
            elif i >= warm:
                counted += batch.shape[0]
        seconds += time.perf_counter() - start
        epoch += 1
    # each shard is opened once per epoch (tests/test_shards.py counts the opens)
    return counted / seconds, len(split.shards)


def run_data_loader(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    from swin_train.config import AugConfig, DataConfig
    from swin_train.data.transforms import build_train_transform

    if any(w < 0 for w in args.workers) or args.data_images < 1:
        raise ConfigError("--workers must be >= 0 and --data-images >= 1")
    repeats = args.repeats or DEFAULTS["cpu"]["repeats"]
    batch_size = args.batch_size or 32
    img_size = args.img_size or variant_arch(args.model)["img_size"]
    paths = find_images(Path(args.data_loader))
    transform = build_train_transform(
        DataConfig(img_size=img_size), AugConfig()
    )  # the official recipe: rand-m9-mstd0.5-inc1, jitter 0.4, ...
    dataset = ImageFiles(paths, transform)
    log(f"{len(paths)} images, workers {args.workers}, {repeats} rounds of {args.data_images} images")
    rounds: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(repeats):
        for workers in args.workers:
            rounds[workers].append(time_loader(dataset, workers, batch_size, args.data_images))
    shard_rounds: dict[int, list[float]] = {w: [] for w in args.workers}
    shard_opens = 0
    if args.data_shards:
        for _ in range(repeats):
            for workers in args.workers:
                img_s, shard_opens = time_shard_loader(
                    Path(args.data_shards), transform, workers, batch_size, args.data_images
                )
                shard_rounds[workers].append(img_s)
    results = {}
    for workers, img_s in rounds.items():
        median = statistics.median(img_s)
        results[str(workers)] = {
            "img_s": img_s,
            "median_img_s": median,
            "per_worker_img_s": median / max(workers, 1),
            "file_opens_per_epoch": len(paths),  # one open per image
        }
        if args.data_shards:
            shard_median = statistics.median(shard_rounds[workers])
            results[str(workers)]["shards"] = {
                "img_s": shard_rounds[workers],
                "median_img_s": shard_median,
                "per_worker_img_s": shard_median / max(workers, 1),
                "file_opens_per_epoch": shard_opens,
            }
    return {
        "mode": "data-loader",
        "config": {
            "dir": str(args.data_loader),
            "num_images": len(paths),
            "img_size": img_size,
            "batch_size": batch_size,
            "workers": args.workers,
            "repeats": repeats,
            "images_per_round": args.data_images,
            "transform": repr(transform),
        },
        "env": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torchvision": torchvision.__version__,
            "cores": usable_cores(),
            "command": shlex.join(["scripts/benchmark.py", *argv]),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "results": results,
    }


def format_data_table(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"decode + official train transform, img {cfg['img_size']}, {cfg['num_images']} images, "
        f"{report['env']['cores']} cores, {cfg['repeats']} rounds, medians",
        f"{'workers':>7} {'img/s':>9} {'img/s per worker':>17}",
    ]
    for workers, res in report["results"].items():
        lines.append(
            f"{workers:>7} {res['median_img_s']:>9.1f} {res['per_worker_img_s']:>17.1f}   folder: "
            f"{res['file_opens_per_epoch']} file opens per epoch"
        )
        if "shards" in res:
            sh = res["shards"]
            lines.append(
                f"{workers:>7} {sh['median_img_s']:>9.1f} {sh['per_worker_img_s']:>17.1f}   shards: "
                f"{sh['file_opens_per_epoch']} file opens per epoch"
            )
    best = max(res["per_worker_img_s"] for res in report["results"].values())
    lines.append(
        f"a GPU training at N img/s needs about N / {best:.0f} loader cores (plus one for the main process)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Linear kernels (the evidence for models/ops.py)


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


def run_linear_kernels(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Best-of-rounds GFLOP/s of F.linear and oneDNN per shape, the two interleaved in every round."""
    if args.device != "cpu" or not ops._ONEDNN:
        raise ConfigError(
            "--linear-kernels compares CPU kernels and needs torch with oneDNN; use --device cpu"
        )
    setup = resolve(args)
    torch.set_num_threads(setup.threads)
    malloc = process_malloc(args)
    results = []
    for rows, k, n in linear_shapes(setup.arch, setup.batch_size):
        gflops = time_linear_kernels(rows, k, n, setup.repeats, setup.iters)
        results.append({"rows": rows, "in": k, "out": n, **gflops})
        log(f"  {rows} x {k} -> {n}: " + ", ".join(f"{m} {v:.0f}" for m, v in gflops.items()))
    env = environment(setup, argv)
    env["malloc"] = malloc
    return {
        "config": {
            "model": setup.name,
            "batch_size": setup.batch_size,
            "repeats": setup.repeats,
            "iters": setup.iters,
            "onednn_min_rows": ops.ONEDNN_MIN_ROWS,
        },
        "env": env,
        "results": results,
    }


def format_kernel_table(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    lines = [
        f"Linear kernels of {cfg['model']} at batch {cfg['batch_size']}, GFLOP/s, best of {cfg['repeats']} "
        f"rounds x {cfg['iters']} | {env['device_name']} | threads {env['threads']} | malloc: {env['malloc']}",
        f"{'rows':>6} {'in':>5} {'out':>5} {'fwd MKL':>8} {'fwd oneDNN':>10} {'dX MKL':>7} {'dX oneDNN':>9}  "
        "swin-train uses",
    ]
    for r in report["results"]:
        used = "oneDNN" if r["rows"] >= cfg["onednn_min_rows"] else "MKL"
        lines.append(
            f"{r['rows']:>6} {r['in']:>5} {r['out']:>5} {r['forward_mkl_gflops']:>8.0f} "
            f"{r['forward_onednn_gflops']:>10.0f} {r['grad_input_mkl_gflops']:>7.0f} "
            f"{r['grad_input_onednn_gflops']:>9.0f}  {used}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark described by `argv` (see --help); print a table or JSON and return the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.memory_probe:
        report = memory_probe(json.loads(args.memory_probe))
        print(json.dumps(report))
        return report
    if args.linear_kernels:
        report = run_linear_kernels(args, argv)
        print(json.dumps(report, indent=1) if args.json else format_kernel_table(report))
        return report
    if args.data_loader:
        report = run_data_loader(args, argv)
        print(json.dumps(report, indent=1) if args.json else format_data_table(report))
        return report
    setup = resolve(args)
    report = run_models(setup, argv, args)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return report


if __name__ == "__main__":
    from swin_train.cli.common import run_cli

    sys.exit(run_cli("benchmark.py", lambda a: main(a) and 0, None))
