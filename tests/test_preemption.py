"""Preemption as clusters deliver it, with 2 data loader workers per process: a stop signal to the whole
process group (Ctrl-C in a terminal, `kill -TERM -PGID`), to torchrun, or to every process of an srun step
ends with a checkpoint at the same step on every rank, the exit status 128 + signal and one log line per
signal; the resumed run ends bitwise equal to an uninterrupted one. Then the parts: workers that ignore the
stop signals (also while they start), a worker that dies for another reason, the Stopper's lines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    MICRO_OVERRIDES,
    assert_bitwise_equal,
    env_for_subprocess,
    run_cli,
    torchrun_command,
    weights,
)

STEPS_PER_EPOCH = 16  # 128 train images at batch 8
EPOCHS = 3
ARGS = [
    *(o for o in MICRO_OVERRIDES if not o.startswith(("data.num_workers", "print_freq"))),
    "data.num_workers=2",
    "data.batch_size=8",
    f"train.epochs={EPOCHS}",
    "train.checkpoint_every_steps=2",
    "print_freq=4",
]
TORCHRUN_ARGS = [*ARGS, "data.batch_size=4"]  # 2 processes x 4: the same 16 steps per epoch


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """128 train / 32 val images of the shapes set (8 classes, 32 px)."""
    from swin_train.data.shapes import ensure_shapes_dataset

    root = tmp_path_factory.mktemp("preempt") / "shapes"
    return ensure_shapes_dataset(root, img_size=32, train_per_class=16, val_per_class=4)


@pytest.fixture(scope="module")
def small_shards(small_set, tmp_path_factory):
    from swin_train.data.pack import PackOptions, pack

    out = tmp_path_factory.mktemp("preempt-wds") / "wds"
    pack(small_set, out, PackOptions(shard_size=8), progress=False)
    return out


def _uninterrupted(data: Path, out: Path) -> Path:
    done = run_cli("train", "--data-path", data, "--output", out, *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def folder_reference(small_set, tmp_path_factory):
    return _uninterrupted(small_set, tmp_path_factory.mktemp("ref") / "run")


@pytest.fixture(scope="module")
def shard_reference(small_shards, tmp_path_factory):
    return _uninterrupted(small_shards, tmp_path_factory.mktemp("ref-wds") / "run")


@pytest.fixture(scope="module")
def torchrun_reference(small_set, tmp_path_factory):
    """The uninterrupted run of 2 processes (srun's tasks train bitwise as torchrun's: test_slurm.py)."""
    out = tmp_path_factory.mktemp("ref-ddp") / "run"
    cmd = torchrun_command(2, "train", "--data-path", small_set, "--output", out, *TORCHRUN_ARGS)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_for_subprocess())
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _start_session(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`cmd` in a session (and process group) of its own, as a terminal or a scheduler starts a job."""
    with log.open("w") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env or env_for_subprocess(), start_new_session=True
        )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.005)


