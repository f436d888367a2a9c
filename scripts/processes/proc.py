"""What Linux's /proc says about a running process: its children and all its descendants, its command
line, and its memory (a status field, PSS). Every reader returns nothing rather than failing when the
process has gone."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """The direct children of `pid` (from every thread's /proc/<pid>/task/<tid>/children)."""
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def cmdline(pid: int) -> str:
    """The command line of `pid`, arguments joined by spaces ('' when it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM, ...); None when the field or the process is missing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def pss_kib(pid: int) -> int:
    """Proportional set size of `pid` (shared pages split between their users); RSS where PSS is missing,
    0 when the process has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return status_kib("VmRSS", pid) or 0
