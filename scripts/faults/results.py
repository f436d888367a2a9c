"""What a campaign found: each kill (Kill), each named check (Check), the whole result (CampaignResult) and
its summary in text."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field

from faults.plan import PHASES


@dataclass
class Kill:
    attempt: int
    phase: str
    signal: str
    seconds_after_start: float
    exit_code: int
    # the kill landed in its phase as far as the folder shows: checkpoint: the save's temp file was left
    # behind; step: no temp file left; validation: neither a temp file nor a new metrics record; others: yes
    confirmed: bool
    resumed_at_step: int | None  # None: killed before it had loaded its checkpoint


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class CampaignResult:
    kills_requested: int
    kills: list[Kill]
    attempts: int
    total_steps: int
    steps_trained: int  # optimizer steps logged over all attempts
    steps_redone: int  # steps_trained minus distinct global steps: work lost to kills
    seconds: float
    checks: list[Check]
    command: list[str]
    root: str
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def kills_by_phase(self) -> dict[str, int]:
        return {phase: sum(k.phase == phase for k in self.kills) for phase in PHASES}

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "kills_by_phase": self.kills_by_phase()}


def summary(result: CampaignResult) -> str:
    by_signal = {name: sum(k.signal == name for k in result.kills) for name in ("SIGKILL", "SIGTERM")}
    minutes, seconds = divmod(round(result.seconds), 60)
    lines = [
        f"{len(result.kills)} of {result.kills_requested} kills survived "
        f"({by_signal['SIGKILL']} SIGKILL, {by_signal['SIGTERM']} SIGTERM) in {result.attempts} runs; "
        f"{result.total_steps} steps, {result.steps_trained} trained, {result.steps_redone} redone; "
        f"{minutes}m {seconds:02d}s",
        "kills by phase: "
        + ", ".join(
            f"{phase} {n} ({sum(k.confirmed for k in result.kills if k.phase == phase)} landed in it)"
            for phase, n in result.kills_by_phase().items()
            if n
        ),
    ]
    lines += [
        f"{'PASS' if c.passed else 'FAIL'} {c.name}{': ' + c.detail if c.detail else ''}"
        for c in result.checks
    ]
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"command: {shlex.join(result.command)}")
    return "\n".join(lines)