def _group_ends(pgid: int, timeout: float = 30) -> bool:
    """Whether every process of the group is gone (data workers included) within `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def _assert_stopped_once(out: Path, output: str, name: str, *, tracebacks: int = 0) -> int:
    """One line for the signal and one for the checkpoint, in the output and in log.txt; no traceback but
    the launcher's own. Returns the global step of the stop's checkpoint."""
    for text in (output, (out / "log.txt").read_text()):
        assert len(_lines_with(text, " received")) == 1, text[-3000:]
        assert len(_lines_with(text, f"{name} received: stopping with a checkpoint")) == 1
        assert len(_lines_with(text, f"stop requested ({name}): checkpoint written")) == 1
    assert output.count("Traceback") == tracebacks and "could not write" not in output, output[-3000:]
    newest = max(out.glob("step-*.pth"))
    state = torch.load(newest, weights_only=True)
    step = state["train_state"]["global_step"]
    assert f"checkpoint written at global step {step};" in output
    assert 2 <= step < EPOCHS * STEPS_PER_EPOCH
    return step


def _resume_ends_bitwise(data: Path, out: Path, stopped_at: int, reference: Path) -> None:
    resumed = run_cli("train", "--data-path", data, "--output", out, *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(global step {stopped_at})" in resumed.stdout
    assert_bitwise_equal(weights(reference / "last.pth"), weights(out / "last.pth"))


# --------------------------------------------------------------------- one process and its workers


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_whole_process_group_checkpoints_exits_and_resumes_bitwise(
    small_set, folder_reference, tmp_path, sig, status
):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "swin_train.cli.train", "--data-path", str(small_set), "--output", str(out)]
    proc = _start_session([*cmd, *ARGS], tmp_path / "output.txt")
    _wait_for(out / "step-000000002.pth", proc)
    os.killpg(proc.pid, sig)  # the main process and its 2 workers, as Ctrl-C, scancel or docker's tini -g do
    assert proc.wait(timeout=120) == status, (tmp_path / "output.txt").read_text()[-3000:]
    assert _group_ends(proc.pid), "data workers outlived the main process"
    stopped_at = _assert_stopped_once(out, (tmp_path / "output.txt").read_text(), sig.name)
    _resume_ends_bitwise(small_set, out, stopped_at, folder_reference)


def test_sigterm_to_the_process_group_reading_shards_checkpoints_and_resumes_bitwise(
    small_shards, shard_reference, tmp_path
):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "swin_train.cli.train",
        "--data-path",
        str(small_shards),
        "--output",
        str(out),
    ]
    proc = _start_session([*cmd, *ARGS], tmp_path / "output.txt")
    _wait_for(out / "step-000000002.pth", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, (tmp_path / "output.txt").read_text()[-3000:]
    assert _group_ends(proc.pid), "data workers outlived the main process"
    stopped_at = _assert_stopped_once(out, (tmp_path / "output.txt").read_text(), "SIGTERM")
    _resume_ends_bitwise(small_shards, out, stopped_at, shard_reference)


# --------------------------------------------------------------------- torchrun and srun


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_the_resume_is_bitwise(
    small_set, torchrun_reference, tmp_path
):
    out = tmp_path / "run"
    cmd = torchrun_command(2, "train", "--data-path", small_set, "--output", out, *TORCHRUN_ARGS)
    proc = _start_session(cmd, tmp_path / "output.txt")
    _wait_for(out / "step-000000002.pth", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun sends it on to each rank's process group, workers included
    # torchrun re-raises the signal after its ranks have exited, whatever they did: status 1 (README)
    assert proc.wait(timeout=120) == 1
    output = (tmp_path / "output.txt").read_text()
    assert _group_ends(proc.pid), "a rank or a data worker outlived torchrun"
    # torchrun's own traceback: the SignalException it re-raises
    assert "SignalException: Process" in output
    stopped_at = _assert_stopped_once(out, output, "SIGTERM", tracebacks=1)
    state = torch.load(max(out.glob("step-*.pth")), weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # both ranks at that step
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_for_subprocess())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(global step {stopped_at})" in resumed.stdout
    assert_bitwise_equal(weights(torchrun_reference / "last.pth"), weights(out / "last.pth"))


SBATCH_SCRIPT = Path(__file__).parents[1] / "scripts" / "slurm" / "train.sbatch"

# A stand-in for srun: the step's tasks started as srun starts them (SLURM_* variables, no torchrun's), all in
# one process group, which the test signals as SLURM signals a step: every process of it, not the batch
# script. It waits for the tasks and exits with the highest status, as srun does.
FAKE_SRUN = """#!{python}
import os, subprocess, sys
from pathlib import Path

args = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
assert args[0] == "swin-train", args
ntasks = int(os.environ["SLURM_NTASKS"])
tasks, pgid = [], 0
for rank in range(ntasks):
    env = {{**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NODELIST": "localhost"}}
    task = subprocess.Popen([sys.executable, "-m", "swin_train.cli.train", *args[1:]], env=env,
                            process_group=pgid)
    pgid = pgid or task.pid
    tasks.append(task)
Path(os.environ["STEP_PGID_FILE"]).write_text(str(pgid))
sys.exit(max(task.wait() for task in tasks))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_job(tmp_path: Path, small_set: Path, out: Path) -> tuple[list[str], dict, Path]:
    """The batch script's command and environment, with srun and scontrol replaced (scontrol records)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {calls}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    env = env_for_subprocess(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4711",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="3",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        STEP_PGID_FILE=str(tmp_path / "step.pgid"),
    )
    env = {
        k: v for k, v in env.items() if not k.startswith("TORCHELASTIC_") and k not in ("RANK", "WORLD_SIZE")
    }
    cmd = ["bash", str(SBATCH_SCRIPT), str(tmp_path / "config.yaml"), str(out), "--device", "cpu"]
    return [*cmd, "--data-path", str(small_set), *TORCHRUN_ARGS], env, calls


def test_sigusr1_to_every_process_of_the_srun_step_checkpoints_and_requeues(
    small_set, torchrun_reference, tmp_path
):
    out = tmp_path / "run"
    cmd, env, calls = _batch_job(tmp_path, small_set, out)
    job = _start_session(cmd, tmp_path / "job.out", env)
    _wait_for(out / "step-000000002.pth", job)
    # --signal=USR1@120: SLURM signals every process of the step (both tasks and their 4 data workers)
    os.killpg(int((tmp_path / "step.pgid").read_text()), signal.SIGUSR1)
    assert job.wait(timeout=120) == 138, (tmp_path / "job.out").read_text()[-3000:]
    output = (tmp_path / "job.out").read_text()
    assert calls.read_text().splitlines() == ["scontrol requeue 4711"]
    assert "stopped at a checkpoint (status 138): requeueing job 4711" in output
    stopped_at = _assert_stopped_once(out, output, "SIGUSR1")
    # the requeued job starts the same script again: it resumes and finishes
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"(global step {stopped_at})" in again.stdout
    assert calls.read_text().splitlines() == ["scontrol requeue 4711"]  # not requeued after it finished
    assert_bitwise_equal(weights(torchrun_reference / "last.pth"), weights(out / "last.pth"))


# --------------------------------------------------------------------- the parts


class _Keys(torch.utils.data.Dataset):
    """64 samples whose value is the (index, seed) key the resumable sampler gives."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, key) -> tuple[torch.Tensor]:
        return (torch.tensor([float(key[0]), float(key[1] % 1000)]),)


def _loader(workers: int = 2, start_method: str | None = None):
    from swin_train.data.loader import build_loader
    from swin_train.data.samplers import ResumableTrainSampler

    sampler = ResumableTrainSampler(64, num_replicas=1, rank=0, seed=1)
    loader = build_loader(_Keys(), batch_size=4, sampler=sampler, num_workers=workers, pin_memory=False)
    if start_method:
        loader.multiprocessing_context = start_method
    return loader


# fork: Linux's default up to Python 3.13; forkserver: from 3.14 (its workers start slowly enough that the
# signals below reach one while it starts)
@pytest.mark.parametrize("start_method", [None, "forkserver"])
def test_loader_workers_ignore_the_stop_signals_and_deliver_the_same_batches(start_method):
    expected = [batch.clone() for (batch,) in _loader(0)]
    loader = _loader(start_method=start_method)
    batches = iter(loader)
    got = [next(batches)[0].clone()]
    for worker in batches._workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            os.kill(worker.pid, sig)
    got += [batch.clone() for (batch,) in batches]
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(worker.is_alive() for worker in batches._workers)  # persistent: alive for the next epoch
    loader.close()  # the main process ends them itself
    assert not any(worker.is_alive() for worker in batches._workers)


def test_a_process_that_exits_with_its_workers_running_ends_them_quietly(tmp_path):
    """Workers that ignore SIGTERM would hang multiprocessing's exit clean-up (terminate, then join) or,
    killed, set off torch's SIGCHLD error: a loader nobody closed is shut down at exit like `close`."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_preemption import _loader\n"
        "batches = iter(_loader())\n"
        "next(batches)\n"
        "print(*[w.pid for w in batches._workers])\n"
    )
    cmd = [sys.executable, "-c", script, str(Path(__file__).parent)]
    proc = _start_session(cmd, tmp_path / "output.txt")
    assert proc.wait(timeout=120) == 0
    output = (tmp_path / "output.txt").read_text()
    assert len(output.split()) == 2 and "Traceback" not in output and "Exception" not in output, output
    assert _group_ends(proc.pid, timeout=5)


def test_a_stop_signal_while_workers_start_waits_for_the_main_process_and_kills_no_worker(monkeypatch):
    from torch.utils.data import DataLoader

    from swin_train.data import loader as loader_module

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    leave = loader_module.leave_stop_signals_to_main
    start = DataLoader._get_iterator

    def worker_signalled_while_starting() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # in the worker, before it could ignore anything
        leave()

    def main_signalled_while_forking(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        iterator = start(self)
        received.append("forked")
        return iterator

    monkeypatch.setattr(loader_module, "leave_stop_signals_to_main", worker_signalled_while_starting)
    monkeypatch.setattr(DataLoader, "_get_iterator", main_signalled_while_forking)
    try:
        loader = _loader()
        assert len([batch for (batch,) in loader]) == 16  # both workers lived through their SIGTERM
        # the main process's, once: held while this thread forks, or taken at once by another of its threads
        assert received.count(signal.SIGUSR1) == 1 and "forked" in received
        loader.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)


class _Interrupted:
    """A file that runs `interrupt` at its second write, which torch.save makes from inside its C++ writer."""

    def __init__(self, f, interrupt):
        self.f, self.interrupt, self.writes = f, interrupt, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 2:
            self.interrupt()
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _save_interrupted(path: Path, interrupt) -> None:
    from swin_train.checkpoint import write_atomically

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            torch.save({"model": {"w": torch.zeros(1 << 16)}}, _Interrupted(f, interrupt))

    write_atomically(path, write, what="checkpoint ")


def test_a_worker_killed_during_a_checkpoint_write_is_named_and_the_output_folder_is_not_blamed(tmp_path):
    from swin_train.data.loader import WorkerDied

    loader = _loader(1)
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    path = tmp_path / "last.pth"
    path.write_bytes(b"the previous checkpoint")

    def killed() -> None:
        os.kill(worker.pid, signal.SIGKILL)  # the out-of-memory killer's choice
        time.sleep(30)  # torch's SIGCHLD handler raises in here

    with pytest.raises(WorkerDied) as error:
        _save_interrupted(path, killed)
    message = str(error.value)
    assert message.startswith(f"DataLoader worker (pid {worker.pid}) is killed by signal: Killed;")
    assert "data.num_workers" in message and "output" not in message and "\n" not in message
    assert path.read_bytes() == b"the previous checkpoint" and sorted(tmp_path.iterdir()) == [path]
    loader.close()


def test_a_second_ctrl_c_during_a_checkpoint_write_aborts_as_itself(tmp_path):
    from swin_train.stopping import StopAborted

    path = tmp_path / "step-000000007.pth"

    def second_ctrl_c() -> None:
        raise StopAborted

    with pytest.raises(StopAborted):
        _save_interrupted(path, second_ctrl_c)
    assert list(tmp_path.iterdir()) == []


def test_a_worker_killed_mid_run_is_a_one_line_error_naming_it(small_set, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "swin_train.cli.train", "--data-path", str(small_set), "--output", str(out)]
    proc = _start_session([*cmd, *ARGS], tmp_path / "output.txt")
    _wait_for(out / "step-000000002.pth", proc)
    (worker, *_) = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
    os.kill(worker, signal.SIGKILL)
    assert proc.wait(timeout=120) == 2
    output = (tmp_path / "output.txt").read_text()
    (error,) = _lines_with(output, "swin-train: error:")
    # torch names the death from its SIGCHLD handler, or from the loader's own check when that runs first
    assert error.startswith(
        (
            f"swin-train: error: DataLoader worker (pid {worker}) is killed by signal: Killed;",
            f"swin-train: error: DataLoader worker (pid(s) {worker}) exited unexpectedly;",
        )
    )
    assert "Traceback" not in output and "output folder" not in output
    assert _group_ends(proc.pid)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_every_signal_is_one_line_from_the_announcing_process_and_a_second_ctrl_c_aborts(caplog):
    from swin_train.stopping import StopAborted, Stopper

    caplog.set_level("WARNING", logger="swin_train")
    steps = {"done": 40, "saved": 23}
    progress = dict(global_step=lambda: steps["done"], steps_unsaved=lambda: steps["done"] - steps["saved"])
    with Stopper(**progress) as stopper:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        steps["done"] = 41
        with pytest.raises(StopAborted):
            os.kill(os.getpid(), signal.SIGINT)
    assert stopper.exit_code == 138  # the first signal's
    assert caplog.messages == [
        "SIGUSR1 received: stopping with a checkpoint after this step or validation (global step 40)",
        "SIGTERM received: already stopping after SIGUSR1 (global step 40)",
        "SIGINT received again: aborting at global step 41 without a checkpoint; the last 18 steps are lost",
    ]
    caplog.clear()
    with Stopper(announce=False) as quiet:  # ranks other than 0
        os.kill(os.getpid(), signal.SIGTERM)
    assert quiet.exit_code == 143 and caplog.messages == []


def test_a_forked_child_that_inherits_the_handler_neither_stops_nor_speaks(caplog):
    from swin_train.stopping import Stopper

    with Stopper() as stopper:
        stopper.pid = -1  # as in a child forked after __enter__
        os.kill(os.getpid(), signal.SIGTERM)
    assert not stopper.requested and caplog.messages == []


def test_sighup_stops_the_run_unless_it_was_ignored_at_start_as_nohup_does():
    from swin_train.stopping import Stopper

    unhandled = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: unhandled.append(signum))
    try:
        with Stopper(announce=False) as stopper:
            os.kill(os.getpid(), signal.SIGHUP)
        assert stopper.exit_code == 129 and unhandled == []
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with Stopper(announce=False) as stopper:
            os.kill(os.getpid(), signal.SIGHUP)
        assert not stopper.requested and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_rank_stopped_by_a_signal_to_another_rank_says_so(monkeypatch, caplog):
    from types import SimpleNamespace

    from swin_train import trainer
    from swin_train.stopping import Stopper, TrainingStopped

    caplog.set_level("INFO", logger="swin_train")
    monkeypatch.setattr(trainer, "save_step_checkpoint", lambda run: None)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.stop(
            SimpleNamespace(state=SimpleNamespace(global_step=7), wait_for_saves=lambda: None), Stopper()
        )  # its own: no signal
    assert stopped.value.exit_code == 143
    assert caplog.messages == [
        "stop requested (by a signal to another rank): checkpoint written at global step 7; "
        "run the same command to continue"
    ]
