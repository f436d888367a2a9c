"""Every check that needs a CUDA GPU, in one command and one report (markdown + JSON).

    bash scripts/gpu_check.sh                       # all parts, report in output/gpu_check/
    python scripts/gpu_check.py --out /tmp/gpu --parts cuda_tests preempt_resume
    python scripts/gpu_check.py --dry-run           # the commands it would run, nothing is run

Parts, in the order they run (each has its own time budget; one that fails or runs out of time is recorded
in the report and the next part runs). `--budget` caps the whole check: a part starts only if its budget
fits in what is left, else it is recorded as skipped (not a failure) and the next part that fits runs;
`--dry-run` shows the plan and the commands that run the skipped parts in further calls. The default budget
(560 s, one 10-minute command) takes the first three parts on a 16-core machine:

    cuda_tests      the tests that skip without CUDA (found in tests/ by their skipif decorators), under pytest
    preempt_resume  swin-train on synthetic data (Swin-T, bf16) under torchrun on every visible GPU; SIGTERM
                    to the workers once the first step checkpoint exists: they must exit 143 after writing a
                    checkpoint; the same command again must resume and finish (exit 0, every epoch recorded)
    bench_eager     scripts/benchmark.py: Swin-T, -B, -L, bf16, batch 128, ours against timm (img/s, MFU,
                    peak memory)
    data_loader     scripts/benchmark.py --data-loader: JPEG decode + the official train transform, img/s per
                    worker, on generated 500x375 JPEGs; with the GPU's train img/s this gives the CPU cores
                    one GPU needs
    device_pipeline scripts/benchmark.py --data-loader --device cuda: timm's loader against ours with the GPU
                    augmenting (aug.on_device) and decoding (data.decode=cuda): img/s and the CPU ms per image
                    of the process tree, which on a GPU is what feeding it costs
    bench_flex      as bench_eager with --attention flex (FlexAttention for our window attention)
    bench_compiled  as bench_eager with --compile ours (ours compiled against timm eager)

Without a CUDA GPU it prints one line and exits 2 (`--dry-run` needs none). Exit status 0 when no part failed
or timed out (skipped parts are listed), 1 otherwise; the report says which part failed and why (with the
end of its output).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from swin_train.errors import ConfigError, SwinTrainError

# The parts are in scripts/gpucheck/: `python scripts/gpu_check.py` puts scripts/ on sys.path, loading this file
# by path (tests/test_gpu_check.py) does not.
if (scripts_dir := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.insert(0, scripts_dir)

from gpucheck.benchmarks import MODELS, plan_bench, run_bench
from gpucheck.cuda_tests import plan_cuda_tests, run_cuda_tests
from gpucheck.device_pipeline import plan_device_pipeline, run_device_pipeline
from gpucheck.environment import environment, visible_gpus
from gpucheck.loader import default_loader_workers, loader_cores, plan_data_loader, run_data_loader
from gpucheck.preempt_resume import plan_preempt_resume, run_preempt_resume
from gpucheck.report import write_report
from gpucheck.running import MARGIN_S, Context, Part, fits, part_budget, plan_within_budget, run_part

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
    Part(
        "device_pipeline",
        "Loader with the GPU decoding and augmenting: img/s, CPU ms per image against timm",
        plan_device_pipeline,
        run_device_pipeline,
    ),
    Part("bench_flex", "Model benchmark, FlexAttention, against timm", plan_bench("flex"), run_bench),
    Part(
        "bench_compiled",
        "Model benchmark, ours compiled, against timm eager",
        plan_bench("compiled"),
        run_bench,
    ),
)
PART_NAMES = tuple(p.name for p in PARTS)


class NoGpu(SwinTrainError):
    """The machine has no CUDA GPU to check."""


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
        "--workers",
        type=int,
        nargs="+",
        default=default_loader_workers(),
        help="data loader worker counts of the loader parts (default: 1 2 4 8, those below this machine's cores)",
    )
    p.add_argument(
        "--budget", type=float, default=560, help="seconds for the whole check (default: under 10 min)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the commands and the report path; run nothing"
    )
    return p


def dry_run(ctx: Context, parts: Sequence[Part], budget: float, argv: Sequence[str]) -> str:
    lines = [f"# {len(parts)} parts, {ctx.num_gpus} GPU(s), overall budget {budget:.0f} s"]
    skipped = []
    for part, steps, needs, planned in plan_within_budget(parts, ctx, budget):
        state = f"budget {needs:.0f} s" if planned else f"skipped: needs {needs:.0f} s, over the budget"
        lines.append(f"## {part.name}: {part.title} ({state})")
        lines += [f"{s.command}" + (f"    # {s.note}" if s.note else "") for s in steps]
        skipped += [] if planned else [part.name]
    lines.append(f"# report: {ctx.out / 'report.md'} and {ctx.out / 'report.json'}")
    if skipped:
        calls = further_calls(skipped, parts, ctx, budget, argv)
        lines.append(f"# skipped parts, in further calls: {' '.join(calls)}")
    return "\n".join(lines)


def further_calls(
    skipped: Sequence[str], parts: Sequence[Part], ctx: Context, total: float, argv: Sequence[str]
) -> list[str]:
    """Commands that run the skipped parts, as many parts a call as fit the same budget (a part larger than
    the whole budget gets a call with a budget of its own)."""
    budgets = {p.name: part_budget(p.plan(ctx)) for p in parts if p.name in skipped}
    calls: list[list[str]] = []
    for name in skipped:
        call = next((c for c in calls if fits(sum(budgets[n] for n in c) + budgets[name], total)), None)
        calls.append([name]) if call is None else call.append(name)
    keep = [a for a in _without_option(argv, "--parts") if a != "--dry-run"]
    commands = []
    for call in calls:
        need = sum(budgets[n] for n in call)
        extra = [] if fits(need, total) else ["--budget", f"{need + MARGIN_S:.0f}"]
        commands.append(shlex.join(["python", "scripts/gpu_check.py", *keep, "--parts", *call, *extra]) + ";")
    return commands


def _without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` less `option` and the values after it."""
    out, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg == option
        if not skipping:
            out.append(arg)
    return out


def run_parts(ctx: Context, parts: Sequence[Part]) -> None:
    """Each part in turn, its result in ctx.results and a line on stderr."""
    for part in parts:
        print(f"gpu_check: {part.name} ...", file=sys.stderr, flush=True)
        ctx.results[part.name] = result = run_part(part, ctx)
        print(
            f"gpu_check: {part.name}: {result.status} ({result.seconds:.0f} s): {result.summary}",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.budget <= 0 or min(args.workers) < 1:
        raise ConfigError(
            f"--batch-size, --budget and --workers must be positive, got {args.batch_size}, {args.budget}, "
            f"{' '.join(map(str, args.workers))}"
        )
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
        loader_workers=sorted(set(args.workers)),
        deadline=time.monotonic() + args.budget,
    )
    parts = [p for p in PARTS if p.name in args.parts]
    if args.dry_run:
        print(dry_run(ctx, parts, args.budget, argv))
        return 0
    started = datetime.now(timezone.utc)
    env = environment(num_gpus)
    run_parts(ctx, parts)
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
    skipped = [r.name for r in ctx.results.values() if r.status == "skipped"]
    if skipped:
        print(f"skipped (over the budget): {' '.join(skipped)}; run them with --parts")
    return 0 if all(r.status in ("passed", "skipped") for r in ctx.results.values()) else 1


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with user errors as one line on stderr and their exit status (2)."""
    try:
        return main(argv)
    except SwinTrainError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(cli())
