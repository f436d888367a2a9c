"""Measuring one trainer subprocess: wall time, CPU time of it and its reaped data workers (os.wait4), the
peak summed PSS of its process tree (sampled from /proc) and the largest single-process RSS; a run past its
timeout is killed with its whole group."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from processes.groups import signal_group
from processes.proc import descendants, pss_kib


@dataclass
class Measurement:
    """What one trainer subprocess cost."""

    exit_code: int
    wall_s: float
    cpu_s: float  # user + system of the process and its reaped children (data workers)
    peak_tree_pss_mib: float | None  # largest sampled sum of PSS over the process tree; None: not sampled
    peak_rss_mib: float  # largest RSS of any single process in the tree (kernel's maxrss)
    timed_out: bool = False


class TreeMemorySampler(threading.Thread):
    """Samples the summed PSS of a process tree every `interval` seconds and keeps the peak (KiB).

    Reading PSS walks the page tables of every process in the tree, CPU time taken from the machine the
    trainer runs on, so the interval is long: the trainers' memory plateaus early and stays."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, sum(pss_kib(p) for p in descendants(self.pid)))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict,
    cwd: Path,
    log_path: Path,
    timeout: float | None = None,
    memory_interval: float = 5.0,
) -> Measurement:
    """Run `cmd` to completion (output to `log_path`) and measure it; a run past `timeout` is killed.
    `memory_interval`: seconds between samples of the tree's PSS (0: not sampled)."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        sampler = TreeMemorySampler(proc.pid, memory_interval) if memory_interval > 0 else None
        if sampler:
            sampler.start()
        expired = threading.Event()

        def kill_group() -> None:
            expired.set()
            signal_group(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill_group) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's rusage includes its reaped workers
        finally:
            if timer:
                timer.cancel()
            if sampler:
                sampler.stop()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return Measurement(
        exit_code=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_tree_pss_mib=sampler.peak_kib / 1024 if sampler else None,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        timed_out=expired.is_set(),
    )
