"""When to kill: the phases, drawn in shuffled rounds; one kill's random draws (Plan) and the instant they
give once the phase is seen; the phases' durations learnt from the attempts; and whether a kill landed in
its phase as far as the folder shows."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass

from faults.watch import Watch

PHASES = ("anytime", "step", "validation", "checkpoint", "metrics")
STEP_KILL_MAX_STEPS_AHEAD = 4  # a step kill lands within the next few steps, so many kills fit in one run
DEFAULT_ESTIMATES = {"startup": 10.0, "step": 0.1, "validation": 0.05, "validation_after_resume": 1.0}


@dataclass
class Plan:
    """One kill's random draws, made up front so that a seed reproduces the plan (not the timing)."""

    phase: str
    signal: int
    fraction: float  # where in the phase's window the kill lands, in [0, 1)
    skip: int  # step kills: steps to wait (>= 1); checkpoint kills: saves to let finish first
    checkpoint_files: tuple[str, ...] = ()  # checkpoint kills: only saves of names starting so ('': all)

    def trigger_time(self, w: Watch, epochs: int, every: int, estimates: dict) -> float | None:
        """When to send the signal, once the phase's start has been seen; None until then."""
        if self.phase == "anytime":  # from the start to a few steps into training
            window = estimates["startup"] + STEP_KILL_MAX_STEPS_AHEAD * estimates["step"]
            return w.started + self.fraction * window
        if self.phase == "checkpoint":
            prefixes = tuple(f".{name}" for name in self.checkpoint_files or ("",))
            seen = sorted(t for name, t in w.temp_files.items() if name.startswith(prefixes))
            return seen[self.skip] if len(seen) > self.skip else None
        if self.phase == "metrics":
            return w.new_metrics_at
        if w.steps_per_epoch is None or w.ready_at is None:
            return None
        remaining = epochs * w.steps_per_epoch - w.resumed_at[0]
        if self.phase == "step" and remaining > 0:
            k = min(self.skip, remaining)
            if len(w.step_times) < k:
                return None
            return w.step_times[k - 1] + self.fraction * w.step_interval(estimates["step"])
        # validation (or a step kill with no step left to train)
        if w.resumed_at_epoch_end():
            return w.ready_at + self.fraction * estimates["validation_after_resume"]
        start = validation_start(w, every)
        return None if start is None else start + self.fraction * estimates["validation"]


def validation_start(w: Watch, every: int) -> float | None:
    """When this attempt's first validation began: after its first epoch-end step and that step's
    checkpoint (when one is due there)."""
    if w.epoch_end_at is None:
        return None
    if every and w.epoch_end_step % every == 0:
        return w.step_file_done_at
    return w.epoch_end_at


def update_estimates(estimates: dict, samples: dict, w: Watch, every: int) -> None:
    """Learn the phases' durations on this machine from an attempt (the smallest seen is used)."""

    def add(name: str, value: float | None) -> None:
        if value is not None and value > 0:
            samples.setdefault(name, []).append(value)
            estimates[name] = min(samples[name])

    if w.step_times:
        add("startup", w.step_times[0] - w.started)
        if len(w.step_times) > 1:
            add("step", w.step_interval(estimates["step"]))
    if w.new_metrics_at is not None:
        if w.resumed_at_epoch_end() and w.ready_at is not None:
            add("validation_after_resume", w.new_metrics_at - w.ready_at)
        elif (start := validation_start(w, every)) is not None and start < w.new_metrics_at:
            add("validation", w.new_metrics_at - start)


def phase_schedule(kills: int, phases: tuple[str, ...], rng: random.Random) -> list[str]:
    """`kills` phases in shuffled rounds of all `phases`, so any `len(phases)` kills in a row cover them."""
    schedule: list[str] = []
    while len(schedule) < kills:
        round_ = list(phases)
        rng.shuffle(round_)
        schedule += round_
    return schedule[:kills]


def plan_kill(phase: str | None, rng: random.Random, sigterm_share: float, checkpoint_files) -> Plan | None:
    if phase is None:
        return None
    sig = signal.SIGTERM if phase == "step" and rng.random() < sigterm_share else signal.SIGKILL
    skip = rng.randint(1, STEP_KILL_MAX_STEPS_AHEAD)
    if phase == "checkpoint":  # the first or second save of the attempt; the first one of the files asked for
        skip = 0 if checkpoint_files else rng.randint(0, 1)
    return Plan(phase, sig, rng.random(), skip, tuple(checkpoint_files))


def landed_in_phase(phase: str, w: Watch) -> bool:
    """Whether the folder shows that a kill landed in `phase` (see Kill.confirmed)."""
    temp_left = any((w.out / name).exists() for name in w.temp_files)
    if phase == "checkpoint":
        return temp_left
    if phase == "step":
        return not temp_left
    if phase == "validation":
        return not temp_left and w.new_metrics_at is None
    return True
