"""Part device_pipeline: the loader benchmark with the device work on the GPU (scripts/benchmark.py
--data-loader --device cuda): timm's loader against ours with the workers augmenting, with the GPU flipping
and augmenting (aug.on_device) and with the GPU decoding too (data.decode=cuda). On a GPU the CPU ms per
image of the whole process tree is what feeding it costs (kernel launches and nvjpeg's host side included),
and img/s is what one process's loader delivers."""

from __future__ import annotations

import json
from pathlib import Path

from gpucheck.loader import loader_budget_s, loader_images, write_jpegs, writing_s
from gpucheck.running import Context, Outcome, Step, run_step, step_status

ROWS = ("timm", "ours", "ours_device_augment", "ours_device_decode", "eval_timm", "eval_ours_device_decode")
BATCH = 64  # 500 x 375 photo-like JPEGs, as many as the widest worker count needs (loader_images)


def plan_device_pipeline(ctx: Context) -> list[Step]:
    folder, images = ctx.out / "device_images", loader_images(ctx.loader_workers, BATCH)
    workers = [str(w) for w in ctx.loader_workers]
    argv = [ctx.python, "scripts/benchmark.py", "--data-loader", str(folder), "--device", "cuda"]
    argv += ["--workers", *workers, "--batch-size", str(BATCH), "--data-images", "256", "--repeats", "1"]
    argv += ["--loader-rows", *ROWS, "--json"]
    budget = loader_budget_s(ctx.loader_workers, images, rows=len(ROWS), repeats=1)
    note = f"after writing {images} JPEGs (500x375) to {folder}"
    return [Step("device_pipeline", argv, budget, note=note, setup_s=writing_s(images))]


def pipeline_rows(report: dict) -> dict:
    """{workers: {row: img/s, CPU ms per image (process tree), of it the device transform's main-thread CPU,
    CPU vs timm}} for the rows that matter on a GPU."""
    out = {}
    for workers, rows in report["results"].items():
        out[workers] = {
            name: {
                "img_s": round(r["median_img_s"], 1),
                "cpu_ms_per_image": round(r["cpu_ms_per_image"], 3),
                "device_transform_cpu_ms": round(r["device_work_ms_per_image"], 3),
                "cpu_vs_timm": round(r.get("cpu_vs_timm", 1.0), 3),
            }
            for name, r in rows.items()
            if name in ROWS
        }
    return out


def run_device_pipeline(ctx: Context, steps: list[Step]) -> Outcome:
    write_jpegs(ctx.out / "device_images", count=loader_images(ctx.loader_workers, BATCH))
    results = [run_step(steps[0], ctx)]
    status, r, data = step_status(results), results[0], {}
    if r.exit_code == 0:
        try:
            data = {"pipelines": pipeline_rows(json.loads(Path(r.stdout).read_text()))}
        except (OSError, ValueError, KeyError) as e:
            return "failed", f"unreadable JSON from scripts/benchmark.py ({type(e).__name__})", data, results
    if not data:
        return status, "no result", data, results
    widest = max(data["pipelines"], key=int)
    best = data["pipelines"][widest]["ours_device_decode"]
    summary = (
        f"{widest} workers, GPU decoding and augmenting: {best['img_s']:.0f} img/s, "
        f"{best['cpu_ms_per_image']:.2f} CPU ms/img ({best['cpu_vs_timm']:.2f}x timm's loader)"
    )
    return status, summary, data, results
