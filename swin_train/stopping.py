"""Stop requests: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's time-limit warning, `--signal=USR1@120`)
become "checkpoint after this optimizer step, then exit"."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

# Exit status after a requested stop: 128 + signal number, the shell convention, so schedulers see "killed
# by a signal" and requeue; the checkpoint written on the way out resumes the run.
STOP_EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 138}


class TrainingStopped(Exception):
    """Raised after a requested stop has been checkpointed; carries the exit status."""

    def __init__(self, exit_code: int):
        super().__init__(f"stopped with status {exit_code}")
        self.exit_code = exit_code


@dataclass
class Stopper:
    """Records the first stop signal; the loop asks `requested` after every optimizer step.

    A second Ctrl-C aborts at once (KeyboardInterrupt): the steps since the last checkpoint are lost, which
    the first Ctrl-C's message says, so nobody presses it twice by accident."""

    steps_unsaved: Callable[[], int] = lambda: 0  # optimizer steps since the last checkpoint, for the message
    announce: bool = True  # print what happens on stderr (rank 0 only under torchrun)
    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def __enter__(self) -> Stopper:
        for sig in STOP_EXIT_CODES:
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
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        if self.signum is None and self.announce:
            again = ""
            if signum == signal.SIGINT:
                again = f"; press Ctrl-C again to abort (the last {self.steps_unsaved()} steps are lost)"
            print(
                f"swin-train: {signal.Signals(signum).name} received: stopping with a checkpoint after this "
                f"step or validation{again}",
                file=sys.stderr,
                flush=True,
            )
        self.signum = signum
