"""Following one attempt as it runs: its log lines (steps, resume point, readiness) and its output folder
(its temp files, the epoch-end step checkpoint, a new metrics record), each with the moment it was seen."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path

from faults.trainer import READY_LINE, RESUME_LINE, STEP_LINE, STEPS_PER_EPOCH_LINE, TEMP_NAME


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
            done = (epoch - 1) * per_epoch + step  # the log counts epochs from 1
            self.global_steps.append(done)
            if step == per_epoch and self.epoch_end_at is None:
                self.epoch_end_at, self.epoch_end_step = now, done
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
