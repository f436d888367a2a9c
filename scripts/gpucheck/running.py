"""How the check runs: a part's commands (Step) each within its budget and the time the whole check has
left, their outcome (StepResult, PartResult), and a part whose failure never ends the check (run_part).

Parts are planned against the overall budget: a part starts only when its whole budget fits in the time
left (less MARGIN_S for the report); one that does not is "skipped", never started to be cut ("timed out"
is a part that ran past its own budget)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from processes.groups import stop_group

REPO = Path(__file__).resolve().parents[2]
# no step starts with less than this left before the overall deadline (it is recorded as not run)
MIN_STEP_S = 15
# kept from the overall budget for what follows the parts (nvidia-smi, the report)
MARGIN_S = 10
TAIL_CHARS = 3000
STATUSES = ("passed", "failed", "timed out", "skipped")
BUDGET_SPENT = "not run: the overall --budget is spent"


@dataclass
class Step:
    """One command of a part: what to run, for how long at most, and extra environment."""

    name: str
    argv: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""  # what happens around the command (e.g. a signal), for --dry-run and the report
    setup_s: float = 0.0  # what the part does before the command (e.g. writing its images), in its budget

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
    models: list[str]  # keys of gpucheck.benchmarks.MODELS
    batch_size: int
    loader_workers: list[int]
    deadline: float  # time.monotonic() by which every step must have ended
    results: dict[str, PartResult] = field(default_factory=dict)  # parts done so far, by name

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


# (status, one-line summary, part-specific data, the results of the steps that ran)
Outcome = tuple[str, str, dict, list[StepResult]]


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    plan: Callable[[Context], list[Step]]
    run: Callable[[Context, list[Step]], Outcome]


def read_text(*paths: Path | str) -> str:
    """The files' texts one after another; a missing or unreadable file adds nothing."""
    text = ""
    for path in paths:
        try:
            text += Path(path).read_text(errors="replace")
        except OSError:
            pass
    return text


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
    """Wait for `proc` at most `timeout_s` more seconds (then stop its group) and record the result."""
    timed_out = False
    try:
        proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_group(proc, grace_s=10, reap_s=30)
    return StepResult(
        step.name,
        step.command,
        proc.returncode,
        time.monotonic() - started,
        timed_out,
        str(out_path),
        str(err_path),
        read_text(err_path, out_path)[-TAIL_CHARS:],
    )


def not_run(step: Step) -> StepResult:
    return StepResult(step.name, step.command, None, 0.0, tail=BUDGET_SPENT)


def run_step(step: Step, ctx: Context) -> StepResult:
    """Run one step to completion or until min(its budget, the time left) is spent."""
    if ctx.left_s() < MIN_STEP_S:
        return not_run(step)
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


def part_budget(steps: Sequence[Step]) -> float:
    return sum(s.setup_s + s.budget_s for s in steps)


def fits(budget: float, left_s: float) -> bool:
    return budget <= left_s - MARGIN_S


def plan_within_budget(
    parts: Sequence[Part], ctx: Context, left_s: float
) -> list[tuple[Part, list[Step], float, bool]]:
    """(part, its steps, its budget, whether it fits) in order, each part that fits taking its budget from
    `left_s`: the plan that `run_part` follows when every part keeps to its budget."""
    left, plan = left_s, []
    for part in parts:
        steps = part.plan(ctx)
        budget = part_budget(steps)
        plan.append((part, steps, budget, fits(budget, left)))
        left -= budget if plan[-1][3] else 0
    return plan


def run_part(part: Part, ctx: Context) -> PartResult:
    """Run one part if its budget fits in the time left (else it is "skipped"); anything it raises is
    recorded as its failure, never the end of the check."""
    steps = part.plan(ctx)
    budget = part_budget(steps)
    if not fits(budget, left := ctx.left_s()):
        why = f"not run: needs {budget:.0f} s, {max(left - MARGIN_S, 0):.0f} s of the --budget left"
        return PartResult(part.name, part.title, "skipped", 0.0, budget, why, [not_run(s) for s in steps])
    started = time.monotonic()
    try:
        status, summary, data, results = part.run(ctx, steps)
    except Exception as e:  # a bug or a broken environment in one part must not lose the others' results
        status, summary, data, results = "failed", f"{type(e).__name__}: {e}", {}, []
    return PartResult(
        part.name, part.title, status, time.monotonic() - started, budget, summary, results, data
    )
