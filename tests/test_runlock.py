"""One writer per output folder (swin_train.runlock): a second run fails at once naming the first, and a
lock never outlives its process, whether it exits, raises or is killed with SIGKILL."""

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import time
from datetime import datetime

import pytest

from swin_train import runlock
from swin_train.errors import CheckpointError, TrainingError
from swin_train.runlock import LOCK_FILE_NAME, LockHolder, acquire_output_lock, busy_message


def expected_busy(pid: int, folder) -> str:
    return (
        f"another swin-train (pid {pid} on host {socket.gethostname()}) is using {folder}; "
        "wait for it to finish or choose another --output"
    )


def in_forked_child(fn) -> tuple[int, str]:
    """Run `fn()` in a forked child; returns (exit status, what fn returned or the error it raised).
    A fork already has swin_train imported, so it is a separate process that starts in milliseconds."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status, text = 0, ""
        try:
            text = str(fn())
        except BaseException as exc:
            status, text = 1, f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, text.encode())
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), b"".join(chunks).decode()


def try_acquire_elsewhere(folder) -> tuple[int, str]:
    """Acquire and release `folder` in another process: (0, 'acquired') or (1, 'TrainingError: ...')."""

    def attempt():
        with acquire_output_lock(folder):
            return "acquired"

    return in_forked_child(attempt)


def test_second_acquire_in_another_process_fails_at_once_naming_the_holder(tmp_path):
    with acquire_output_lock(tmp_path) as lock:
        assert lock.locked
        started = time.monotonic()
        status, text = try_acquire_elsewhere(tmp_path)
        assert time.monotonic() - started < 5  # no waiting for the holder
    assert (status, text) == (1, f"TrainingError: {expected_busy(os.getpid(), tmp_path)}")


def test_second_acquire_in_the_same_process_fails_too(tmp_path):
    with acquire_output_lock(tmp_path):
        with pytest.raises(TrainingError, match=f"pid {os.getpid()} on host"):
            acquire_output_lock(tmp_path)


def start_forked_holder(folder) -> tuple[int, int]:
    """A process that takes the lock, forks a child standing in for a DataLoader worker (orphaned workers
    outlive their parent for a while) and then waits to be killed; returns (holder pid, worker pid)."""
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:  # never returns into pytest
        try:
            acquire_output_lock(folder)
            worker = os.fork()
            if worker == 0:
                time.sleep(60)
                os._exit(0)
            os.write(write_end, str(worker).encode())
            time.sleep(600)
        finally:
            os._exit(1)
    os.close(write_end)
    worker = int(os.read(read_end, 64) or -1)
    os.close(read_end)
    assert worker > 0, "the holder could not take the lock"
    return holder, worker


def test_lock_of_a_process_killed_with_sigkill_is_free_at_once_even_while_its_forked_worker_lives(tmp_path):
    holder, worker = start_forked_holder(tmp_path)
    try:
        with pytest.raises(TrainingError) as busy:
            acquire_output_lock(tmp_path)
        assert str(busy.value) == expected_busy(holder, tmp_path)
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.kill(worker, 0)  # the forked worker still runs
        with acquire_output_lock(tmp_path) as lock:  # no retry, no wait: the kernel dropped the lock
            assert lock.locked
    finally:
        for pid in (holder, worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(holder, 0)


def test_released_at_the_end_of_the_block_and_on_an_exception(tmp_path):
    with acquire_output_lock(tmp_path) as lock:
        pass
    assert not lock.locked
    assert try_acquire_elsewhere(tmp_path) == (0, "acquired")
    with pytest.raises(RuntimeError, match="failed inside the block"):
        with acquire_output_lock(tmp_path):
            raise RuntimeError("failed inside the block")
    assert try_acquire_elsewhere(tmp_path) == (0, "acquired")


def test_release_is_idempotent(tmp_path):
    lock = acquire_output_lock(tmp_path)
    lock.release()
    lock.release()
    assert not lock.locked and try_acquire_elsewhere(tmp_path) == (0, "acquired")


def test_process_that_exits_without_releasing_leaves_the_folder_free(tmp_path):
    status, _ = in_forked_child(lambda: acquire_output_lock(tmp_path).locked)  # never released
    assert status == 0
    with acquire_output_lock(tmp_path) as lock:
        assert lock.locked


def test_forked_child_neither_keeps_nor_releases_the_parents_lock(tmp_path):
    with acquire_output_lock(tmp_path) as lock:

        def child_releases_and_exits():
            held_in_child = lock.locked
            lock.release()  # what a child running the parent's cleanup would do
            return held_in_child

        assert in_forked_child(child_releases_and_exits) == (0, "False")
        assert lock.locked
        assert try_acquire_elsewhere(tmp_path) == (
            1,
            f"TrainingError: {expected_busy(os.getpid(), tmp_path)}",
        )


def test_lock_file_records_pid_host_and_start_time(tmp_path):
    before = datetime.now().astimezone()
    with acquire_output_lock(tmp_path / "new" / "run") as lock:  # the folder is created
        text = (tmp_path / "new" / "run" / LOCK_FILE_NAME).read_text()
        # reading (opening and closing) the file in the holder keeps the lock: flock, not lockf
        assert try_acquire_elsewhere(tmp_path / "new" / "run")[0] == 1
    fields = json.loads(text)
    assert fields.keys() == {"pid", "host", "started"}
    assert (fields["pid"], fields["host"]) == (os.getpid(), socket.gethostname())
    assert (
        0 <= (datetime.fromisoformat(fields["started"]) - before.replace(microsecond=0)).total_seconds() < 60
    )
    assert LockHolder.from_text(text) == lock.holder


def test_holder_text_round_trips_and_partial_or_foreign_text_is_unknown():
    holder = LockHolder(pid=123, host="node7", started="2026-01-01T00:00:00+00:00")
    assert LockHolder.from_text(holder.to_text()) == holder
    for text in ["", holder.to_text()[:10], "12345\n", '{"pid": "x", "host": "h", "started": ""}', "[1, 2]"]:
        assert LockHolder.from_text(text) is None, text
    assert busy_message(None, "/out") == (
        "another swin-train (pid ? on host ?) is using /out; wait for it to finish or choose another --output"
    )


def test_a_new_holder_replaces_the_previous_holders_record(tmp_path):
    (tmp_path / LOCK_FILE_NAME).write_text(
        '{"pid": 999999, "host": "gone", "started": "long ago"} and more junk'
    )
    with acquire_output_lock(tmp_path) as lock:
        assert LockHolder.from_text((tmp_path / LOCK_FILE_NAME).read_text()) == lock.holder


def test_file_system_without_locks_degrades_to_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        lock = acquire_output_lock(tmp_path)
    assert not lock.locked
    assert f"the file system of {tmp_path} does not support locks" in caplog.text
    lock.release()


def test_unexpected_lock_error_is_a_one_line_checkpoint_error(tmp_path, monkeypatch):
    def io_error(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(runlock.fcntl, "flock", io_error)
    with pytest.raises(CheckpointError, match=f"cannot lock {tmp_path / LOCK_FILE_NAME}: Input/output error"):
        acquire_output_lock(tmp_path)


def test_platform_without_fcntl_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runlock, "fcntl", None)
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        with acquire_output_lock(tmp_path) as lock:
            assert not lock.locked
    assert "no file locks on this platform" in caplog.text
    assert not (tmp_path / LOCK_FILE_NAME).exists()


def test_output_that_is_a_file_is_a_one_line_checkpoint_error(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot open the lock file .*; choose another --output"):
        acquire_output_lock(tmp_path / "out")
