"""Reports: what they record about where they ran (versions, device, threads, load, the command), and the
tables each mode prints instead of its JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torchvision

from bench.common import Setup, usable_cores


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["scripts/benchmark.py", *argv])


def versions() -> dict[str, str]:
    try:
        torchcodec = importlib.metadata.version("torchcodec")
    except importlib.metadata.PackageNotFoundError:
        torchcodec = "not installed"
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "torchcodec": torchcodec,
    }


def environment(setup: Setup, argv: Sequence[str], malloc: str) -> dict:
    """The "env" of a model or kernel report, taken after this process's threads and malloc are set."""
    if setup.device.type == "cuda":
        device_name = torch.cuda.get_device_name(setup.device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        device_name = m.group(1).strip() if m else platform.processor() or "cpu"
    return {
        **versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_name": device_name,
        "cuda": torch.version.cuda if setup.device.type == "cuda" else None,
        "cores": usable_cores(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "command": command_line(argv),
        "loadavg_start": loadavg(),
        "malloc": malloc,
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


def format_data_table(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    on_cpu = cfg.get("device", "cpu") == "cpu"
    where = (
        "device work ran on this CPU (one thread) and would run on the GPU there; 'feed GPU' leaves it out"
        if on_cpu
        else f"device work ran on {cfg['device']}; 'feed GPU' is the whole process tree"
    )
    lines = [
        f"input pipelines, img {cfg['img_size']}, batch {cfg['batch_size']}, {cfg['num_images']} train images, "
        f"{env['cores']} cores, load {env['loadavg']}, {cfg['repeats']} interleaved rounds, medians",
        f"CPU ms per image: 'tree' the process tree, 'main' of it the main process, 'device' of that the device "
        f"work; {where}",
        f"{'row':<24} {'workers':>7} {'img/s':>7} {'img/s/wkr':>9} {'tree':>6} {'main':>6} {'device':>6} "
        f"{'feed GPU':>8} {'tree/timm':>9} {'feed/timm':>9}",
    ]
    for workers, res in report["results"].items():
        for name, r in res.items():
            if isinstance(r, dict):
                tree = f"{r['cpu_vs_timm']:.3f}x" if "cpu_vs_timm" in r else "1"
                feed = f"{r['feed_vs_timm']:.3f}x" if "feed_vs_timm" in r else "1"
                lines.append(
                    f"{name:<24} {workers:>7} {r['median_img_s']:>7.1f} {r['per_worker_img_s']:>9.1f} "
                    f"{r['cpu_ms_per_image']:>6.2f} {r['main_process_ms_per_image']:>6.2f} "
                    f"{r['device_work_ms_per_image']:>6.2f} {r['feed_ms_per_image']:>8.2f} {tree:>9} {feed:>9}"
                )
    for workers, res in report["results"].items():
        pairs = [(name, r) for name, r in res.items() if isinstance(r, dict) and "cpu_vs_torchvision" in r]
        if pairs:
            lines.append(
                f"JPEGs by {env.get('jpeg_decoder')} against torchvision's decoders (the _torchvision rows), "
                f"{workers} workers, tree / feed: "
                + "; ".join(
                    f"{n} {r['cpu_vs_torchvision']:.3f}x / {r['feed_vs_torchvision']:.3f}x" for n, r in pairs
                )
            )
    cores = report["cores_per_gpu"]
    rates = " / ".join(f"{v:g}" for v in cfg["gpu_rates"].values())
    lines.append(
        f"cores per GPU needed (Swin-T / S / B at {rates} img/s; 'feed GPU' CPU ms/img at {cores['workers']} "
        "workers; nothing here measures a GPU's speed):"
    )
    for name, per_model in cores.items():
        if isinstance(per_model, dict):
            lines.append(f"  {name:<24} " + " / ".join(f"{v:.1f}" for v in per_model.values()))
    return "\n".join(lines)


def format_kernel_table(report: dict) -> str:
    cfg, env = report["config"], report["env"]
    lines = [
        f"Linear kernels of {cfg['model']} at batch {cfg['batch_size']}, GFLOP/s, best of {cfg['repeats']} "
        f"rounds x {cfg['iters']} | {env['device_name']} | threads {env['threads']} | malloc: {env['malloc']}",
        f"{'rows':>6} {'in':>5} {'out':>5} {'fwd MKL':>8} {'fwd oneDNN':>10} {'dX MKL':>7} {'dX oneDNN':>9}  "
        "swin-train uses (fwd, dX)",
    ]
    for r in report["results"]:
        used = f"{r['forward_uses']}, {r['grad_input_uses']}"
        lines.append(
            f"{r['rows']:>6} {r['in']:>5} {r['out']:>5} {r['forward_mkl_gflops']:>8.0f} "
            f"{r['forward_onednn_gflops']:>10.0f} {r['grad_input_mkl_gflops']:>7.0f} "
            f"{r['grad_input_onednn_gflops']:>9.0f}  {used}"
        )
    return "\n".join(lines)
