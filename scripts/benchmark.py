"""Benchmark our Swin against timm's (and torchvision's) in one process, side by side.

Model mode (default): every implementation gets the same weights (timm's random init, converted into
ours with `convert_state_dict`, and from ours into torchvision's layout), the logits are compared, then
train steps (forward, backward, AdamW) and inference are timed in rounds interleaved A B A B ...
Ratios ours/timm and ours/torchvision are taken round by round (round i of ours over round i of timm)
and reported as the median of those pairwise ratios, so slow drifts of the machine cancel.

    python scripts/benchmark.py                                    # CPU: Swin-T, fp32, batch 8, 224
    python scripts/benchmark.py --device cuda --dtype bf16 --batch-size 128 --compile --json

Features mode (`--features HxW`): forward+backward of the features model (`create_model(features_only=True)`)
against the official detection backbone (read from a snapshot of its repository) and timm's `features_only`,
same weights, at one image size, ratios round by round (bench/detection.py).

    python scripts/benchmark.py --features 800x1333 --batch-size 1 --repeats 3

Data mode (`--data-loader DIR`): the input pipeline of a training run over the images under DIR, timm's
create_loader against ours (folder, and shards with `--data-shards OUT` or `--photos N`), train and eval,
interleaved, with each of `--workers` worker counts: img/s per worker, CPU ms per image of the process
tree and the CPU cores one GPU needs (bench/data_loader.py).

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
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from swin_train.cpu_split import CpuSplit, choose_parts
from swin_train.errors import ConfigError
from swin_train.models.flex import flex_attention_available
from swin_train.models.registry import variant_arch
from swin_train.models.swin import ATTENTION_BACKENDS

# The parts are in scripts/bench/: `python scripts/benchmark.py` puts scripts/ on sys.path, loading this file
# by path (tests/test_benchmark.py) does not.
if (scripts_dir := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.insert(0, scripts_dir)

from bench.common import DEFAULTS, DTYPES, Setup, log, usable_cores
from bench.data_loader import run_data_loader
from bench.detection import format_features_table, run_features
from bench.kernels import check_linear_kernels, run_linear_kernels
from bench.memory import memory_probe, peak_memory, process_malloc
from bench.mfu import CPU_PEAK_REPEATS, CPU_PEAK_SIZE, mfu, resolve_peak
from bench.models import IMPLS, build_same_weight_models, logits_max_abs_diff
from bench.report import environment, format_data_table, format_kernel_table, format_table, loadavg
from bench.timing import MODES, Rounds, Runner, compile_and_warm_up, interleaved_rounds, pairwise_ratios

# torchvision ships these three architectures (swin_t/s/b); it is benchmarked by default only for them.
TORCHVISION_VARIANTS = {
    "swin_tiny_patch4_window7_224": "swin_t",
    "swin_small_patch4_window7_224": "swin_s",
    "swin_base_patch4_window7_224": "swin_b",
    "swinv2_tiny_patch4_window8_256": "swin_v2_t",
    "swinv2_small_patch4_window8_256": "swin_v2_s",
    "swinv2_base_patch4_window8_256": "swin_v2_b",
}
MiB = 2**20


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
        "--cpu-split",
        type=int,
        default=1,
        metavar="N",
        help="ours' train step with each batch in N parts at once on N threads, as swin-train's\n"
        "train.cpu_split runs it on CPU (swin_train/cpu_split.py); 1: off (the model's own step).\n"
        "Timed only: peak memory is measured without it",
    )
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
        help="also time the same images packed as shards (swin-data pack DIR)",
    )
    data.add_argument(
        "--photos",
        type=int,
        metavar="N",
        help="first make the real-photo set in DIR (N train + N/4 val JPEGs cut from scikit-image's\n"
        "photographs, bench/photos.py) and pack it beside DIR unless --data-shards is given",
    )
    data.add_argument(
        "--gpu-rate",
        type=float,
        nargs=3,
        metavar=("T", "S", "B"),
        help="train img/s of one GPU for Swin-T, -S, -B, for the cores-per-GPU line (default: timm's\n"
        "published RTX 3090 AMP figures, 646.76 / 399.67 / 279.66)",
    )
    data.add_argument(
        "--loader-rows",
        nargs="+",
        metavar="ROW",
        help="time only these rows (timm, ours, ours_device_augment, ours_device_decode, ours_torchvision,\n"
        "ours_full_decode, ours_shards, eval_timm, eval_ours, eval_ours_device_decode, eval_ours_torchvision;\n"
        "default: all that apply)",
    )
    data.add_argument(
        "--full-decode-row",
        action="store_true",
        help="also time our folder loader with data.fast_decode=false (timm's transforms on whole images)",
    )
    p.add_argument(
        "--linear-kernels",
        action="store_true",
        help="time each Linear shape of --model at --batch-size on CPU: F.linear (MKL) against the oneDNN\n"
        "kernel of swin_train/models/ops.py, forward and input gradient, GFLOP/s",
    )
    p.add_argument(
        "--features",
        metavar="HxW",
        help="time forward+backward of the features model (create_model(features_only=True)) at HxW against\n"
        "the official detection backbone (SWIN_DETECTION_REPO snapshot) and timm's features_only, same\n"
        "weights (bench/detection.py); --batch-size default 1, --repeats 3, --warmup 1",
    )
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one CPU memory measurement
    return p


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
    threads = args.threads or usable_cores()
    cpu_split, _ = choose_parts(
        args.cpu_split,
        device_type=args.device,
        distributed=False,
        compiled="ours" in compiled,
        grad_checkpointing=args.grad_checkpointing,
        dropout=False,
        batch_size=args.batch_size,
        threads=threads,
    )
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
        threads=threads,
        cpu_split=cpu_split,
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
# Model benchmark


def run_models(setup: Setup, argv: Sequence[str], args: argparse.Namespace) -> dict:
    """The model mode's report (see the module docstring): same weights, logits compared, peak memory, then
    train and inference steps timed in interleaved rounds."""
    torch.set_num_threads(setup.threads)
    malloc = process_malloc(args)
    if args.tf32 and setup.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    env = environment(setup, argv, malloc)
    torch.manual_seed(args.seed)
    log(
        f"building {', '.join(setup.impls)} ({setup.name or 'custom architecture'}, img {setup.arch['img_size']})"
    )
    models = build_same_weight_models(setup)
    macs = models["ours"].flops()
    size = setup.arch["img_size"]
    x = torch.randn(setup.batch_size, 3, size, size, device=setup.device)
    y = torch.randint(0, setup.num_classes, (setup.batch_size,), device=setup.device)
    diffs = logits_max_abs_diff(models, x[:2])
    log("logits max abs diff vs ours (fp32, eval): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    cpu_mem, memory_note = peak_memory(setup, args.memory, malloc)
    runners = {
        impl: Runner(
            impl,
            m,
            setup.device,
            setup.dtype,
            compile=impl in setup.compile,
            cpu_split=CpuSplit(setup.cpu_split, setup.threads)
            if impl == "ours" and setup.cpu_split > 1
            else None,
        )
        for impl, m in models.items()
    }
    compile_s = compile_and_warm_up(runners, x, y, setup)
    rounds = interleaved_rounds(runners, x, y, setup)
    peak, peak_source = resolve_peak(args, setup, env["device_name"])
    results = model_results(setup, runners, compile_s, rounds, cpu_mem, macs, peak)
    env["loadavg_end"] = loadavg()
    return {
        "mode": "models",
        "config": {**setup.config(), "peak_tflops": peak, "peak_source": peak_source},
        "env": env,
        "macs_per_image": macs,
        "logits_max_abs_diff": diffs,
        "memory_note": memory_note,
        "results": results,
        "ratios": pairwise_ratios(results),
    }


def model_results(
    setup: Setup,
    runners: dict[str, Runner],
    compile_s: dict[str, dict[str, float]],
    rounds: Rounds,
    cpu_mem: dict[str, dict] | None,
    macs: int,
    peak: float | None,
) -> dict:
    """The report's "results": per implementation its parameters and compile seconds, and per mode each
    round's img/s, their median, the peak memory, MFU and minor page faults per step."""
    results = {}
    for impl, runner in runners.items():
        params = sum(p.numel() for p in runner.model.parameters())
        results[impl] = {"params": params, "compile_s": compile_s.get(impl)}
        for mode in MODES:
            img_s = [setup.batch_size * setup.iters / s for s in rounds.seconds[impl][mode]]
            median = statistics.median(img_s)
            if cpu_mem is not None:
                mem = cpu_mem[impl][mode]
            elif setup.device.type == "cuda":
                mem = rounds.cuda_peak_bytes[impl][mode] / MiB
            else:
                mem = None
            results[impl][mode] = {
                "round_s": rounds.seconds[impl][mode],
                "img_s": img_s,
                "median_img_s": median,
                "peak_mem_mib": mem,
                "mfu": mfu(macs, median, peak, train=mode == "train"),
                "minor_faults_per_step": statistics.median(rounds.faults_per_step[impl][mode]),
            }
    return results


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
        # before resolve, so that --device cuda is told these are CPU kernels, not that CUDA is missing
        check_linear_kernels(args.device)
        report, table = run_linear_kernels(resolve(args), args, argv), format_kernel_table
    elif args.features:
        report, table = run_features(args, argv), format_features_table
    elif args.data_loader:
        report, table = run_data_loader(args, argv), format_data_table
    else:
        report, table = run_models(resolve(args), argv, args), format_table
    print(json.dumps(report, indent=1) if args.json else table(report))
    return report


if __name__ == "__main__":
    from swin_train.cli.common import run_cli

    sys.exit(run_cli("benchmark.py", lambda a: main(a) and 0, None))
