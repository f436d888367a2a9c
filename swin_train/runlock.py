"""One writer per output folder: a run holds a kernel lock on `OUT/.swin-train.lock` for its lifetime.

Two runs writing one folder would interleave log.txt, duplicate metrics.jsonl records and overwrite each
other's checkpoints. The second run therefore stops at once with a TrainingError naming the first one
(pid and host, read from the lock file). The lock is the kernel's, not the file's existence: the kernel
drops it when the holder exits in any way (normal exit, exception, kill -9, OOM killer), so a dead run
never blocks the next one and there is no stale-lock cleanup. The file itself stays; its content (pid,
host, start time of the last holder) is only meaningful while the lock is held.

Which lock: `fcntl.flock`. On Linux NFS clients (2.6.12+) flock is emulated with a whole-file byte-range
lock held at the server, so it excludes runs on other nodes too (unless mounted with `nolock` or
`local_lock=flock`, which keep locks on the node); on Lustre it is cluster-wide with the `flock` mount
option, node-local with `localflock`, and fails with ENOSYS with `noflock`. POSIX record locks
(`fcntl.lockf`) reach the same servers but belong to the process and are dropped when the process closes
*any* descriptor of the file (reading the lock file to print its holder would release it), so flock's
per-open-file semantics are the safer choice. After a node is lost, an NFS server frees the lock when the
client's lease expires (NFSv4) or the client reboots (NFSv3); Lustre evicts the client.

Children: the descriptor is opened O_CLOEXEC, so exec'd programs never get it. A forked child (a
DataLoader worker with the fork start method) inherits a descriptor of the same open file, which shares
the flock: the child would keep the folder locked after the parent's death, and its LOCK_UN would unlock
the parent. An at-fork hook closes the descriptor in every child (closing a shared descriptor does not
unlock while the parent still holds one), and `release()` only unlocks in the process that acquired.

Distributed runs: only the process that writes the folder (rank 0) takes the lock; the caller decides.

Windows has no fcntl: no lock is taken, a warning says so, and two runs there can still share a folder.
File systems that refuse locks (ENOLCK, ENOSYS, EOPNOTSUPP) get the same warning and no lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from swin_train.errors import CheckpointError, TrainingError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("swin_train")

LOCK_FILE_NAME = ".swin-train.lock"
# errno values of file systems without (working) locks; anything else is a real error
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}
# A new holder writes its pid right after locking; a reader that finds the file empty waits this long.
_HOLDER_WRITE_WAIT_S = 1.0


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output folder: written into the lock file, read back for the error message."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC

    @classmethod
    def this_process(cls) -> LockHolder:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=started)

    def to_text(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "started": self.started}) + "\n"

    @classmethod
    def from_text(cls, text: str) -> LockHolder | None:
        """The holder written by `to_text`; None for anything else (empty, partly written, foreign)."""
        try:
            fields = json.loads(text)
            holder = cls(pid=fields["pid"], host=fields["host"], started=fields["started"])
        except (ValueError, TypeError, KeyError):
            return None
        if type(holder.pid) is not int or not isinstance(holder.host, str):
            return None
        return holder


def busy_message(holder: LockHolder | None, folder: Path) -> str:
    pid, host = (holder.pid, holder.host) if holder else ("?", "?")
    return (
        f"another swin-train (pid {pid} on host {host}) is using {folder}; "
        "wait for it to finish or choose another --output"
    )


class OutputLock:
    """A held (or, where locks are unavailable, merely recorded) lock on an output folder.

    A context manager; `release()` is idempotent and is a no-op in forked children.
    """

    def __init__(self, path: Path, fd: int | None, holder: LockHolder):
        self.path = path
        self.holder = holder
        self._fd = fd
        self._owner_pid = os.getpid()
        if fd is not None:
            _HELD.add(self)

    @property
    def locked(self) -> bool:
        """Whether this process holds the kernel lock (False after release, or without lock support)."""
        return self._fd is not None and os.getpid() == self._owner_pid

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        try:
            if os.getpid() == self._owner_pid:  # LOCK_UN from a child would unlock the parent too
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OutputLock({str(self.path)!r}, locked={self.locked})"


_HELD: set[OutputLock] = set()


def _close_in_child() -> None:
    """After fork, in the child: drop the inherited descriptors without unlocking (see module doc)."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def acquire_output_lock(folder: str | os.PathLike) -> OutputLock:
    """Lock `folder` (created if needed) for this process, or raise TrainingError at once if another
    process holds it. Never waits: a second run must fail, not queue behind the first."""
    folder = Path(folder)
    path = folder / LOCK_FILE_NAME
    holder = LockHolder.this_process()
    if fcntl is None:
        log.warning(
            "no file locks on this platform: nothing stops another swin-train from writing to %s", folder
        )
        return OutputLock(path, None, holder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointError(
            f"cannot open the lock file {path}: {exc.strerror or exc}; choose another --output"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_holder(fd)
        os.close(fd)
        raise TrainingError(busy_message(other, folder)) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _LOCKS_UNSUPPORTED:
            raise CheckpointError(
                f"cannot lock {path}: {exc.strerror or exc}; choose another --output"
            ) from None
        log.warning(
            "the file system of %s does not support locks (%s): nothing stops another swin-train from "
            "writing to it",
            folder,
            exc.strerror,
        )
        return OutputLock(path, None, holder)
    try:
        _write_holder(fd, holder)
    except OSError as exc:
        os.close(fd)  # closing the only descriptor drops the lock
        raise CheckpointError(
            f"cannot write the lock file {path}: {exc.strerror or exc}; choose another --output"
        ) from None
    return OutputLock(path, fd, holder)


def check_not_locked(folder: str | os.PathLike) -> None:
    """TrainingError when another process holds `folder`'s lock; creates and writes nothing (a run checks this
    before it builds its model and data, so a second run fails at once). A shared lock taken and dropped at
    once: it conflicts with a holder's exclusive one, and needs only read access."""
    path = Path(folder) / LOCK_FILE_NAME
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # acquire_output_lock reports what is wrong with the file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_holder(fd)
        raise TrainingError(busy_message(other, Path(folder))) from None
    except OSError:
        return  # no locks on this file system: acquire_output_lock warns
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_holder(fd: int, holder: LockHolder) -> None:
    data = holder.to_text().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)  # on NFS, another node reads the server's copy, not this client's cache


def _read_holder(fd: int) -> LockHolder | None:
    """The holder recorded in the lock file; waits briefly when the holder has locked but not yet written."""
    deadline = time.monotonic() + _HOLDER_WRITE_WAIT_S
    while True:
        holder = LockHolder.from_text(os.pread(fd, 4096, 0).decode(errors="replace"))
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


__all__ = [
    "LOCK_FILE_NAME",
    "LockHolder",
    "OutputLock",
    "acquire_output_lock",
    "busy_message",
    "check_not_locked",
]
