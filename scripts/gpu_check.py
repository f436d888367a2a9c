"""Every check that needs a CUDA GPU, in one command and one report (markdown + JSON).

    bash scripts/gpu_check.sh                       # all parts, report in output/gpu_check/
    python scripts/gpu_check.py --out /tmp/gpu --parts cuda_tests preempt_resume
    python scripts/gpu_check.py --dry-run           # the commands it would run, nothing is run

Parts, in the order they run (each has its own time budget; one that fails or runs out of time is recorded
in the report and the next part runs; `--budget` caps the whole check, and a part that no longer fits is
recorded as skipped):

    cuda_tests      the tests that skip without CUDA (found in tests/ by their skipif decorators), under pytest
    preempt_resume  swin-train on synthetic data (Swin-T, bf16) under torchrun on every visible GPU; SIGTERM
                    to the workers once the first step checkpoint exists: they must exit 143 after writing a
                    checkpoint; the same command again must resume and finish (exit 0, every epoch recorded)
    bench_eager     scripts/benchmark.py: Swin-T, -B, -L, bf16, batch 128, ours against timm (img/s, MFU,
                    peak memory)
    data_loader     scripts/benchmark.py --data-loader: JPEG decode + the official train transform, img/s per
                    worker, on generated 500x375 JPEGs; with the GPU's train img/s this gives the CPU cores
                    one GPU needs
    bench_flex      as bench_eager with --attention flex (FlexAttention for our window attention)
    bench_compiled  as bench_eager with --compile ours (ours compiled against timm eager)

Without a CUDA GPU it prints one line and exits 2 (`--dry-run` needs none). Exit status 0 when every part
passed, 1 otherwise; the report says which part failed and why (with the end of its output).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from swin_train.errors import ConfigError, SwinTrainError

REPO = Path(__file__).resolve().parents[1]
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
    "compiled": {"T": 150, "B": 210, "L": 240},
}
BENCH_MODE_FLAGS = {"eager": [], "flex": ["--attention", "flex"], "compiled": ["--compile", "ours"]}
BENCH_ROUNDS = ["--warmup", "3", "--repeats", "3", "--iters", "10"]
PREEMPT_STEP = 10  # the step checkpoint after which the workers get SIGTERM
STOP_EXIT_CODE = 143  # swin-train's exit status after a SIGTERM it checkpointed
# no step starts with less than this left before the overall deadline (it is recorded as not run)
MIN_STEP_S = 15
TAIL_CHARS = 3000
STATUSES = ("passed", "failed", "timed out", "skipped")


class NoGpu(SwinTrainError):
    """The machine has no CUDA GPU to check."""


# --------------------------------------------------------------------------------------------- results


@dataclass
class Step:
    """One command of a part: what to run, for how long at most, and extra environment."""

    name: str
    argv: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""  # what happens around the command (e.g. a signal), for --dry-run and the report

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass
class StepResult:
    name: str
    command: str
    exit_code: int | None  # None: not started
    seconds: float
    timed_out: bool = False
    stdout: str = ""  # path of the captured output
    stderr: str = ""
    tail: str = ""  # the end of stderr + stdout, for the report


@dataclass
class PartResult:
    name: str
    title: str
    status: str  # one of STATUSES
    seconds: float
    budget_s: float
    summary: str  # one line
    steps: list[StepResult] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # part-specific numbers (tables in the report)


@dataclass
class Context:
    out: Path
    python: str
    num_gpus: int
    models: list[str]  # keys of MODELS
    batch_size: int
    loader_workers: list[int]
    deadline: float  # time.monotonic() by which every step must have ended
    results: dict[str, PartResult] = field(default_factory=dict)  # parts done so far, by name

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------------------ running


def _tail(*paths: Path) -> str:
    text = ""
    for path in paths:
        try:
            text += path.read_text(errors="replace")
        except OSError:
            pass
    return text[-TAIL_CHARS:]


def _kill_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(step: Step, logs: Path) -> tuple[subprocess.Popen, Path, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{step.name}.out", logs / f"{step.name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(step.argv, stdout=out, stderr=err, cwd=REPO, env=env, start_new_session=True)
    return proc, out_path, err_path


def finish(
    step: Step, proc: subprocess.Popen, out_path: Path, err_path: Path, started: float, timeout_s: float
) -> StepResult:
    """Wait for `proc` at most `timeout_s` more seconds (then kill its group) and record the result."""
    timed_out = False
    try:
        proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    return StepResult(
        step.name,
        step.command,
        proc.returncode,
        time.monotonic() - started,
        timed_out,
        str(out_path),
        str(err_path),
        _tail(err_path, out_path),
    )


def run_step(step: Step, ctx: Context) -> StepResult:
    """Run one step to completion or until min(its budget, the time left) is spent."""
    if ctx.left_s() < MIN_STEP_S:
        return StepResult(step.name, step.command, None, 0.0, tail="not run: the overall --budget is spent")
    timeout = min(step.budget_s, ctx.left_s())
    started = time.monotonic()
    proc, out_path, err_path = start(step, ctx.out / "logs")
    return finish(step, proc, out_path, err_path, started, timeout)


def step_status(results: Sequence[StepResult]) -> str:
    if any(r.timed_out for r in results):
        return "timed out"
    if any(r.exit_code is None for r in results):
        return "skipped" if all(r.exit_code is None for r in results) else "failed"
    return "passed" if all(r.exit_code == 0 for r in results) else "failed"


# ------------------------------------------------------------------------------------------- cuda_tests


def _is_cuda_skip(decorator: ast.expr) -> bool:
    """`pytest.mark.skipif(not <...>, reason="... CUDA ..." / "... GPU ...")`: skipped where CUDA is missing."""
    if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.skipif")):
        return False
    condition = decorator.args[0] if decorator.args else None
    reason = next((k.value for k in decorator.keywords if k.arg == "reason"), None)
    reason_text = reason.value if isinstance(reason, ast.Constant) and isinstance(reason.value, str) else ""
    negated = isinstance(condition, ast.UnaryOp) and isinstance(condition.op, ast.Not)
    return negated and bool(re.search(r"\bCUDA\b|\bGPU\b", reason_text))


def _marked(decorators: list[ast.expr], aliases: set[str]) -> bool:
    return any(_is_cuda_skip(d) or (isinstance(d, ast.Name) and d.id in aliases) for d in decorators)


def cuda_test_ids(tests_dir: Path) -> list[str]:
    """pytest node ids of the tests that skip without CUDA: test functions (or classes, or whole modules via
    `pytestmark`) marked `skipif(not ..., reason=...CUDA/GPU...)`, directly or through a module-level name
    (`needs_cuda = pytest.mark.skipif(...)`, then `@needs_cuda`), relative to the repository root."""
    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(tests_dir.parent).as_posix()
        aliases = {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign) and _is_cuda_skip(n.value)
            for t in n.targets
            if isinstance(t, ast.Name) and t.id != "pytestmark"
        }

        module_marks = [
            n.value
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
        ]
        marks = [m for v in module_marks for m in (v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v])]
        if any(_is_cuda_skip(m) for m in marks):
            ids.append(rel)
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith("test"):
                if _marked(node.decorator_list, aliases):
                    ids.append(f"{rel}::{node.name}")
                elif isinstance(node, ast.ClassDef):
                    ids += [
                        f"{rel}::{node.name}::{m.name}"
                        for m in node.body
                        if isinstance(m, ast.FunctionDef)
                        and m.name.startswith("test")
                        and _marked(m.decorator_list, aliases)
                    ]
    return ids


def plan_cuda_tests(ctx: Context) -> list[Step]:
    ids = cuda_test_ids(REPO / "tests")
    return [
        Step("pytest_cuda", [ctx.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *ids], 150)
    ]


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's final summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if not lines:
        return {}
    return {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])
    }


def run_cuda_tests(ctx: Context, steps: list[Step]) -> tuple[str, str, dict, list[StepResult]]:
    ids = [a for a in steps[0].argv if a.startswith("tests/")]
    if not ids:  # pytest without node ids would run the whole suite
        return "failed", "no test in tests/ is marked skipif(not ..., reason='...CUDA...')", {}, []
    results = [run_step(steps[0], ctx)]
    r = results[0]
    text = Path(r.stdout).read_text(errors="replace") if r.stdout else ""
    counts = pytest_counts(text)
    skipped = re.findall(r"SKIPPED \[\d+\] (.+)", text)
    data = {"tests": ids, "counts": counts, "skipped": skipped}
    status = step_status(results)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
    if status == "passed" and counts.get("skipped"):
        status = "failed"
        summary += f" (skipped on a GPU machine: {'; '.join(skipped) or 'see the log'})"
    return status, summary, data, results


# --------------------------------------------------------------------------------------- preempt_resume


def plan_preempt_resume(ctx: Context) -> list[Step]:
    run_dir = ctx.out / "preempt_resume"
    argv = [
        ctx.python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ctx.num_gpus}",
        "-m",
        "swin_train.cli.train",
        "--output",
        str(run_dir),
        "--device",
        "cuda",
        "model.name=swin_tiny_patch4_window7_224",
        "model.num_classes=100",
        "data.synthetic=true",
        "data.batch_size=128",
        "data.num_workers=2",
        "train.epochs=2",
        "train.warmup_epochs=0",
        f"train.checkpoint_every_steps={PREEMPT_STEP}",
        "print_freq=10",
        "amp=bf16",
    ]
    note = (
        f"SIGTERM to every worker once {run_dir}/step-{PREEMPT_STEP:09d}.pth exists; each must exit "
        f"{STOP_EXIT_CODE}"
    )
    return [
        Step("train_until_sigterm", argv, 150, note=note),
        Step("resume", list(argv), 150, note="the same command: resumes and finishes (exit 0)"),
    ]


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_exit_codes(torchrun_output: str) -> list[int]:
    """Exit codes of the failed workers in the order of torchrun's failure report (`exitcode  : 143 (pid ...)`):
    the other failures first, the root cause (the first worker to exit) last."""
    return [int(code) for code in re.findall(r"^\s+exitcode\s+:\s*(-?\d+)", torchrun_output, re.MULTILINE)]


def run_preempt_resume(ctx: Context, steps: list[Step]) -> tuple[str, str, dict, list[StepResult]]:
    first, again = steps
    run_dir = Path(first.argv[first.argv.index("--output") + 1])
    marker = run_dir / f"step-{PREEMPT_STEP:09d}.pth"
    timeout = min(first.budget_s, ctx.left_s())
    if ctx.left_s() < MIN_STEP_S:
        skipped = [
            StepResult(s.name, s.command, None, 0.0, tail="not run: the overall --budget is spent")
            for s in steps
        ]
        return "skipped", "not run: the overall --budget is spent", {}, skipped
    started = time.monotonic()
    proc, out_path, err_path = start(first, ctx.out / "logs")
    signalled: list[int] = []
    while proc.poll() is None and time.monotonic() - started < timeout:
        if marker.exists():
            workers = [p for p in _children(proc.pid) if "swin_train.cli.train" in _cmdline(p)]
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGTERM)
                    signalled.append(pid)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.2)
    result = finish(first, proc, out_path, err_path, started, timeout - (time.monotonic() - started))
    full = out_path.read_text(errors="replace") + err_path.read_text(errors="replace")
    codes = worker_exit_codes(full)
    stop_logged = "stop requested (SIGTERM)" in full
    data = {
        "signalled_workers": len(signalled),
        "worker_exit_codes": codes,
        "stop_logged": stop_logged,
        "step_checkpoints": sorted(p.name for p in run_dir.glob("step-*.pth")),
    }
    problems = []
    if not signalled:
        problems.append(f"no worker was signalled ({marker.name} never appeared or the run ended first)")
    # The first worker to exit is torchrun's root cause and must show 143; torchrun then SIGTERMs the rest,
    # which may already be past their handler on the way out (-15): both are a clean stop.
    if signalled and (
        not codes or codes[-1] != STOP_EXIT_CODE or any(c not in (STOP_EXIT_CODE, -15) for c in codes)
    ):
        problems.append(f"worker exit codes {codes} (root cause last), expected {STOP_EXIT_CODE}")
    if signalled and not stop_logged:
        problems.append("no 'stop requested (SIGTERM)' in the log")
    results = [result]
    if result.timed_out:
        return "timed out", f"the first run did not stop within {timeout:.0f} s", data, results
    if problems:
        return "failed", "; ".join(problems), data, results
    results.append(run_step(again, ctx))
    resumed = results[1]
    resumed_text = Path(resumed.stdout).read_text(errors="replace") if resumed.stdout else ""
    epochs = []
    if (run_dir / "metrics.jsonl").exists():
        epochs = [
            json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
        ]
    data.update(
        {
            "resume_exit_code": resumed.exit_code,
            "resumed_from_checkpoint": "resuming from" in resumed_text,
            "epochs_recorded": epochs,
        }
    )
    status = step_status(results[1:])
    if status != "passed":
        return (
            status,
            f"the resumed run ended with {resumed.exit_code if not resumed.timed_out else 'a time-out'}",
            data,
            results,
        )
    if not data["resumed_from_checkpoint"] or epochs != [0, 1]:
        return (
            "failed",
            f"resumed run: 'resuming from' logged {data['resumed_from_checkpoint']}, epochs {epochs}",
            data,
            results,
        )
    newest = data["step_checkpoints"][-1] if data["step_checkpoints"] else "none"
    summary = (
        f"SIGTERM to {len(signalled)} worker(s) after step {PREEMPT_STEP}: stop checkpoint {newest}, exit codes "
        f"{codes}; the same command resumed and finished both epochs (exit 0)"
    )
    return "passed", summary, data, results


# ------------------------------------------------------------------------------------------- benchmarks


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


def run_bench(ctx: Context, steps: list[Step]) -> tuple[str, str, dict, list[StepResult]]:
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
        f"{row['model'].split('_')[1]} train {_fmt(row['ours_train_img_s'], '.0f')} img/s "
        f"({_fmt(row['train_vs_timm'], '.2f')}x timm)"
        for row in rows
    )
    if problems:
        summary = "; ".join(filter(None, [summary, *problems]))
    return status, summary or "no results", {"rows": rows}, results


# ------------------------------------------------------------------------------------------ data_loader


def write_jpegs(folder: Path, count: int = 96, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """`count` JPEGs of ImageNet's typical size with smooth gradients, shapes and noise (decoding cost like
    photos, unlike flat colour), once."""
    import numpy as np
    from PIL import Image, ImageDraw

    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
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
        img.save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def default_loader_workers() -> list[int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return sorted({w for w in (1, 2, 4, 8) if w <= max(1, cores - 1)})


def plan_data_loader(ctx: Context) -> list[Step]:
    folder = ctx.out / "loader_images"
    argv = [
        ctx.python,
        "scripts/benchmark.py",
        "--data-loader",
        str(folder),
        "--workers",
        *map(str, ctx.loader_workers),
        "--data-images",
        "256",
        "--repeats",
        "2",
        "--json",
    ]
    return [Step("data_loader", argv, 90, note=f"after writing 96 JPEGs (500x375) to {folder}")]


def loader_cores(loader: dict | None, bench_parts: Sequence[PartResult], num_gpus: int) -> list[dict]:
    """Per benchmarked model and mode: the GPU's train img/s (ours) over the loader's img/s per worker, i.e.
    the CPU cores one GPU needs to be fed, beside the cores there are per GPU."""
    if not loader or not loader.get("per_worker_img_s"):
        return []
    per_worker = max(loader["per_worker_img_s"].values())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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


def run_data_loader(ctx: Context, steps: list[Step]) -> tuple[str, str, dict, list[StepResult]]:
    write_jpegs(ctx.out / "loader_images")
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


# ------------------------------------------------------------------------------------------------ parts


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    plan: Callable[[Context], list[Step]]
    run: Callable[[Context, list[Step]], tuple[str, str, dict, list[StepResult]]]


PARTS = (
    Part("cuda_tests", "Tests that need CUDA", plan_cuda_tests, run_cuda_tests),
    Part(
        "preempt_resume",
        "SIGTERM and resume under torchrun (synthetic data)",
        plan_preempt_resume,
        run_preempt_resume,
    ),
    Part("bench_eager", "Model benchmark, eager, against timm", plan_bench("eager"), run_bench),
    Part("data_loader", "Data loader img/s per worker, CPU cores per GPU", plan_data_loader, run_data_loader),
    Part("bench_flex", "Model benchmark, FlexAttention, against timm", plan_bench("flex"), run_bench),
    Part(
        "bench_compiled",
        "Model benchmark, ours compiled, against timm eager",
        plan_bench("compiled"),
        run_bench,
    ),
)
PART_NAMES = tuple(p.name for p in PARTS)


def run_part(part: Part, ctx: Context) -> PartResult:
    """Run one part; anything it raises is recorded as its failure, never the end of the check."""
    steps = part.plan(ctx)
    budget = sum(s.budget_s for s in steps)
    started = time.monotonic()
    try:
        status, summary, data, results = part.run(ctx, steps)
    except Exception as e:  # a bug or a broken environment in one part must not lose the others' results
        status, summary, data, results = "failed", f"{type(e).__name__}: {e}", {}, []
    return PartResult(
        part.name, part.title, status, time.monotonic() - started, budget, summary, results, data
    )


# ----------------------------------------------------------------------------------------------- report


def _fmt(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) + suffix


def _plain(obj):
    """JSON-safe: dataclasses to dicts, non-finite floats to None (JSON has no NaN), tuples to lists."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines + [""]


