"""Stop requests: SIGTERM, SIGINT (Ctrl-C), SIGUSR1 (SLURM's time-limit warning, `--signal=USR1@120`) and
SIGHUP (a closed terminal; torchrun forwards it) become "checkpoint after this optimizer step, then exit".

Schedulers signal whole process trees (srun/scancel every process of the step, a terminal's Ctrl-C the
foreground process group, torchrun each rank's process group): the data workers leave these signals to the
main process (`data/loader.py`), which alone acts on them and says so, once per signal."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("swin_train")

# Exit status after a requested stop: 128 + signal number, the shell convention, so schedulers see "killed
# by a signal" and requeue; the checkpoint written on the way out resumes the run.
STOP_EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 138, signal.SIGHUP: 129}
STOP_SIGNALS = frozenset(STOP_EXIT_CODES)


class TrainingStopped(Exception):
    """Raised after a requested stop has been checkpointed; carries the exit status."""

    def __init__(self, exit_code: int):
        super().__init__(f"stopped with status {exit_code}")
        self.exit_code = exit_code


class StopAborted(KeyboardInterrupt):
    """A second Ctrl-C: leave at once without a checkpoint (the Stopper has said so; exit status 130)."""


@dataclass
class Stopper:
    """Records the first stop signal; the loop asks `requested` after every optimizer step.

    Every signal is one log line from the process that announces (rank 0; never a forked child): the first
    says a checkpoint follows, a later one that the stop is under way. A second Ctrl-C aborts at once
    (StopAborted): the steps since the last checkpoint are lost, which the first Ctrl-C's line says, so nobody
    presses it twice by accident. A SIGHUP ignored when the run started (`nohup`) stays ignored."""

    steps_unsaved: Callable[[], int] = lambda: 0  # optimizer steps since the last checkpoint
    global_step: Callable[[], int] = lambda: 0  # optimizer steps done, for the messages
    announce: bool = True  # log each signal (rank 0 only under torchrun and srun)
    signum: int | None = None
    previous: dict = field(default_factory=dict)
    pid: int = field(
        default_factory=os.getpid
    )  # a forked child that inherits the handler neither acts nor talks

    def __enter__(self) -> Stopper:
        self.pid = os.getpid()
        for sig in STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_code(self) -> int:
        return STOP_EXIT_CODES[self.signum or signal.SIGTERM]

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return
        name, step, unsaved = signal.Signals(signum).name, self.global_step(), self.steps_unsaved()
        if self.signum is None:
            self.signum = signum
            again = ""
            if signum == signal.SIGINT:
                again = f"; press Ctrl-C again to abort (the last {unsaved} steps are lost)"
            self._say(
                f"{name} received: stopping with a checkpoint after this step or validation "
                f"(global step {step}){again}"
            )
        elif signum == signal.SIGINT:
            self._say(
                f"{name} received again: aborting at global step {step} without a checkpoint; "
                f"the last {unsaved} steps are lost"
            )
            raise StopAborted
        else:
            self._say(f"{name} received: already stopping after {self.signal_name} (global step {step})")

    def _say(self, message: str) -> None:
        if self.announce:
            log.warning(message)
