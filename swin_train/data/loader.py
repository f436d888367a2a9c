"""DataLoaders whose output does not depend on worker count, worker history or where an epoch started."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from swin_train.data.seeding import seed_generator, seed_globals_from
from swin_train.errors import DataError, TrainingError
from swin_train.stopping import STOP_SIGNALS

log = logging.getLogger("swin_train")


def usable_workers(requested: int) -> int:
    """`requested` loader workers, at most one per CPU this process may run on (more only add start-up
    time and memory; PyTorch itself warns about them). The output does not depend on the count."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cpus:
        log.info(
            "data.num_workers=%d but this process may use %d CPUs: using %d workers", requested, cpus, cpus
        )
        return cpus
    return requested


def _init_worker(seed: int, rank: int, worker_id: int) -> None:
    """Deterministic global RNGs in each worker, for code outside the seeded transforms."""
    seed_globals_from(seed, rank, worker_id)


def _leave_stop_signals_then_init(init: Callable[[int], None] | None, worker_id: int) -> None:
    leave_stop_signals_to_main()
    if init is not None:
        init(worker_id)


def leave_stop_signals_to_main() -> None:
    """In a worker: ignore the stop signals, then take them out of the mask inherited from the fork
    (`SignalSafeLoader`). Pending ones are dropped: they were meant for the main process, which got its own.
    Here and not earlier: torch's worker loop installs its SIGTERM handler (die unless the parent sent it)
    before it calls the init function."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _start_resource_tracker(context) -> None:
    """spawn and forkserver start multiprocessing's resource tracker with the first worker, and it unblocks
    SIGINT and SIGTERM once it is up (its own version of the block below, bpo-33613): start it first."""
    method = context.get_start_method() if context is not None else multiprocessing.get_start_method()
    if method != "fork":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


@contextmanager
def _stop_signals_blocked():
    """Workers forked inside inherit the block: no stop signal can reach one before its init ignores it.
    One sent meanwhile waits for this thread (or goes to another) and reaches the main process's handler."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerDied(TrainingError):
    """A data loader worker died (killed by the system, a crash in native code): the run cannot go on."""


def worker_death(error: BaseException) -> WorkerDied | None:
    """torch's RuntimeError for a dead worker as a one-line WorkerDied that keeps torch's cause; None for
    any other error."""
    text = " ".join(str(error).split())
    if not isinstance(error, RuntimeError) or not text.startswith("DataLoader worker (pid"):
        return None
    return WorkerDied(
        f"{text.rstrip('. ')}; the run stops here: run the same command to resume from its last checkpoint "
        "(a worker killed for memory needs a lower data.num_workers or data.batch_size)"
    )


def _name_worker_deaths() -> None:
    """torch's SIGCHLD handler raises its RuntimeError wherever the main thread is when a worker dies, a
    checkpoint write included, which then reported it as a failed write; raised as WorkerDied instead, a
    user error that every layer passes on as it is. Main thread only, where torch installs its handler."""
    handler = signal.getsignal(signal.SIGCHLD)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        return
    if getattr(handler, "names_worker_deaths", False):
        return

    def named(signum, frame) -> None:
        try:
            handler(signum, frame)
        except RuntimeError as error:
            died = worker_death(error)
            if died is None:
                raise
            raise died from None

    named.names_worker_deaths = True
    signal.signal(signal.SIGCHLD, named)


# the multi-process iterators of every SignalSafeLoader (an iterator may outlive its loader)
_ITERATORS_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # registered after torch's and multiprocessing's exit handlers, so it runs before them
def _shut_down_workers_at_exit() -> None:
    """Workers still running at exit (nobody closed their loader) are shut down as `close` does:
    multiprocessing's own clean-up would SIGKILL them (they ignore SIGTERM), which torch's SIGCHLD handler
    would report as a dead worker."""
    for iterator in list(_ITERATORS_WITH_WORKERS):
        iterator._shutdown_workers()


class SignalSafeLoader(DataLoader):
    """A DataLoader whose workers leave SIGTERM, SIGINT, SIGUSR1 and SIGHUP to the main process, which shuts
    them down itself (`close`) once it has saved.

    Schedulers and terminals signal whole process trees; a worker that died of a SIGTERM meant for the main
    process crashed the run before it could checkpoint. The signals are blocked while workers are forked and
    each worker ignores them in its init (`leave_stop_signals_to_main`), so none can die of one, even while it
    starts. Ending a worker that ignores SIGTERM takes SIGKILL: its `terminate` (torch's last resort for a
    worker that did not stop, and multiprocessing's at exit) becomes `kill`, so neither can hang."""

    def __init__(self, *args, worker_init_fn: Callable[[int], None] | None = None, **kwargs):
        init = partial(_leave_stop_signals_then_init, worker_init_fn)
        super().__init__(*args, worker_init_fn=init, **kwargs)
        self._live_iterators: weakref.WeakSet = weakref.WeakSet()

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        _start_resource_tracker(self.multiprocessing_context)
        with _stop_signals_blocked():
            iterator = super().__iter__()
        for worker in iterator._workers:
            worker._popen.terminate = worker._popen.kill
        self._live_iterators.add(iterator)
        _ITERATORS_WITH_WORKERS.add(iterator)
        _name_worker_deaths()
        return iterator

    def close(self) -> None:
        """Shut the workers down now, in-flight epochs included, as an iterator's own clean-up does (the
        workers finish the batch at hand and leave); the next `iter` starts new ones."""
        for iterator in list(self._live_iterators):
            iterator._shutdown_workers()
        self._live_iterators = weakref.WeakSet()
        self._iterator = None  # persistent workers: the iterator is DataLoader's to restart


def worker_options(num_workers: int, seed: int, rank: int) -> dict:
    """The DataLoader arguments every loader of a run shares: workers seeded from (seed, rank, worker_id)."""
    return {
        "num_workers": num_workers,
        "worker_init_fn": partial(_init_worker, seed, rank) if num_workers > 0 else None,
        "generator": seed_generator(seed, rank),
    }


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    sampler: Sampler,
    num_workers: int = 0,
    pin_memory: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader over `sampler` with persistent workers (num_workers > 0), pinned memory (when a
    GPU exists) and workers seeded from (seed, rank, worker_id). Augmentations do not depend on the
    worker seeds: with ResumableTrainSampler they are a pure function of (seed, epoch, index), which
    is why persistent workers (whose RNG carries across epochs) are safe for exact resume."""
    if drop_last and len(sampler) < batch_size:
        raise DataError(
            f"only {len(sampler)} samples per process but batch size {batch_size} with drop_last: "
            "no full batch; lower the batch size or add data"
        )
    return SignalSafeLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        **worker_options(num_workers, seed, rank),
    )
