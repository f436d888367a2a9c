"""Kill a training run at random instants, many times in a row on one output folder, and check that it
ends exactly where an uninterrupted run ends.

Each attempt re-runs the same `python -m swin_train.cli.train` command (which resumes from the newest
checkpoint in --output by itself) and is killed at an instant of one phase:

    anytime     a random time from the start to a few steps into training (starting up, loading, cleaning up)
    step        during an optimizer step, a random fraction of a step after one of the next few steps
    validation  after the epoch's last step (and its step checkpoint), before the epoch's metrics record
    checkpoint  the moment this attempt's temp file `.NAME.tmp-HOST-PID-...` of a save appears in --output
                (saves of any file, or of those named in --checkpoint-files)
    metrics     the moment a new record appears in metrics.jsonl (before last.pth / best.pth are saved)

Kills are SIGKILL; with --sigterm-share some step kills are SIGTERM instead, which must write a checkpoint
and exit 143. Phases are drawn in shuffled rounds so that every phase comes up. After the last kill the
command runs to its end, and the output folder is compared with an uninterrupted run of the same command
(run alongside): last.pth and best.pth (model, optimizer and all other state) and the kept step
checkpoints bitwise, metrics.jsonl equal except wall-clock fields, and no temp files left behind. Only
`output` and `data.num_workers` may differ in the stored configs: attempts cycle through --workers.

    python scripts/fault_campaign.py --kills 30 --epochs 12 --seed 0

`--launcher exec` (default) starts each attempt as that command. `--launcher fork` forks this process,
which has imported swin_train once, and calls the same CLI entry point in the child: the same code and
files without an interpreter start and imports per attempt (no kill then lands in the imports, which
write nothing); the tests use it to stay fast.

Exit status 0 when every check passes, 1 otherwise (the folders are then kept for inspection). The core is
`run_campaign(...) -> CampaignResult`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swin_train.metrics import TIMING_KEYS

PHASES = ("anytime", "step", "validation", "checkpoint", "metrics")
WALL_CLOCK_FIELDS = frozenset(TIMING_KEYS)
# Stored config entries that differ legitimately between the campaign and the reference run.
CONFIG_KEYS_THAT_MAY_DIFFER = (("output",), ("data", "num_workers"))

# A micro Swin on 32 px shapes with the official augmentation (RandAugment, random erasing, Mixup/CutMix,
# label smoothing), stochastic depth and EMA, so that every random stream and every piece of state that a
# resume must restore is exercised. One line per step (print_freq=1): the campaign follows progress there.
RECIPE = [
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depths=[2,2]",
    "model.num_heads=[2,4]",
    "model.window_size=4",
    "model.num_classes=8",
    "model.drop_path_rate=0.1",
    "data.img_size=32",
    "data.dataset=imagefolder",
    "data.batch_size=16",
    "eval.crop_pct=1.0",
    "amp=none",
    "train.base_lr=2e-3",
    "train.warmup_lr=1e-5",
    "train.min_lr=1e-5",
    "train.lr_base_batch=32",
    "train.ema=true",
    "train.ema_decay=0.9",
    "print_freq=1",
]
SHAPES_PER_CLASS = {"train_per_class": 16, "val_per_class": 4}  # 8 steps per epoch at batch 16

# What the trainer logs (swin_train.trainer, swin_train.run) and how its saves name temp files.
STEP_LINE = re.compile(r"epoch (\d+) step (\d+)/(\d+): ")
RESUME_LINE = re.compile(r"resuming from .*: epoch (\d+), step (\d+) of (\d+) \(global step (\d+)\)")
STEPS_PER_EPOCH_LINE = re.compile(r"; (\d+) steps per epoch;")
READY_LINE = "effective lr: "  # logged right before metrics are opened and training starts
STOP_LINE = "stop requested (SIGTERM)"
DONE_LINE = "done: top-1"
TEMP_NAME = re.compile(r"^\..+\.tmp-")

POLL_S = 0.002
CHECKPOINT_POLL_S = 0.0005  # a save's temp file lives for the write and fsync of one checkpoint
STEP_KILL_MAX_STEPS_AHEAD = 4  # a step kill lands within the next few steps, so many kills fit in one run
ATTEMPT_TIMEOUT_S = 900.0
DEFAULT_ESTIMATES = {"startup": 10.0, "step": 0.1, "validation": 0.05, "validation_after_resume": 1.0}


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


# ------------------------------------------------------------------------------------------ comparing


def tree_differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoint trees (dicts, lists, tensors, plain values) differ; tensors bitwise (dtype,
    shape and bytes, so NaNs and -0.0 count), floats exactly (NaN equals NaN)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path or '/'}: keys {sorted(map(str, a.keys() ^ b.keys()))} in only one of them"]
        return [d for key in a for d in tree_differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_differences(x, y, f"{path}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
        if not torch.equal(_as_bytes(a), _as_bytes(b)):
            return [f"{path}: tensors differ"]
        return []
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if type(a) is not type(b) or a != b:
        return [f"{path}: {a!r} != {b!r}"]
    return []


def _as_bytes(t):
    import torch

    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def without_keys(config: dict, keys=CONFIG_KEYS_THAT_MAY_DIFFER) -> dict:
    """A copy of a stored config without the entries that may differ (nested key paths)."""
    config = json.loads(json.dumps(config))
    for key_path in keys:
        holder = config
        for key in key_path[:-1]:
            holder = holder.get(key, {})
        holder.pop(key_path[-1], None)
    return config


def checkpoint_differences(reference: dict, run: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """Differences between two training checkpoints, over `keys` (default: all but the config) and the
    config without CONFIG_KEYS_THAT_MAY_DIFFER when `keys` is None."""
    if keys is None:
        if reference.keys() != run.keys():
            return [f"keys {sorted(reference.keys() ^ run.keys())} in only one of them"]
        diffs = tree_differences(without_keys(reference["config"]), without_keys(run["config"]), "/config")
        keys = tuple(k for k in reference if k != "config")
        return diffs + [d for k in keys for d in tree_differences(reference[k], run[k], f"/{k}")]
    return [d for k in keys for d in tree_differences(reference.get(k), run.get(k), f"/{k}")]


def metrics_differences(reference_text: str, run_text: str) -> list[str]:
    """Differences between two metrics.jsonl texts, ignoring WALL_CLOCK_FIELDS."""

    def records(text: str) -> list[dict]:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS} for row in rows]

    ref, run = records(reference_text), records(run_text)
    if [r.get("epoch") for r in ref] != [r.get("epoch") for r in run]:
        return [f"epochs {[r.get('epoch') for r in run]} != {[r.get('epoch') for r in ref]} (reference)"]
    return [d for i, (a, b) in enumerate(zip(ref, run)) for d in tree_differences(a, b, f"line {i + 1}")]


def compare_outputs(reference: Path, run: Path) -> list[Check]:
    """The checks of a campaign's output folder against the reference run's."""
    import torch

    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    def check(name: str, diffs: list[str]) -> Check:
        detail = "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
        return Check(name, not diffs, detail)

    def missing(name: str) -> list[str]:
        return [f"{name} missing in {folder}" for folder in (run, reference) if not (folder / name).exists()]

    def read(path: Path) -> str:
        return path.read_text()

    folders = (reference, run)

    checks = []
    if not (absent := missing("last.pth")):
        ref_last, run_last = load(reference / "last.pth"), load(run / "last.pth")
    for name, keys in (
        ("last.pth model", ("model",)),
        ("last.pth optimizer", ("optimizer",)),
        ("last.pth everything else", None),
    ):
        checks.append(check(name, absent or checkpoint_differences(ref_last, run_last, keys)))
    absent = missing("best.pth")
    checks.append(
        check("best.pth", absent or checkpoint_differences(*(load(d / "best.pth") for d in folders)))
    )
    ref_steps = sorted(p.name for p in reference.glob("step-*.pth"))
    run_steps = sorted(p.name for p in run.glob("step-*.pth"))
    step_diffs = [] if ref_steps == run_steps else [f"files {run_steps} != {ref_steps} (reference)"]
    for name in ref_steps if not step_diffs else []:
        step_diffs += [f"{name}{d}" for d in checkpoint_differences(load(reference / name), load(run / name))]
    checks.append(check("step checkpoints", step_diffs))
    absent = missing("metrics.jsonl")
    checks.append(
        check("metrics.jsonl", absent or metrics_differences(*(read(d / "metrics.jsonl") for d in folders)))
    )
    leftovers = sorted(p.name for p in run.iterdir() if TEMP_NAME.match(p.name))
    checks.append(check("no temp files left", [f"left behind: {', '.join(leftovers)}"] if leftovers else []))
    return checks


# -------------------------------------------------------------------------------------------- watching


class Watch:
    """What one attempt has done so far, from its log and its output folder (polled)."""

    def __init__(self, log_path: Path, out: Path):
        self.log_path, self.out = log_path, out
        self.proc = None  # a subprocess.Popen or a ForkedRun
        self.started = math.inf
        self._offset, self._partial = 0, ""
        self.lines: list[str] = []
        self.step_times: list[float] = []
        self.global_steps: list[int] = []
        self.steps_per_epoch: int | None = None
        self.resumed_at = (0, 0)  # (global step, step in epoch)
        self.ready_at: float | None = None
        self.epoch_end_at: float | None = None  # the first epoch-end step of this attempt
        self.epoch_end_step: int | None = None
        self.step_file_done_at: float | None = None  # that step's checkpoint renamed into place
        self.temp_files: dict[str, float] = {}  # this attempt's temp files, first seen at
        self.new_metrics_at: float | None = None
        self._metrics_lines_before = set(self._metrics_lines())  # before the attempt starts
        self._metrics_stat = None

    def begin(self, proc) -> None:
        self.proc, self.started = proc, time.monotonic()

    def _metrics_lines(self) -> list[str]:
        try:
            text = (self.out / "metrics.jsonl").read_text()
        except OSError:
            return []
        return text.split("\n")[:-1]  # complete lines only

    def update(self) -> None:
        now = time.monotonic()
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data.decode(errors="replace")).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._parse(line, now)
        if self.out.is_dir():
            with os.scandir(self.out) as entries:
                for entry in entries:
                    if TEMP_NAME.match(entry.name) and f"-{self.proc.pid}-" in entry.name:
                        self.temp_files.setdefault(entry.name, now)
        if self.epoch_end_step is not None and self.step_file_done_at is None:
            if (self.out / f"step-{self.epoch_end_step:09d}.pth").exists():
                self.step_file_done_at = now
        if self.new_metrics_at is None:
            with contextlib.suppress(OSError):
                st = os.stat(self.out / "metrics.jsonl")
                if (st.st_size, st.st_mtime_ns) != self._metrics_stat:
                    self._metrics_stat = (st.st_size, st.st_mtime_ns)
                    if set(self._metrics_lines()) - self._metrics_lines_before:
                        self.new_metrics_at = now

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def _parse(self, line: str, now: float) -> None:
        self.lines.append(line)
        if m := STEP_LINE.search(line):
            epoch, step, per_epoch = map(int, m.groups())
            self.step_times.append(now)
            self.global_steps.append(epoch * per_epoch + step)
            if step == per_epoch and self.epoch_end_at is None:
                self.epoch_end_at, self.epoch_end_step = now, epoch * per_epoch + step
        elif m := RESUME_LINE.search(line):
            self.resumed_at = (int(m.group(4)), int(m.group(2)))
        elif m := STEPS_PER_EPOCH_LINE.search(line):
            self.steps_per_epoch = int(m.group(1))
        elif READY_LINE in line and self.ready_at is None:
            self.ready_at = now

    def resumed_at_epoch_end(self) -> bool:
        return self.steps_per_epoch is not None and self.resumed_at[1] == self.steps_per_epoch

    def step_interval(self, default: float) -> float:
        gaps = [b - a for a, b in zip(self.step_times, self.step_times[1:])]
        return statistics.median(gaps) if gaps else default

    def finish(self) -> None:
        self.update()
        if self._partial:
            self._parse(self._partial, time.monotonic())
            self._partial = ""


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


# -------------------------------------------------------------------------------------------- running


def train_command(data_path: Path, out: Path, *, epochs: int, every: int, workers: int) -> list[str]:
    warmup_epochs = min(1, epochs - 1)  # the schedule needs warmup < total
    return [
        sys.executable,
        "-m",
        "swin_train.cli.train",
        "--device",
        "cpu",
        "--data-path",
        str(data_path),
        "--output",
        str(out),
        *RECIPE,
        f"train.epochs={epochs}",
        f"train.warmup_epochs={warmup_epochs}",
        f"train.checkpoint_every_steps={every}",
        f"data.num_workers={workers}",
    ]


def start(cmd: list[str], log_path: Path, launcher: str):
    """Start `cmd` (a `python -m swin_train.cli.train ...` command) with its output in `log_path`, in a
    session of its own so that `stop_group` also reaches its data workers."""
    if launcher == "fork":
        return ForkedRun(cmd[3:], log_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class ForkedRun:
    """`swin_train.cli.train.cli(argv)` in a forked child of this process, with Popen's poll/wait/
    send_signal/returncode (a signal's death is -signum, as with Popen)."""

    def __init__(self, argv: list[str], log_path: Path):
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = 1
            try:
                os.setsid()
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(
                    1, "w", buffering=1, closefd=False
                )  # line-buffered: the campaign reads along
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                import torch

                torch.set_num_threads(1)
                from swin_train.cli.train import cli

                code = cli(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"fork {self.pid}", timeout)
            time.sleep(POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


def preload_for_fork() -> None:
    """Import what a run imports, once, so that forked attempts start at once."""
    import importlib

    for name in ("swin_train.cli.train", "swin_train.trainer", "torch.utils.tensorboard"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def stop_group(proc) -> None:
    """Kill what is left of an attempt (orphaned data workers) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def ensure_data(root: Path) -> Path:
    from swin_train.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(root, img_size=32, seed=0, **SHAPES_PER_CLASS)


def phase_schedule(kills: int, phases: tuple[str, ...], rng: random.Random) -> list[str]:
    """`kills` phases in shuffled rounds of all `phases`, so any `len(phases)` kills in a row cover them."""
    schedule: list[str] = []
    while len(schedule) < kills:
        round_ = list(phases)
        rng.shuffle(round_)
        schedule += round_
    return schedule[:kills]


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
    echo = echo or (lambda text: None)
    began = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    data_path = Path(data_path) if data_path else ensure_data(root / "data")
    out, reference_out = root / "run", root / "reference"
    rng = random.Random(seed)

    def command(output: Path, attempt: int) -> list[str]:
        workers_now = workers[attempt % len(workers)]
        return train_command(data_path, output, epochs=epochs, every=checkpoint_every, workers=workers_now)

    reference = start(command(reference_out, 0), root / "reference.log", launcher)
    estimates, samples = dict(DEFAULT_ESTIMATES), {}
    done_kills: list[Kill] = []
    checks: list[Check] = []
    notes: list[str] = []
    steps_logged: list[int] = []
    steps_per_epoch = attempts = 0
    try:
        for phase in [*phase_schedule(kills, phases, rng), None]:  # None: the final, uninterrupted attempt
            plan = plan_kill(phase, rng, sigterm_share, checkpoint_files)
            log_path = root / f"attempt-{attempts:03d}.log"
            w, sent_at = run_attempt(
                command(out, attempts),
                log_path,
                out,
                plan,
                launcher=launcher,
                epochs=epochs,
                every=checkpoint_every,
                estimates=estimates,
            )
            attempts += 1
            steps_logged += w.global_steps
            steps_per_epoch = w.steps_per_epoch or steps_per_epoch
            update_estimates(estimates, samples, w, checkpoint_every)
            code, tail, name = w.proc.returncode, w.text[-600:], log_path.name
            if code == 0:  # also without a "done" line: it resumed a run whose training had ended
                echo(f"{name}: finished (resumed at step {w.resumed_at[0]})")
                if plan is not None:
                    notes.append(f"the run finished after {len(done_kills)} of {kills} kills; raise --epochs")
                break
            if sent_at is None:
                reason = "timed out" if code == -signal.SIGKILL else f"exited with status {code}"
                checks.append(Check(name, False, f"{reason}: {tail!r}"))
                break
            if plan.signal == signal.SIGTERM and not (code == 143 and STOP_LINE in w.text):
                detail = f"SIGTERM: exit status {code}, expected 143 after a checkpoint: {tail!r}"
                checks.append(Check(name, False, detail))
                break
            resumed_at = w.resumed_at[0] if w.steps_per_epoch is not None else None
            kill = Kill(
                attempts - 1,
                phase,
                signal.Signals(plan.signal).name,
                round(sent_at - w.started, 3),
                code,
                landed_in_phase(phase, w),
                resumed_at,
            )
            done_kills.append(kill)
            echo(
                f"{name}: {kill.signal} in {phase}{'' if kill.confirmed else ' (landed outside it)'} after "
                f"{kill.seconds_after_start:.2f}s, "
                + (
                    "before resuming"
                    if resumed_at is None
                    else f"resumed at step {resumed_at}, {len(w.global_steps)} steps trained"
                )
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            reference.wait(timeout=ATTEMPT_TIMEOUT_S)
    finally:
        stop_group(reference)
    reference_log = (root / "reference.log").read_text(errors="replace")
    if reference.returncode != 0 or DONE_LINE not in reference_log:
        tail = reference_log[-600:]
        checks.append(Check("reference run", False, f"exit status {reference.returncode}: {tail!r}"))
    if not checks:
        checks += compare_outputs(reference_out, out)
        never = sorted(set(range(1, epochs * steps_per_epoch + 1)) - set(steps_logged))
        checks.append(Check("every step trained", not never, f"never logged: {never[:10]}" if never else ""))
    return CampaignResult(
        kills_requested=kills,
        kills=done_kills,
        attempts=attempts,
        total_steps=epochs * steps_per_epoch,
        steps_trained=len(steps_logged),
        steps_redone=len(steps_logged) - len(set(steps_logged)),
        seconds=round(time.monotonic() - began, 1),
        checks=checks,
        command=command(out, 0),
        root=str(root),
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------ CLI


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills before the run may finish (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phases and instants")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1],
        help="data.num_workers, cycled over the attempts (default: 0 1)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="train.epochs (8 steps each; default 3)")
    parser.add_argument("--checkpoint-every", type=int, default=2, help="train.checkpoint_every_steps")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="kill phases")
    parser.add_argument(
        "--sigterm-share",
        type=float,
        default=0.2,
        help="share of step kills sent as SIGTERM (must checkpoint, exit 143)",
    )
    parser.add_argument(
        "--checkpoint-files",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="checkpoint kills only during saves of these names, e.g. best.pth step- (default: all)",
    )
    parser.add_argument(
        "--launcher",
        choices=["exec", "fork"],
        default="exec",
        help="exec: each attempt is the command; fork: a forked child of this process (faster)",
    )
    parser.add_argument(
        "--data-path", type=Path, help="an ImageFolder root (default: a generated shapes set)"
    )
    parser.add_argument("--root", type=Path, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (always kept on FAIL)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.kills < 0 or args.epochs < 1 or args.checkpoint_every < 1 or min(args.workers) < 0:
        parser.error("--kills >= 0, --epochs >= 1, --checkpoint-every >= 1 and --workers >= 0 are needed")
    if not 0 <= args.sigterm_share <= 1:
        parser.error("--sigterm-share is a share in [0, 1]")
    root = args.root or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    echo = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.json else None
    result = run_campaign(
        root,
        kills=args.kills,
        seed=args.seed,
        workers=tuple(args.workers),
        epochs=args.epochs,
        checkpoint_every=args.checkpoint_every,
        phases=tuple(args.phases),
        sigterm_share=args.sigterm_share,
        checkpoint_files=tuple(args.checkpoint_files),
        launcher=args.launcher,
        data_path=args.data_path,
        echo=echo,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else summary(result))
    if args.keep or not result.passed:
        print(f"work folder kept: {root}", file=sys.stderr)
    elif args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