def _fence(text: str) -> list[str]:
    return ["```text", text.replace("```", "'''").rstrip(), "```", ""]


def render_markdown(report: dict) -> str:
    """The report as markdown: environment, a summary table of the parts, then each part's details."""
    env = report["environment"]
    gpus = ", ".join(f"{g['name']} ({g['memory_mib']} MiB)" for g in env.get("gpus", [])) or "none"
    lines = [
        f"# GPU check: {env.get('host', '?')}",
        "",
        f"Started {report['started']}, took {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"GPUs: {gpus}.",
        "",
    ]
    lines += _table(("environment", "value"), [(k, str(v)) for k, v in env.items() if k != "gpus"])
    lines += ["## Summary", ""]
    lines += _table(
        ("part", "status", "time / budget", "result"),
        [
            (p["name"], p["status"], f"{p['seconds']:.0f} s / {p['budget_s']:.0f} s", p["summary"])
            for p in report["parts"]
        ],
    )
    for p in report["parts"]:
        lines += [f"## {p['name']}: {p['title']}", "", f"**{p['status']}**: {p['summary']}", ""]
        data = p.get("data") or {}
        if data.get("rows"):
            lines += _table(
                (
                    "model",
                    "ours train img/s",
                    "timm train img/s",
                    "train vs timm",
                    "ours infer img/s",
                    "timm infer img/s",
                    "infer vs timm",
                    "MFU train ours / timm",
                    "train mem ours / timm",
                    "compile s (train, infer)",
                ),
                [
                    (
                        r["model"],
                        _fmt(r["ours_train_img_s"], ".1f"),
                        _fmt(r["timm_train_img_s"], ".1f"),
                        _fmt(r["train_vs_timm"], ".3f", "x"),
                        _fmt(r["ours_infer_img_s"], ".1f"),
                        _fmt(r["timm_infer_img_s"], ".1f"),
                        _fmt(r["infer_vs_timm"], ".3f", "x"),
                        f"{_fmt(r['ours_train_mfu'] and 100 * r['ours_train_mfu'], '.1f', '%')} / "
                        f"{_fmt(r['timm_train_mfu'] and 100 * r['timm_train_mfu'], '.1f', '%')}",
                        f"{_fmt(r['ours_train_mem_mib'], '.0f', ' MiB')} / {_fmt(r['timm_train_mem_mib'], '.0f', ' MiB')}",
                        ", ".join(_fmt(v, ".0f") for v in (r["ours_compile_s"] or {}).values()) or "-",
                    )
                    for r in data["rows"]
                ],
            )
        if data.get("per_worker_img_s"):
            lines += _table(
                ("workers", "img/s", "img/s per worker"),
                [
                    (w, _fmt(data["img_s"][w], ".0f"), _fmt(v, ".0f"))
                    for w, v in data["per_worker_img_s"].items()
                ],
            )
        other = {k: v for k, v in data.items() if k not in ("rows", "per_worker_img_s", "img_s")}
        if other:
            lines += _table(("measure", "value"), [(k, json.dumps(v)) for k, v in other.items()])
        for s in p.get("steps", []):
            state = (
                "timed out"
                if s["timed_out"]
                else "not run"
                if s["exit_code"] is None
                else f"exit {s['exit_code']}"
            )
            lines += [f"- `{s['name']}`: {state}, {s['seconds']:.0f} s; output `{s['stdout'] or '-'}`", ""]
            lines += _fence(s["command"])
            if p["status"] != "passed" and s["tail"]:
                lines += ["End of its output:", ""] + _fence(s["tail"])
    if report.get("loader_cores"):
        lines += [
            "## CPU cores one GPU needs",
            "",
            "The GPU's train img/s (ours) over the data loader's img/s per worker (decode + the official "
            "train transform at 224): how many loader cores keep one GPU busy.",
            "",
        ]
        lines += _table(
            (
                "model",
                "mode",
                "GPU train img/s",
                "loader img/s per core",
                "cores needed per GPU",
                "cores per GPU here",
            ),
            [
                (
                    r["model"],
                    r["mode"],
                    _fmt(r["gpu_train_img_s"], ".0f"),
                    _fmt(r["loader_img_s_per_core"], ".0f"),
                    _fmt(r["cores_needed_per_gpu"], ".1f"),
                    _fmt(r["cores_per_gpu"], ".1f"),
                )
                for r in report["loader_cores"]
            ],
        )
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """report.json (strict JSON) and report.md in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plain = _plain(report)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(plain, indent=1, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(plain))
    return md_path, json_path


def environment(num_gpus: int) -> dict:
    """Host, GPUs (from nvidia-smi: no CUDA context in this process), versions and the git commit."""
    import timm
    import torch

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
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "host": socket.gethostname(),
        "gpus": gpus,
        "visible_gpus": num_gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "git_commit": commit or "unknown",
    }


# ------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("output/gpu_check"), help="report, logs and run folders")
    p.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES), help="default: all")
    p.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="benchmarked variants"
    )
    p.add_argument("--batch-size", type=int, default=128, help="benchmark batch size")
    p.add_argument(
        "--budget", type=float, default=560, help="seconds for the whole check (default: under 10 min)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the commands and the report path; run nothing"
    )
    return p


def visible_gpus() -> int:
    """CUDA devices this process may use (honours CUDA_VISIBLE_DEVICES; creates no CUDA context)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def dry_run(ctx: Context, parts: Sequence[Part]) -> str:
    lines = [f"# {len(parts)} parts, {ctx.num_gpus} GPU(s), overall budget {ctx.left_s():.0f} s"]
    for part in parts:
        steps = part.plan(ctx)
        lines.append(f"## {part.name}: {part.title} (budget {sum(s.budget_s for s in steps):.0f} s)")
        for s in steps:
            lines.append(f"{s.command}" + (f"    # {s.note}" if s.note else ""))
    lines.append(f"# report: {ctx.out / 'report.md'} and {ctx.out / 'report.json'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.budget <= 0:
        raise ConfigError(f"--batch-size and --budget must be positive, got {args.batch_size}, {args.budget}")
    num_gpus = visible_gpus()
    if num_gpus == 0 and not args.dry_run:
        raise NoGpu(
            "no CUDA GPU visible; run this on a machine with an NVIDIA GPU (or pass --dry-run to list "
            "the commands)"
        )
    out = args.out.expanduser().resolve()
    ctx = Context(
        out=out,
        python=sys.executable,
        num_gpus=max(num_gpus, 1),
        models=args.models,
        batch_size=args.batch_size,
        loader_workers=default_loader_workers(),
        deadline=time.monotonic() + args.budget,
    )
    parts = [p for p in PARTS if p.name in args.parts]
    if args.dry_run:
        print(dry_run(ctx, parts))
        return 0
    started = datetime.now(timezone.utc)
    env = environment(num_gpus)
    for part in parts:
        print(f"gpu_check: {part.name} ...", file=sys.stderr, flush=True)
        ctx.results[part.name] = result = run_part(part, ctx)
        print(
            f"gpu_check: {part.name}: {result.status} ({result.seconds:.0f} s): {result.summary}",
            file=sys.stderr,
        )
    loader = ctx.results.get("data_loader")
    benches = [r for name, r in ctx.results.items() if name.startswith("bench_")]
    report = {
        "tool": "gpu_check",
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": (datetime.now(timezone.utc) - started).total_seconds(),
        "budget_s": args.budget,
        "environment": env,
        "parts": list(ctx.results.values()),
        "loader_cores": loader_cores(loader.data if loader else None, benches, num_gpus),
    }
    md_path, json_path = write_report(report, out)
    print(f"report: {md_path} and {json_path}")
    return 0 if all(r.status == "passed" for r in ctx.results.values()) else 1


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with user errors as one line on stderr and their exit status (2)."""
    try:
        return main(argv)
    except SwinTrainError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(cli())
