"""Launch by SLURM's srun without torchrun: host lists, which launcher's variables win, and a two-task run
started with SLURM's variables only that trains exactly like the same run under torchrun."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import MICRO_OVERRIDES, assert_bitwise_equal, env_for_subprocess, torchrun, weights

from swin_train.distributed import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    LaunchEnv,
    cuda_device_index,
    init_distributed,
    launch_env,
    parse_hostlist,
    slurm_port,
)
from swin_train.errors import ConfigError


@pytest.mark.parametrize(
    "expr, hosts",
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu-a[1,3],gpu-b5", ["gpu-a1", "gpu-a3", "gpu-b5"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),  # first group varies slowest, as SLURM lists them
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("nid[001234-001236]", ["nid001234", "nid001235", "nid001236"]),  # Cray
        ("node[9-11]", ["node9", "node10", "node11"]),  # width of the first number: 1
        ("node[009-011]", ["node009", "node010", "node011"]),
        ("compute-0-[1-2]", ["compute-0-1", "compute-0-2"]),  # Rocks
        ("r1i0n[0-2],r2i1n5", ["r1i0n0", "r1i0n1", "r1i0n2", "r2i1n5"]),  # SGI/HPE
        ("gpu[1-2].cluster.local", ["gpu1.cluster.local", "gpu2.cluster.local"]),
        ("cn0123", ["cn0123"]),
        ("node[5]", ["node5"]),
        (" host1  host2,\thost3\n", ["host1", "host2", "host3"]),
        ("node[1, 3]", ["node1", "node3"]),  # SLURM keeps a bracket whole across separators
        ("localhost", ["localhost"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_parse_hostlist_expands_slurm_host_lists(expr, hosts):
    assert parse_hostlist(expr) == hosts


@pytest.mark.parametrize(
    "expr, message",
    [
        ("node[1-", "'[' without ']'"),
        ("node]1[", "']' without '['"),
        ("node[[1]]", "nested '['"),
        ("node[]", "'' in [] is not N or N-M"),
        ("node[3-1]", "range '3-1' runs backwards"),
        ("node[a-c]", "'a-c' in [a-c] is not N or N-M"),
        ("node[1-2-3]", "is not N or N-M"),
        ("node[1--2]", "is not N or N-M"),
        ("node[-1]", "is not N or N-M"),
        ("", "names no host"),
        (" , ", "names no host"),
        ("n[0-99999999]", "names more than"),
        ("a[0-999]b[0-999]", "names more than"),
    ],
)
def test_malformed_hostlist_is_a_config_error_naming_it(expr, message):
    with pytest.raises(ConfigError) as err:
        parse_hostlist(expr)
    assert message in str(err.value) and repr(expr) in str(err.value)


# What srun sets for task 1 of a 4-task step on two nodes of a 3-node job (other SLURM_* omitted).
SRUN_TASK = {
    "SLURM_JOB_ID": "4711",
    "SLURM_JOB_NODELIST": "gpu[07-09]",
    "SLURM_STEP_NODELIST": "gpu[08-09]",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_STEP_ID": "0",
}
TORCHRUN_WORKER = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RESTART_COUNT": "2",
}


def test_no_launcher_is_a_single_process():
    assert launch_env({}) == LaunchEnv(rank=0, world_size=1, local_rank=0, source="single")


def test_torchrun_variables_give_rank_world_and_rendezvous():
    assert launch_env(TORCHRUN_WORKER) == LaunchEnv(3, 8, 1, "node0", 29500, "torchrun")


def test_srun_task_rank_comes_from_slurm_and_rank_0_hosts_on_the_first_step_node():
    launch = launch_env(SRUN_TASK)
    assert launch == LaunchEnv(1, 4, 1, "gpu08", slurm_port(4711), "slurm")
    assert slurm_port(4711) == SLURM_PORT_BASE + 4711 % SLURM_PORT_SPAN == 19711


def test_torchrun_inside_a_slurm_job_wins_over_slurm():
    # one srun task per node running torchrun: the workers see both sets; torchrun's ranks are the real ones
    assert launch_env({**SRUN_TASK, **TORCHRUN_WORKER}) == launch_env(TORCHRUN_WORKER)


def test_job_nodelist_is_used_without_a_step_nodelist():
    env = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_NODELIST"}
    assert launch_env(env).master_addr == "gpu07"


def test_master_addr_and_port_replace_the_derived_ones_under_slurm():
    launch = launch_env({**SRUN_TASK, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"})
    assert (launch.source, launch.master_addr, launch.master_port) == ("slurm", "10.1.2.3", 23456)


def test_slurm_port_is_the_same_for_every_task_and_in_the_unprivileged_range():
    ports = {slurm_port(job_id) for job_id in (1, 9_999, 10_000, 123_456_789, 2**31)}
    assert all(SLURM_PORT_BASE <= p < SLURM_PORT_BASE + SLURM_PORT_SPAN < 32768 for p in ports)
    tasks = [launch_env({**SRUN_TASK, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2)}) for r in range(4)]
    assert {(t.master_addr, t.master_port) for t in tasks} == {("gpu08", 19711)}
    assert [t.rank for t in tasks] == [0, 1, 2, 3]


def test_batch_script_without_srun_is_a_single_process():
    # the batch step of `sbatch --nodes 2 --ntasks-per-node 8` has SLURM_PROCID=0 and the job's 16 tasks but
    # no SLURM_STEP_NUM_TASKS: it is one process, not rank 0 of 16 waiting for 15 others
    batch = {
        "SLURM_JOB_ID": "4711",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    assert launch_env(batch) == LaunchEnv()
    salloc_shell = {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16"}
    assert launch_env(salloc_shell) == LaunchEnv()


def test_single_task_step_needs_no_rendezvous():
    assert launch_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == LaunchEnv(source="slurm")


@pytest.mark.parametrize(
    "environ, message",
    [
        (
            {**SRUN_TASK, "SLURM_PROCID": "4"},
            "SLURM_PROCID=4 is not a rank of SLURM_STEP_NUM_TASKS=4 processes",
        ),
        ({**SRUN_TASK, "SLURM_PROCID": "-1"}, "SLURM_PROCID=-1 is not a rank"),
        ({**SRUN_TASK, "SLURM_PROCID": "one"}, "SLURM_PROCID='one' is not an integer"),
        ({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS=0: the number of processes"),
        ({**SRUN_TASK, "SLURM_LOCALID": "7"}, "SLURM_LOCALID=7 is not a local rank"),
        ({**SRUN_TASK, "SLURM_JOB_ID": "12_3"}, "SLURM_JOB_ID='12_3' is not an integer"),
        ({**SRUN_TASK, "SLURM_STEP_NODELIST": "gpu[08-"}, "SLURM_STEP_NODELIST: bad SLURM host list"),
        ({**SRUN_TASK, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_JOB_ID"}, "set MASTER_PORT"),
        ({k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}, "set MASTER_ADDR"),
        ({**TORCHRUN_WORKER, "RANK": "8"}, "RANK=8 is not a rank of WORLD_SIZE=8 processes"),
        ({**TORCHRUN_WORKER, "WORLD_SIZE": "8.0"}, "WORLD_SIZE='8.0' is not an integer"),
        ({"RANK": "0"}, "only one of RANK and WORLD_SIZE is set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ],
)
def test_inconsistent_launcher_variables_are_one_line_config_errors(environ, message):
    with pytest.raises(ConfigError) as err:
        launch_env(environ)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cuda_device_is_the_local_rank_or_the_one_gpu_srun_bound_to_the_task():
    assert cuda_device_index(3, 8, "torchrun") == 3
    assert cuda_device_index(3, 8, "slurm") == 3  # --gres=gpu:8: every task sees all eight
    assert cuda_device_index(3, 1, "slurm") == 0  # --gpus-per-task=1: each task sees only its own
    with pytest.raises(ConfigError, match="local rank 1 needs GPU 1 but only 1 are visible"):
        cuda_device_index(1, 1, "torchrun")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        cuda_device_index(0, 0, "slurm")


# ---- end to end: two tasks started as srun starts them, on this machine


def _free_port_in(low: int, high: int) -> int:
    for port in range(low + os.getpid() % (high - low), high):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free port in [{low}, {high})")


TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _srun_task_env(rank: int, ntasks: int, job_id: int) -> dict:
    """A task's environment as srun makes it, with no torchrun variable in it."""
    inherited = env_for_subprocess().items()
    env = {
        k: v
        for k, v in inherited
        if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in TORCHRUN_VARIABLES
    }
    env.update(
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS=str(ntasks),
        SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NODEID="0",
        SLURM_STEP_ID="0",
    )
    return env


