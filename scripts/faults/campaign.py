"""The campaign: the reference run alongside, attempts on one output folder each killed at an instant of
its planned phase (the last one left to finish), each attempt's end judged as it happens, and the folder
checked against the reference at the end."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from processes.groups import stop_group

from faults.compare import compare_outputs
from faults.launch import POLL_S, preload_for_fork, start
from faults.plan import (
    DEFAULT_ESTIMATES,
    PHASES,
    Plan,
    landed_in_phase,
    phase_schedule,
    plan_kill,
    update_estimates,
)
from faults.results import CampaignResult, Check, Kill
from faults.trainer import DONE_LINE, STOP_LINE, ensure_data, train_command
from faults.watch import Watch

CHECKPOINT_POLL_S = 0.0005  # a save's temp file lives for the write and fsync of one checkpoint
ATTEMPT_TIMEOUT_S = 900.0


def run_attempt(
    cmd: list[str],
    log_path: Path,
    out: Path,
    plan: Plan | None,
    *,
    launcher: str,
    epochs: int,
    every: int,
    estimates: dict,
) -> tuple[Watch, float | None]:
    """Run `cmd` until `plan` says when to send its signal (or to its end when `plan` is None); returns
    what was watched and when the signal went (None: never). The process has exited on return."""
    w = Watch(log_path, out)
    proc = start(cmd, log_path, launcher)
    w.begin(proc)
    sent_at = None
    poll_s = CHECKPOINT_POLL_S if plan is not None and plan.phase == "checkpoint" else POLL_S
    try:
        while proc.poll() is None and time.monotonic() - w.started < ATTEMPT_TIMEOUT_S:
            w.update()
            at = plan.trigger_time(w, epochs, every, estimates) if plan is not None else None
            if at is not None and time.monotonic() >= at:
                proc.send_signal(plan.signal)
                sent_at = time.monotonic()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=ATTEMPT_TIMEOUT_S)  # SIGTERM: it writes a checkpoint first
                break
            time.sleep(poll_s)
    finally:
        stop_group(proc)  # its orphaned data workers; the process itself on a timeout
    w.finish()
    return w, sent_at


@dataclass
class Campaign:
    """The attempts on one output folder so far: what they did, what the campaign learnt of the phases'
    durations on this machine, and what went wrong."""

    root: Path
    command: Callable[[Path, int], list[str]]  # (output folder, attempt) -> the training command
    launcher: str
    epochs: int
    every: int  # train.checkpoint_every_steps
    kills_requested: int
    echo: Callable[[str], None]
    estimates: dict = field(default_factory=lambda: dict(DEFAULT_ESTIMATES))
    samples: dict = field(default_factory=dict)  # every duration measured, by name
    kills: list[Kill] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)  # failed attempts, then the final checks
    notes: list[str] = field(default_factory=list)
    steps_logged: list[int] = field(default_factory=list)  # global steps, over all attempts
    steps_per_epoch: int = 0
    attempts: int = 0

    @property
    def out(self) -> Path:
        return self.root / "run"

    def attempt(self, plan: Plan | None) -> bool:
        """Run the next attempt, killed as `plan` says (None: left to finish), and judge its end; False when
        the campaign ends here."""
        log_path = self.root / f"attempt-{self.attempts:03d}.log"
        w, sent_at = run_attempt(
            self.command(self.out, self.attempts),
            log_path,
            self.out,
            plan,
            launcher=self.launcher,
            epochs=self.epochs,
            every=self.every,
            estimates=self.estimates,
        )
        self.attempts += 1
        self.steps_logged += w.global_steps
        self.steps_per_epoch = w.steps_per_epoch or self.steps_per_epoch
        update_estimates(self.estimates, self.samples, w, self.every)
        return self.judge(plan, w, sent_at, log_path.name)

    def judge(self, plan: Plan | None, w: Watch, sent_at: float | None, name: str) -> bool:
        """Record how an attempt ended: finished, failed on its own, or killed (a Kill); False when the
        campaign ends here."""
        code, tail = w.proc.returncode, w.text[-600:]
        if code == 0:  # also without a "done" line: it resumed a run whose training had ended
            self.echo(f"{name}: finished (resumed at step {w.resumed_at[0]})")
            if plan is not None:
                self.notes.append(
                    f"the run finished after {len(self.kills)} of {self.kills_requested} kills; raise --epochs"
                )
            return False
        if sent_at is None:
            reason = "timed out" if code == -signal.SIGKILL else f"exited with status {code}"
            self.checks.append(Check(name, False, f"{reason}: {tail!r}"))
            return False
        if plan.signal == signal.SIGTERM and not (code == 143 and STOP_LINE in w.text):
            detail = f"SIGTERM: exit status {code}, expected 143 after a checkpoint: {tail!r}"
            self.checks.append(Check(name, False, detail))
            return False
        resumed_at = w.resumed_at[0] if w.steps_per_epoch is not None else None
        kill = Kill(
            self.attempts - 1,
            plan.phase,
            signal.Signals(plan.signal).name,
            round(sent_at - w.started, 3),
            code,
            landed_in_phase(plan.phase, w),
            resumed_at,
        )
        self.kills.append(kill)
        self.echo(
            f"{name}: {kill.signal} in {plan.phase}{'' if kill.confirmed else ' (landed outside it)'} after "
            f"{kill.seconds_after_start:.2f}s, "
            + (
                "before resuming"
                if resumed_at is None
                else f"resumed at step {resumed_at}, {len(w.global_steps)} steps trained"
            )
        )
        return True

    def final_checks(self, reference: subprocess.Popen, reference_out: Path) -> None:
        """The reference run's end; then, when nothing failed so far, the folder against the reference's and
        every step trained at least once."""
        reference_log = (self.root / "reference.log").read_text(errors="replace")
        if reference.returncode != 0 or DONE_LINE not in reference_log:
            tail = reference_log[-600:]
            self.checks.append(Check("reference run", False, f"exit status {reference.returncode}: {tail!r}"))
        if not self.checks:
            self.checks += compare_outputs(reference_out, self.out)
            total = self.epochs * self.steps_per_epoch
            never = sorted(set(range(1, total + 1)) - set(self.steps_logged))
            self.checks.append(
                Check("every step trained", not never, f"never logged: {never[:10]}" if never else "")
            )

    def result(self, seconds: float) -> CampaignResult:
        return CampaignResult(
            kills_requested=self.kills_requested,
            kills=self.kills,
            attempts=self.attempts,
            total_steps=self.epochs * self.steps_per_epoch,
            steps_trained=len(self.steps_logged),
            steps_redone=len(self.steps_logged) - len(set(self.steps_logged)),
            seconds=round(seconds, 1),
            checks=self.checks,
            command=self.command(self.out, 0),
            root=str(self.root),
            notes=self.notes,
        )


def run_campaign(
    root: Path,
    *,
    kills: int = 10,
    seed: int = 0,
    workers: tuple[int, ...] = (0, 1),
    epochs: int = 3,
    checkpoint_every: int = 2,
    phases: tuple[str, ...] = PHASES,
    sigterm_share: float = 0.0,
    checkpoint_files: tuple[str, ...] = (),
    launcher: str = "exec",
    data_path: Path | None = None,
    echo=None,
) -> CampaignResult:
    """Run the campaign in `root` (created; holds data/, reference/, run/ and one log per attempt)."""
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        raise ValueError(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    if launcher not in ("exec", "fork"):
        raise ValueError(f"launcher is 'exec' or 'fork', not {launcher!r}")
    if launcher == "fork":
        preload_for_fork()
    began = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    data_path = Path(data_path) if data_path else ensure_data(root / "data")
    rng = random.Random(seed)

    def command(output: Path, attempt: int) -> list[str]:
        workers_now = workers[attempt % len(workers)]
        return train_command(data_path, output, epochs=epochs, every=checkpoint_every, workers=workers_now)

    campaign = Campaign(root, command, launcher, epochs, checkpoint_every, kills, echo or (lambda text: None))
    reference_out = root / "reference"
    reference = start(command(reference_out, 0), root / "reference.log", launcher)
    try:
        for phase in [*phase_schedule(kills, phases, rng), None]:  # None: the final, uninterrupted attempt
            if not campaign.attempt(plan_kill(phase, rng, sigterm_share, checkpoint_files)):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            reference.wait(timeout=ATTEMPT_TIMEOUT_S)
    finally:
        stop_group(reference)
    campaign.final_checks(reference, reference_out)
    return campaign.result(time.monotonic() - began)
