"""Part data_loader: scripts/benchmark.py --data-loader on generated photo-like JPEGs (img/s per loader
worker), and with the benchmarks' GPU train img/s the CPU cores one GPU needs to be fed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import usable_cores

from gpucheck.running import Context, Outcome, PartResult, Step, run_step, step_status

LOADER_BATCH = 32
# images per second one loader worker decodes and augments (docs/performance.md: about 4 CPU ms per image)
PER_WORKER_IMG_S = 200
WRITER_THREADS = max(1, min(8, usable_cores()))


def write_jpegs(folder: Path, count: int = 96, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """`count` JPEGs of ImageNet's typical size with smooth gradients, shapes and noise (decoding cost like
    photos, unlike flat colour), once; image i drawn from (seed, i), on WRITER_THREADS threads (numpy's
    arithmetic and Pillow's encoder release the GIL)."""
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(WRITER_THREADS) as pool:
        list(pool.map(lambda i: _write_jpeg(folder / f"{i:04d}.jpg", size, (seed, i)), range(count)))
    return folder


def _write_jpeg(path: Path, size: tuple[int, int], seed: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = (
        rng.uniform(0, 255, 3)
        + (xx[..., None] / w) * rng.uniform(-80, 80, 3)
        + (yy[..., None] / h) * rng.uniform(-80, 80, 3)
    )
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        box = (x0, y0, x0 + rng.uniform(20, 200), y0 + rng.uniform(20, 200))
        colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=colour)
    img.save(path, quality=90)


def loader_images(workers: Sequence[int], batch_size: int) -> int:
    """Images in a loader set for these worker counts: the benchmark times an epoch after one warm-up batch
    per worker, so the widest count gets as many timed batches as warm-up ones (8 batches at least)."""
    return max(2 * max(workers), 8) * batch_size


def loader_budget_s(workers: Sequence[int], images: int, rows: int, repeats: int) -> float:
    """A generous bound on the loader benchmark's seconds: its start, then per round (row x worker count x
    repeat) the workers' start and one epoch at PER_WORKER_IMG_S per worker, with half again to spare."""
    epochs = sum(2 + 0.3 * w + images / (PER_WORKER_IMG_S * w) for w in workers) * rows * repeats
    return 30 + 1.5 * epochs


def writing_s(images: int) -> float:
    """A bound on write_jpegs's seconds (about 50 ms per image and thread on a slow core)."""
    return 5 + 0.05 * images / WRITER_THREADS


def default_loader_workers() -> list[int]:
    return sorted({w for w in (1, 2, 4, 8) if w <= max(1, usable_cores() - 1)})


def plan_data_loader(ctx: Context) -> list[Step]:
    folder, images = ctx.out / "loader_images", loader_images(ctx.loader_workers, LOADER_BATCH)
    workers = [str(w) for w in ctx.loader_workers]
    argv = [ctx.python, "scripts/benchmark.py", "--data-loader", str(folder), "--workers", *workers]
    argv += ["--batch-size", str(LOADER_BATCH), "--data-images", "256", "--repeats", "2"]
    argv += ["--loader-rows", "ours", "eval_ours", "--json"]
    # four rows a round (timm's train and eval loaders beside ours), each worker count, two rounds
    budget = loader_budget_s(ctx.loader_workers, images, rows=4, repeats=2)
    note = f"after writing {images} JPEGs (500x375) to {folder}"
    return [Step("data_loader", argv, budget, note=note, setup_s=writing_s(images))]


def loader_cores(loader: dict | None, bench_parts: Sequence[PartResult], num_gpus: int) -> list[dict]:
    """Per benchmarked model and mode: the GPU's train img/s (ours) over the loader's img/s per worker, i.e.
    the CPU cores one GPU needs to be fed, beside the cores there are per GPU."""
    if not loader or not loader.get("per_worker_img_s"):
        return []
    per_worker = max(loader["per_worker_img_s"].values())
    cores = usable_cores()
    rows = []
    for part in bench_parts:
        for row in part.data.get("rows", []):
            if row.get("ours_train_img_s"):
                rows.append(
                    {
                        "model": row["model"],
                        "mode": part.name.removeprefix("bench_"),
                        "gpu_train_img_s": row["ours_train_img_s"],
                        "loader_img_s_per_core": per_worker,
                        "cores_needed_per_gpu": row["ours_train_img_s"] / per_worker,
                        "cores_per_gpu": cores / max(num_gpus, 1),
                    }
                )
    return rows


def run_data_loader(ctx: Context, steps: list[Step]) -> Outcome:
    write_jpegs(ctx.out / "loader_images", count=loader_images(ctx.loader_workers, LOADER_BATCH))
    results = [run_step(steps[0], ctx)]
    r = results[0]
    data: dict = {}
    if r.exit_code == 0:
        try:
            report = json.loads(Path(r.stdout).read_text())
            data = {
                "per_worker_img_s": {w: v["per_worker_img_s"] for w, v in report["results"].items()},
                "img_s": {w: v["median_img_s"] for w, v in report["results"].items()},
                "img_size": report["config"]["img_size"],
            }
        except (OSError, ValueError, KeyError) as e:
            return "failed", f"unreadable JSON from scripts/benchmark.py ({type(e).__name__})", data, results
    status = step_status(results)
    if not data:
        return status, "no result", data, results
    best = max(data["per_worker_img_s"].values())
    return status, f"{best:.0f} img/s per loader worker (decode + official train transform)", data, results