def _srun(args: list[str], ntasks: int, job_id: int, timeout: float = 240) -> list[tuple[int, str]]:
    """Start `ntasks` train processes as srun would; [(exit status, output)] per rank."""
    cmd = [sys.executable, "-m", "swin_train.cli.train", *args]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=task_env)
        for task_env in (_srun_task_env(rank, ntasks, job_id) for rank in range(ntasks))
    ]
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            proc.kill()
    return results


def test_two_srun_tasks_train_exactly_and_equal_torchrun_bitwise(shapes_root, tmp_path):
    # the rendezvous port is the one derived from the job id: pick a job id whose port is free
    job_id = (
        7 * SLURM_PORT_SPAN
        + _free_port_in(SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN)
        - SLURM_PORT_BASE
    )
    common = [
        "--device",
        "cpu",
        "--data-path",
        str(shapes_root),
        *MICRO_OVERRIDES,
        "data.batch_size=32",
        "train.epochs=1",
    ]
    out = tmp_path / "slurm"
    (rank0, output0), (rank1, output1) = _srun(["--output", str(out), *common], ntasks=2, job_id=job_id)
    assert rank0 == 0 and rank1 == 0, (output0 + output1)[-3000:]
    assert "device cpu x 2 processes" in output0
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["val_num_samples"] == 128  # every val image counted once over the two tasks
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["train_state"]["global_step"] == 16

    reference = tmp_path / "torchrun"
    done = torchrun(2, "train", "--output", str(reference), *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_bitwise_equal(weights(reference / "last.pth"), weights(out / "last.pth"))


def test_rank_0_that_cannot_host_the_store_says_to_set_master_port(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name in [*TORCHRUN_VARIABLES, *(n for n in os.environ if n.startswith("SLURM_"))]:
            monkeypatch.delenv(name, raising=False)
        for name, value in {**SRUN_TASK, "SLURM_PROCID": "0", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        outcome: list[BaseException | None] = []

        def start_rank_0() -> None:
            try:
                init_distributed("cpu")
                outcome.append(None)
            except BaseException as err:  # handed to the test thread
                outcome.append(err)

        # in a thread: were the port free, rank 0 would wait for the other three tasks
        thread = threading.Thread(target=start_rank_0, daemon=True)
        thread.start()
        thread.join(timeout=60)
    assert outcome and isinstance(outcome[0], ConfigError), outcome
    message = str(outcome[0])
    assert f"rank 0 cannot host the rendezvous store on port {port}" in message
    assert "set MASTER_PORT to a free port" in message and "\n" not in message


# ---- the batch script, with srun and scontrol replaced by recorders

SBATCH_SCRIPT = Path(__file__).parents[1] / "scripts" / "slurm" / "train.sbatch"


def _run_batch_script(tmp_path: Path, srun_status: int) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    for tool, status in (("srun", srun_status), ("scontrol", 0)):
        record = f'echo "{tool} SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK $*" >> {calls}'
        (bin_dir / tool).write_text(f"#!/bin/bash\n{record}\nexit {status}\n")
        (bin_dir / tool).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "4711",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NTASKS": "16",
        "SLURM_CPUS_PER_TASK": "10",
    }
    done = subprocess.run(
        ["bash", str(SBATCH_SCRIPT), "cfg.yaml", "out/run", "--data-path", "/data/in"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    return done, calls


def test_sbatch_script_is_valid_bash_and_asks_for_the_signal_and_requeue():
    assert subprocess.run(["bash", "-n", str(SBATCH_SCRIPT)]).returncode == 0
    directives = [
        line.split("#")[1].split()[1]
        for line in SBATCH_SCRIPT.read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    assert {"--signal=USR1@120", "--requeue", "--open-mode=append", "--ntasks-per-node=8"} <= set(directives)


@pytest.mark.parametrize("status, requeued", [(138, True), (143, True), (0, False), (1, False), (2, False)])
def test_sbatch_script_requeues_only_after_a_checkpointed_stop(tmp_path, status, requeued):
    done, calls = _run_batch_script(tmp_path, status)
    assert done.returncode == status, done.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == (
        "srun SRUN_CPUS_PER_TASK=10 --kill-on-bad-exit=0 swin-train --config cfg.yaml --output out/run "
        "--data-path /data/in"
    )
    assert lines[1:] == (["scontrol SRUN_CPUS_PER_TASK=10 requeue 4711"] if requeued else [])
