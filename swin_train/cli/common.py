"""What every command shares: `--debug`, logging set-up, and turning user errors into one line + exit 2."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from swin_train.errors import SwinTrainError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 (argparse already exits 2; keep its message short)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (so redirections after set-up are honoured)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("swin_train")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def one_line(error: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives wrapped in a message
    with the worker's traceback; its last line is the original `module.ErrorClass: message`."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    last = lines[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(error).__name__}: ")


def run_cli(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    """Run `main(argv)`; a SwinTrainError becomes `prog: error: message` on stderr and its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return int(main(argv) or 0)
    except SwinTrainError as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output left (`swin-predict ... | head`): stop as a pipe writer does, quietly; what
        # is still buffered goes to /dev/null so that the flush on the way out cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a writer ended by a closed pipe


def exit_process(code: int) -> NoReturn:
    """End a console command with `code` once its output is out: atexit handlers run (logging, multiprocessing
    children) and stdout/stderr are flushed, then the process exits without tearing down the interpreter.
    Why: freeing the thousands of modules torch, torchvision and timm load took 1-2 s after every command,
    while every file a command writes is closed (checkpoints fsynced) before it returns."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    os._exit(code)
