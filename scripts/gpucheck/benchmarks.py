"""Parts bench_eager, bench_flex, bench_compiled: scripts/benchmark.py per model (Swin-T, -B, -L, bf16),
ours against timm, eager, with FlexAttention or with ours compiled; the numbers its JSON gives the summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gpucheck.report import fmt
from gpucheck.running import Context, Outcome, Step, run_step, step_status

MODELS = {
    "T": "swin_tiny_patch4_window7_224",
    "B": "swin_base_patch4_window7_224",
    "L": "swin_large_patch4_window7_224",
}
# seconds per benchmark run, by mode and model: start-up, weight init on the CPU and the timed rounds
# (compilation adds the most, growing with depth and width)
BENCH_BUDGET_S = {
    "eager": {"T": 60, "B": 80, "L": 110},
    "flex": {"T": 100, "B": 100, "L": 120},
    "compiled": {"T": 140, "B": 190, "L": 220},  # together within one call of the default budget
}
BENCH_MODE_FLAGS = {"eager": [], "flex": ["--attention", "flex"], "compiled": ["--compile", "ours"]}
BENCH_ROUNDS = ["--warmup", "3", "--repeats", "3", "--iters", "10"]


def plan_bench(mode: str) -> Callable[[Context], list[Step]]:
    def plan(ctx: Context) -> list[Step]:
        return [
            Step(
                f"bench_{mode}_{key}",
                [
                    ctx.python,
                    "scripts/benchmark.py",
                    "--device",
                    "cuda",
                    "--dtype",
                    "bf16",
                    "--batch-size",
                    str(ctx.batch_size),
                    "--model",
                    MODELS[key],
                    "--impls",
                    "ours",
                    "timm",
                    *BENCH_ROUNDS,
                    *BENCH_MODE_FLAGS[mode],
                    "--json",
                ],
                BENCH_BUDGET_S[mode][key],
            )
            for key in ctx.models
        ]

    return plan


def bench_row(report: dict) -> dict:
    """The numbers of one scripts/benchmark.py JSON report that go into the summary table."""
    res, ratios = report["results"], report.get("ratios", {}).get("ours/timm", {})
    row = {
        "model": report["config"]["model"],
        "compile": report["config"]["compile"],
        "attention": report["config"]["attention"],
    }
    for impl in ("ours", "timm"):
        for mode in ("train", "infer"):
            r = res.get(impl, {}).get(mode, {})
            row[f"{impl}_{mode}_img_s"] = r.get("median_img_s")
            row[f"{impl}_{mode}_mfu"] = r.get("mfu")
            row[f"{impl}_{mode}_mem_mib"] = r.get("peak_mem_mib")
        row[f"{impl}_compile_s"] = res.get(impl, {}).get("compile_s")
    for mode in ("train", "infer"):
        row[f"{mode}_vs_timm"] = ratios.get(mode, {}).get("median")
    return row


def run_bench(ctx: Context, steps: list[Step]) -> Outcome:
    results, rows, problems = [], [], []
    for step in steps:
        r = run_step(step, ctx)
        results.append(r)
        if r.exit_code == 0:
            try:
                rows.append(bench_row(json.loads(Path(r.stdout).read_text())))
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{step.name}: unreadable JSON ({type(e).__name__})")
        else:
            why = "timed out" if r.timed_out else "not run" if r.exit_code is None else f"exit {r.exit_code}"
            problems.append(f"{step.name}: {why}")
    status = step_status(results)
    if status == "passed" and problems:
        status = "failed"
    summary = "; ".join(
        f"{row['model'].split('_')[1]} train {fmt(row['ours_train_img_s'], '.0f')} img/s "
        f"({fmt(row['train_vs_timm'], '.2f')}x timm)"
        for row in rows
    )
    if problems:
        summary = "; ".join(filter(None, [summary, *problems]))
    return status, summary or "no results", {"rows": rows}, results
