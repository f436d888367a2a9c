"""Stopping a process that was started in a session of its own (`start_new_session=True`, or `setsid` in a
forked child) together with everything it started: its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid`; nothing when the group has gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_group(proc, grace_s: float = 0.0, reap_s: float | None = None) -> None:
    """Stop `proc` (a subprocess.Popen, or anything with its pid and wait) and its group, and reap it:
    SIGTERM first when `grace_s` > 0 and SIGKILL for what is left after it, else SIGKILL at once; then
    wait at most `reap_s` seconds (None: until it has gone)."""
    steps = ([(signal.SIGTERM, grace_s)] if grace_s > 0 else []) + [(signal.SIGKILL, reap_s)]
    for sig, wait_s in steps:
        signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
