"""Process-group set-up for processes started by torchrun or by SLURM's srun, rank helpers and the few
reductions training needs.

Who started the process is read from the environment by `launch_env` (a pure function):

- torchrun (or RANK/WORLD_SIZE exported by hand): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- srun, one task per GPU: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; rank 0 hosts the rendezvous
  store on the first node of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST) at a port derived from
  SLURM_JOB_ID (`slurm_port`). MASTER_ADDR / MASTER_PORT, when set, replace the derived address and port.
- anything else, including a batch script run by sbatch without srun: one process.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from swin_train.errors import ConfigError, SwinTrainError, TrainingError

LaunchSource = Literal["torchrun", "slurm", "single"]

# SLURM's own separators between host names (hostlist.c: "\t, \n").
_HOSTLIST_SEPARATORS = " \t\n,"
# Guards against a typo like node[1-99999999] expanding to millions of names; far above any real cluster.
_MAX_HOSTS = 1 << 17
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_INTEGER = re.compile(r"\s*-?\d+\s*")

# Ports derived from SLURM_JOB_ID lie in [15000, 25000): unprivileged and below Linux's ephemeral range
# (32768-60999), so the kernel does not hand them out to outgoing connections.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 10000

_RENDEZVOUS_TIMEOUT = timedelta(minutes=30)
_SESSION_KEY = "swin_train/session"


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its place in the group and where rank 0 hosts the rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None  # None for a single process
    master_port: int | None = None
    source: LaunchSource = "single"


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    source: LaunchSource = "single"  # for the caller's log line: "launched by slurm: rank 3 of 16"
    rendezvous: str | None = None  # "host:port" of rank 0's store when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def parse_hostlist(expr: str) -> list[str]:
    """Expand a SLURM host list as SLURM does, without scontrol: `node[01-03,07]` -> node01 node02 node03
    node07; `gpu-a[1,3],gpu-b5`; a suffix after the brackets (`n[1-2]-ib`); several bracket groups
    (`a[1-2]b[3-4]` -> a1b3 a1b4 a2b3 a2b4, the first group varying slowest). Zero padding is kept (the
    width of the range's first number); commas and whitespace separate names. ConfigError if malformed."""
    hosts: list[str] = []
    for token in _hostlist_tokens(expr):
        parts = _hostname_parts(expr, token)
        if len(hosts) + math.prod(len(part) for part in parts) > _MAX_HOSTS:
            raise ConfigError(f"SLURM host list {expr!r} names more than {_MAX_HOSTS} hosts")
        hosts.extend("".join(combo) for combo in itertools.product(*parts))
    if not hosts:
        raise ConfigError(f"SLURM host list {expr!r} names no host")
    return hosts


def _hostlist_tokens(expr: str) -> list[str]:
    """Split at separators outside brackets; empty tokens are skipped as SLURM skips them."""
    tokens, current, inside = [], [], False
    for char in expr:
        if char == "[":
            if inside:
                raise ConfigError(f"bad SLURM host list {expr!r}: nested '['")
            inside = True
        elif char == "]":
            if not inside:
                raise ConfigError(f"bad SLURM host list {expr!r}: ']' without '['")
            inside = False
        elif char in _HOSTLIST_SEPARATORS and not inside:
            tokens.append("".join(current))
            current = []
            continue
        current.append(char)
    if inside:
        raise ConfigError(f"bad SLURM host list {expr!r}: '[' without ']'")
    tokens.append("".join(current))
    return [t for t in tokens if t]


def _hostname_parts(expr: str, token: str) -> list[list[str]]:
    """`a[1-2]b` -> [["a"], ["1", "2"], ["b"]]: the alternatives for each piece of one host name."""
    pieces = re.split(r"\[([^\]]*)\]", token)  # literal, bracket, literal, bracket, ..., literal
    parts: list[list[str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append([piece])
            continue
        numbers: list[str] = []
        for item in piece.split(","):
            match = _RANGE.fullmatch(item.strip())
            if not match:
                raise ConfigError(f"bad SLURM host list {expr!r}: {item!r} in [{piece}] is not N or N-M")
            low, high = match.group(1), match.group(2) or match.group(1)
            if int(high) < int(low):
                raise ConfigError(f"bad SLURM host list {expr!r}: range {item!r} runs backwards")
            if int(high) - int(low) >= _MAX_HOSTS:
                raise ConfigError(f"SLURM host list {expr!r} names more than {_MAX_HOSTS} hosts")
            numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
        parts.append(numbers)
    return parts


def slurm_port(job_id: int) -> int:
    """The rendezvous port every task of a SLURM job agrees on without talking: a function of the job id.
    Two jobs whose ids differ by a multiple of SLURM_PORT_SPAN and whose rank 0 share a node collide; set
    MASTER_PORT then (also for several multi-task steps running at once in one job)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def launch_env(environ: Mapping[str, str]) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables (see the module
    docstring for which win). ConfigError for missing, non-integer or inconsistent values."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torchrun_env(environ)
    # srun sets SLURM_STEP_NUM_TASKS for its tasks; a batch script also has SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, but it is one process, not rank 0 of a group.
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return _slurm_env(environ)
    return LaunchEnv()


def _torchrun_env(environ: Mapping[str, str]) -> LaunchEnv:
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        raise ConfigError(
            "only one of RANK and WORLD_SIZE is set: launch with torchrun, or set RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT together"
        )
    rank, world_size = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK", 0)
    _check_ranks("RANK", rank, "WORLD_SIZE", world_size, "LOCAL_RANK", local_rank)
    if world_size == 1:
        return LaunchEnv(local_rank=local_rank, source="torchrun")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not environ.get(name):
            raise ConfigError(
                f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun, or set "
                "MASTER_ADDR and MASTER_PORT to rank 0's host and a free port"
            )
    return LaunchEnv(
        rank, world_size, local_rank, environ["MASTER_ADDR"], _port_var(environ, "MASTER_PORT"), "torchrun"
    )


def _slurm_env(environ: Mapping[str, str]) -> LaunchEnv:
    rank, world_size = _int_var(environ, "SLURM_PROCID"), _int_var(environ, "SLURM_STEP_NUM_TASKS")
    local_rank = _int_var(environ, "SLURM_LOCALID", 0)
    _check_ranks("SLURM_PROCID", rank, "SLURM_STEP_NUM_TASKS", world_size, "SLURM_LOCALID", local_rank)
    if world_size == 1:
        return LaunchEnv(local_rank=local_rank, source="slurm")
    if environ.get("MASTER_ADDR"):
        master_addr = environ["MASTER_ADDR"]
    else:
        name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(n)), None)
        if name is None:
            raise ConfigError(
                "srun started this process but neither SLURM_STEP_NODELIST nor "
                "SLURM_JOB_NODELIST is set: set MASTER_ADDR to the host of rank 0"
            )
        try:
            master_addr = parse_hostlist(environ[name])[0]
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}; set MASTER_ADDR to the host of rank 0") from None
    if environ.get("MASTER_PORT"):
        master_port = _port_var(environ, "MASTER_PORT")
    elif environ.get("SLURM_JOB_ID"):
        master_port = slurm_port(_int_var(environ, "SLURM_JOB_ID"))
    else:
        raise ConfigError(
            "srun started this process but SLURM_JOB_ID is not set: set MASTER_PORT to a free port"
        )
    return LaunchEnv(rank, world_size, local_rank, master_addr, master_port, "slurm")


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    if value is None or not _INTEGER.fullmatch(value):
        raise ConfigError(f"environment variable {name}={value!r} is not an integer")
    return int(value)


def _port_var(environ: Mapping[str, str], name: str) -> int:
    port = _int_var(environ, name)
    if not 0 < port < 65536:
        raise ConfigError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def _check_ranks(
    rank_name: str, rank: int, world_name: str, world_size: int, local_name: str, local: int
) -> None:
    if world_size < 1:
        raise ConfigError(f"{world_name}={world_size}: the number of processes must be at least 1")
    if not 0 <= rank < world_size:
        raise ConfigError(
            f"{rank_name}={rank} is not a rank of {world_name}={world_size} processes "
            f"(0-{world_size - 1}): the launcher's variables are inconsistent"
        )
    if not 0 <= local < world_size:
        raise ConfigError(f"{local_name}={local} is not a local rank of {world_name}={world_size} processes")


def cuda_device_index(local_rank: int, visible_gpus: int, source: LaunchSource) -> int:
    """The GPU this process drives. Normally its local rank; under srun with one GPU bound per task
    (--gpus-per-task=1, --gpu-bind) each task sees a single GPU, which is then index 0."""
    if visible_gpus == 0:
        raise ConfigError(
            "device cuda was asked for but no CUDA GPU is visible: use --device cpu or check "
            "CUDA_VISIBLE_DEVICES and the job's GPU allocation"
        )
    if local_rank < visible_gpus:
        return local_rank
    if visible_gpus == 1 and source == "slurm":
        return 0
    raise ConfigError(
        f"local rank {local_rank} needs GPU {local_rank} but only {visible_gpus} are visible: "
        "start one process per GPU (torchrun --nproc_per_node, srun --ntasks-per-node)"
    )


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group that torchrun or srun started this process in (see `launch_env`); NCCL on
    CUDA, gloo on CPU. A single process joins nothing.
    `device`: "cpu", "cuda" or None (CUDA when available)."""
    launch = launch_env(os.environ)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        index = cuda_device_index(launch.local_rank, torch.cuda.device_count(), launch.source)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if launch.world_size == 1:
        return DistEnv(local_rank=launch.local_rank, device=dev, source=launch.source)
    if not dist.is_initialized():
        store = _rendezvous_store(launch)
        session = dist.PrefixStore(open_session(store, launch.rank, launch.world_size), store)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=session,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=_RENDEZVOUS_TIMEOUT,
            device_id=dev if use_cuda else None,
        )
        _FailureWatch.start(session, launch.rank, launch.world_size)
    return DistEnv(
        launch.rank,
        launch.world_size,
        launch.local_rank,
        dev,
        launch.source,
        f"{launch.master_addr}:{launch.master_port}",
    )


def _rendezvous_store(launch: LaunchEnv) -> dist.Store:
    if launch.source == "torchrun":
        # env:// reuses the torchrun agent's store when the agent offers it (TORCHELASTIC_USE_AGENT_STORE).
        from torch.distributed.rendezvous import rendezvous

        store, _, _ = next(rendezvous("env://", launch.rank, launch.world_size, timeout=_RENDEZVOUS_TIMEOUT))
        return store
    # srun has no agent: rank 0 hosts the store, the other tasks connect to it.
    try:
        return dist.TCPStore(
            launch.master_addr,
            launch.master_port,
            launch.world_size,
            launch.rank == 0,
            timeout=_RENDEZVOUS_TIMEOUT,
        )
    except dist.DistNetworkError as err:
        if launch.rank != 0:
            raise
        reason = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"rank 0 cannot host the rendezvous store on port {launch.master_port} ({reason}); "
            "set MASTER_PORT to a free port"
        ) from None


def open_session(
    store: dist.Store, rank: int, world_size: int, timeout: timedelta = _RENDEZVOUS_TIMEOUT
) -> str:
    """A key prefix that every rank of this start of the group shares and that no earlier start used.

    torchrun's agents keep one store across restarts, so the keys of an earlier start are still there
    (gloo would read a dead peer's address: "Connection refused"), and TORCHELASTIC_RESTART_COUNT can
    differ between nodes (an agent that restarts its workers because another node rejoined does not count
    a restart), so it cannot name the start. Instead rank 0 opens a session under a fresh id; every other
    rank registers a fresh nonce in the session it reads and goes on once rank 0 has welcomed that nonce,
    which a session left by an earlier start never does."""
    if rank == 0:
        session = f"swin_train/{uuid.uuid4().hex}"
        store.set(_SESSION_KEY, session)
        for member in range(1, world_size):
            nonce = store.get(f"{session}/member/{member}").decode()  # blocks until that rank registers
            store.set(f"{session}/welcome/{nonce}", str(member))
        return session
    nonce, registered_in = uuid.uuid4().hex, None
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        session = store.get(_SESSION_KEY).decode()  # blocks until a rank 0 has opened one
        if session != registered_in:
            store.set(f"{session}/member/{rank}", nonce)
            registered_in = session
        if store.check([f"{session}/welcome/{nonce}"]):
            return session
        if time.monotonic() > deadline:
            raise TrainingError(
                f"rank {rank}: rank 0 did not start this group within {timeout}; see rank 0's log"
            )
        time.sleep(0.05)  # a session of an earlier start: wait for this start's rank 0


class _FailureWatch:
    """Ends this process when another rank of the group failed, instead of leaving it in a collective or a
    barrier until the group's timeout (NCCL notices no dead peer; srun has no agent to stop the others).
    A failing rank writes its one-line error into the session's store (`announce_failure`); a thread on
    every rank polls for it, prints it and exits with its status. Exiting there (os._exit) is the point: the
    main thread may be blocked in the device's collective, where no Python exception reaches it, and
    whatever this rank was doing is rank 0's to save (checkpoint writes are atomic)."""

    KEY, SEEN_KEY, POLL_S, SEEN_TIMEOUT_S = "failed", "failed/seen", 0.5, 5.0
    current: _FailureWatch | None = None

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="swin-train rank failure watch", daemon=True)

    @classmethod
    def start(cls, store: dist.Store, rank: int, world_size: int) -> None:
        cls.current = cls(store, rank, world_size)
        cls.current.thread.start()

    @classmethod
    def stop(cls) -> None:
        if cls.current is not None:
            cls.current.stopped.set()
            cls.current.thread.join()
            cls.current = None

    def _watch(self) -> None:
        while not self.stopped.wait(self.POLL_S):
            try:
                if not self.store.check([self.KEY]):
                    continue
                rank, status, message = self.store.get(self.KEY).decode().split("|", 2)
            except Exception:  # the store is gone (its host, rank 0, has ended): nothing left to watch
                return
            if int(rank) == self.rank:
                return
            print(f"swin-train: error: rank {rank}: {message}", file=sys.stderr, flush=True)
            try:
                self.store.add(self.SEEN_KEY, 1)  # the failed rank may leave (and take the store with it)
            finally:
                os._exit(int(status))

    def announce(self, message: str, status: int) -> None:
        """Tell the other ranks (the first failure wins), and give them a moment to read it."""
        self.stopped.set()
        try:
            self.store.compare_set(self.KEY, "", f"{self.rank}|{status}|{message}")
            deadline = time.monotonic() + self.SEEN_TIMEOUT_S
            while self.store.add(self.SEEN_KEY, 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # the store is gone: the others learn it from their collectives
            pass


def announce_failure(error: BaseException) -> None:
    """Make the other ranks of the group end with this rank's one-line error and exit status (2 for a user
    error) within a second or so; nothing when not distributed."""
    if _FailureWatch.current is None:
        return
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    message = lines[0] if isinstance(error, SwinTrainError) else f"{type(error).__name__}: {lines[0]}"
    _FailureWatch.current.announce(message, getattr(error, "exit_code", 1))


def shutdown() -> None:
    _FailureWatch.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place when distributed); returns it."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class StopVote:
    """Whether any rank asked to stop, agreed on by every rank after the same optimizer step without a host
    wait for the device: the ranks vote on a gloo group of their own (CPU tensors) and `after_step` returns
    the vote started one step earlier, which has long arrived, then starts the next. So every rank stops
    after the same step, one step after the first request reached any of them. Must be built, and asked, by
    every rank at the same points. One process: the flag itself, at once."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pending: tuple[dist.Work, torch.Tensor] | None = None

    def after_step(self, requested: bool) -> bool:
        """The vote of the previous call (False on the first), while this one's is under way."""
        if self.group is None:
            return requested
        agreed = self._result()
        flag = torch.tensor([int(requested)], dtype=torch.int32)
        self.pending = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag
        return agreed

    def now(self, requested: bool) -> bool:
        """Whether any rank asked by now (the vote under way included); waits for every rank to vote."""
        if self.group is None:
            return requested
        earlier = self._result()
        flag = torch.tensor([int(requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return earlier or bool(flag.numpy()[0])

    def _result(self) -> bool:
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        work.wait()  # peers voted a whole step ago: this returns at once
        return bool(flag.numpy()[0])  # host memory: no device involved


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
