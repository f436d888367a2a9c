"""What killed processes leave behind: temp files and folders named after their writer (host and pid), so
that a later run deletes a dead writer's leftovers and never touches a live one's.

Used by the atomic checkpoint and weight saves (`checkpoint.temp_path`) and by the shapes set's generation
folders (`shapes.ensure_shapes_dataset`). The host is part of the tag because output folders and caches may
sit on a file system shared between nodes, where a pid means nothing to another host.
"""

from __future__ import annotations

import os
import secrets
import socket


def _host() -> str:
    return socket.gethostname().replace("-", "_")  # no '-': a tag splits into exactly three parts


def owner_tag() -> str:
    """`host-pid-random`, for a temp name of this process."""
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def left_by_dead_process(tag: str) -> bool:
    """Whether `tag` (an `owner_tag`) names a process of this host that no longer runs. False for another
    host's tags, malformed tags, this process and live processes."""
    parts = tag.split("-")
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if (
        os.name == "nt"
    ):  # os.kill(pid, 0) would terminate the process there; assume alive (keep the leftovers)
        return True
    try:
        os.kill(pid, 0)  # signal 0: an existence check only
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # PermissionError: alive but not ours; beyond pid_max: cannot exist
    return True
