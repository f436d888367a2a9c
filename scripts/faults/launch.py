"""Starting an attempt, as the command (exec) or as a forked child of this process that calls the same CLI
entry point (fork: no interpreter start and imports per attempt), in a session of its own so that
stopping it also stops its data workers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

POLL_S = 0.002


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
