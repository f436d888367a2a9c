"""Part preempt_resume: swin-train under torchrun on every visible GPU gets SIGTERM in its workers once a
step checkpoint exists; they must checkpoint and exit 143, and the same command must then resume and
finish every epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from processes.proc import children, cmdline

from gpucheck.running import (
    BUDGET_SPENT,
    MIN_STEP_S,
    Context,
    Outcome,
    Step,
    StepResult,
    finish,
    not_run,
    run_step,
    start,
    step_status,
)

PREEMPT_STEP = 10  # the step checkpoint after which the workers get SIGTERM
STOP_EXIT_CODE = 143  # swin-train's exit status after a SIGTERM it checkpointed
MARKER = f"step-{PREEMPT_STEP:09d}.pth"


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
    note = f"SIGTERM to every worker once {run_dir}/{MARKER} exists; each must exit {STOP_EXIT_CODE}"
    # each run: torchrun and CUDA start-up, then 10 steps (the first) or 90 steps, two validations and three
    # checkpoints (the second) of Swin-T at batch 128: well under a minute on one current GPU
    return [
        Step("train_until_sigterm", argv, 80, note=note),
        Step("resume", list(argv), 80, note="the same command: resumes and finishes (exit 0)"),
    ]


def worker_exit_codes(torchrun_output: str) -> list[int]:
    """Exit codes of the failed workers in the order of torchrun's failure report (`exitcode  : 143 (pid ...)`):
    the other failures first, the root cause (the first worker to exit) last."""
    return [int(code) for code in re.findall(r"^\s+exitcode\s+:\s*(-?\d+)", torchrun_output, re.MULTILINE)]


def run_preempt_resume(ctx: Context, steps: list[Step]) -> Outcome:
    first, again = steps
    if ctx.left_s() < MIN_STEP_S:
        return "skipped", BUDGET_SPENT, {}, [not_run(s) for s in steps]
    run_dir = Path(first.argv[first.argv.index("--output") + 1])
    timeout = min(first.budget_s, ctx.left_s())
    stopped, signalled = run_until_sigterm(first, ctx, run_dir / MARKER, timeout)
    data = stopped_run_data(stopped, signalled, run_dir)
    if stopped.timed_out:
        return "timed out", f"the first run did not stop within {timeout:.0f} s", data, [stopped]
    if problems := stop_problems(data):
        return "failed", "; ".join(problems), data, [stopped]
    resumed = run_step(again, ctx)
    data.update(resumed_run_data(resumed, run_dir))
    status, summary = judge_resume(resumed, data)
    return status, summary, data, [stopped, resumed]


def run_until_sigterm(step: Step, ctx: Context, marker: Path, timeout: float) -> tuple[StepResult, list[int]]:
    """Run `step`; once `marker` exists, SIGTERM every training worker (torchrun's children running
    swin_train.cli.train) and wait for the run to end. Returns its result and the pids signalled."""
    started = time.monotonic()
    proc, out_path, err_path = start(step, ctx.out / "logs")
    signalled: list[int] = []
    while proc.poll() is None and time.monotonic() - started < timeout:
        if marker.exists():
            workers = [p for p in children(proc.pid) if "swin_train.cli.train" in cmdline(p)]
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGTERM)
                    signalled.append(pid)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.2)
    result = finish(step, proc, out_path, err_path, started, timeout - (time.monotonic() - started))
    return result, signalled


def stopped_run_data(result: StepResult, signalled: list[int], run_dir: Path) -> dict:
    full = Path(result.stdout).read_text(errors="replace") + Path(result.stderr).read_text(errors="replace")
    return {
        "signalled_workers": len(signalled),
        "worker_exit_codes": worker_exit_codes(full),
        "stop_logged": "stop requested (SIGTERM)" in full,
        "step_checkpoints": sorted(p.name for p in run_dir.glob("step-*.pth")),
    }


def stop_problems(data: dict) -> list[str]:
    """What was wrong with the stop of the first run (nothing: a clean stop)."""
    signalled, codes = data["signalled_workers"], data["worker_exit_codes"]
    problems = []
    if not signalled:
        problems.append(f"no worker was signalled ({MARKER} never appeared or the run ended first)")
    # The first worker to exit is torchrun's root cause and must show 143; torchrun then SIGTERMs the rest,
    # which may already be past their handler on the way out (-15): both are a clean stop.
    if signalled and (
        not codes or codes[-1] != STOP_EXIT_CODE or any(c not in (STOP_EXIT_CODE, -15) for c in codes)
    ):
        problems.append(f"worker exit codes {codes} (root cause last), expected {STOP_EXIT_CODE}")
    if signalled and not data["stop_logged"]:
        problems.append("no 'stop requested (SIGTERM)' in the log")
    return problems


def resumed_run_data(resumed: StepResult, run_dir: Path) -> dict:
    resumed_text = Path(resumed.stdout).read_text(errors="replace") if resumed.stdout else ""
    epochs = []
    if (run_dir / "metrics.jsonl").exists():
        epochs = [
            json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
        ]
    return {
        "resume_exit_code": resumed.exit_code,
        "resumed_from_checkpoint": "resuming from" in resumed_text,
        "epochs_recorded": epochs,
    }


def judge_resume(resumed: StepResult, data: dict) -> tuple[str, str]:
    """The part's status and summary once the same command has run again."""
    status = step_status([resumed])
    if status != "passed":
        return (
            status,
            f"the resumed run ended with {resumed.exit_code if not resumed.timed_out else 'a time-out'}",
        )
    epochs = data["epochs_recorded"]
    if not data["resumed_from_checkpoint"] or epochs != [0, 1]:
        return (
            "failed",
            f"resumed run: 'resuming from' logged {data['resumed_from_checkpoint']}, epochs {epochs}",
        )
    newest = data["step_checkpoints"][-1] if data["step_checkpoints"] else "none"
    summary = (
        f"SIGTERM to {data['signalled_workers']} worker(s) after step {PREEMPT_STEP}: stop checkpoint {newest}, "
        f"exit codes {data['worker_exit_codes']}; the same command resumed and finished both epochs (exit 0)"
    )
    return "passed", summary
