"""Multi-node under torchrun: two agents on this machine play two nodes meeting at a c10d rendezvous, as
`torchrun --nnodes 2 --rdzv-backend c10d` on two hosts would. The run is exact, and a worker killed with
SIGKILL on one node is restarted by both agents and resumes to weights bitwise equal to an uninterrupted
run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import MICRO_OVERRIDES, assert_bitwise_equal, env_for_subprocess, weights

from swin_train.distributed import open_session

EPOCHS, STEPS_PER_EPOCH = 1, 1024 // (2 * 32)  # 1024 train images, 2 nodes x 1 process x batch 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(shapes_root: Path, out: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each; node 0 hosts the rendezvous store as a head node would."""
    port, run_id = _free_port(), f"swin-{out.name}-{os.getpid()}"
    args = [
        "--device",
        "cpu",
        "--data-path",
        str(shapes_root),
        "--output",
        str(out),
        *MICRO_OVERRIDES,
        "data.batch_size=32",
        f"train.epochs={EPOCHS}",
        "train.checkpoint_every_steps=4",
    ]
    agents = []
    for is_host in (1, 0):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            run_id,
            "--rdzv-conf",
            f"is_host={is_host}",
            "--local-addr",
            "127.0.0.1",
            "--max-restarts",
            "2",
            "-m",
            "swin_train.cli.train",
            *args,
        ]
        agents.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env_for_subprocess(),
                start_new_session=True,
            )
        )
    return agents


def _finish(agents: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Wait for both agents; [(exit status, output)]. If one hangs, kills its workers (torchrun starts
    them in sessions of their own) and then the agents."""
    results = []
    try:
        for agent in agents:
            output, _ = agent.communicate(timeout=timeout)
            results.append((agent.returncode, output))
    finally:
        for agent in agents:
            if agent.poll() is None:
                for worker in _train_workers(agent.pid):
                    os.kill(worker, signal.SIGKILL)
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    return results


def _train_workers(agent_pid: int) -> list[int]:
    """The swin-train processes the agent started (its children, read from /proc)."""
    children = []
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        try:
            children += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            continue
    workers = []
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"swin_train.cli.train" in cmdline:
            workers.append(pid)
    return workers


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "uninterrupted"
    results = _finish(_start_nodes(shapes_root, out))
    return out, results


def test_two_nodes_meet_at_a_c10d_rendezvous_and_train_and_evaluate_exactly(uninterrupted):
    out, results = uninterrupted
    for status, output in results:
        assert status == 0, output[-3000:]
    log = "".join(output for _, output in results)
    assert "device cpu x 2 processes" in log
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_num_samples"] for r in records] == [128] * EPOCHS  # 16 val images x 8 classes, once each
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and state["train_state"]["global_step"] == EPOCHS * STEPS_PER_EPOCH


def test_worker_killed_on_one_node_restarts_both_and_resumes_bitwise(shapes_root, tmp_path, uninterrupted):
    reference, _ = uninterrupted
    out = tmp_path / "killed"
    agents = _start_nodes(shapes_root, out)
    try:
        deadline = time.time() + 240
        while not (out / "step-000000008.pth").exists():  # step 8 of 16
            assert all(a.poll() is None for a in agents), "an agent ended before the checkpoint appeared"
            assert time.time() < deadline, "no step checkpoint in time"
            time.sleep(0.01)
        victims = _train_workers(agents[1].pid)
        assert len(victims) == 1, f"node 1 runs {len(victims)} swin-train workers"
        os.kill(victims[0], signal.SIGKILL)
    finally:
        results = _finish(agents)
    for status, output in results:
        assert status == 0, output[-3000:]
    resumed = re.search(r"resuming from \S*step-(\d{9})\.pth", "".join(output for _, output in results))
    assert resumed, "the restarted group did not resume from a step checkpoint"
    assert 8 <= int(resumed.group(1)) < EPOCHS * STEPS_PER_EPOCH
    assert_bitwise_equal(weights(reference / "last.pth"), weights(out / "last.pth"))


def test_a_restarted_group_agrees_on_a_fresh_session_whatever_the_store_holds():
    """An earlier start left its session, members and welcomes in the store; the new start's ranks begin in
    any order, and their restart counts may differ, but they all meet in one new session."""
    store, world = dist.HashStore(), 4
    stale = open_session_of_an_earlier_start(store, world)
    sessions: dict[int, str] = {}

    def join(rank: int) -> None:
        sessions[rank] = open_session(store, rank, world, timeout=timedelta(seconds=60))

    threads = {rank: threading.Thread(target=join, args=(rank,)) for rank in range(world)}
    for rank in (3, 1, 2):  # the other ranks first: they read the earlier start's session
        threads[rank].start()
    time.sleep(0.3)
    threads[0].start()
    for thread in threads.values():
        thread.join(timeout=60)
    assert len(sessions) == world and len(set(sessions.values())) == 1
    assert sessions[0] != stale and sessions[0].startswith("swin_train/")


def open_session_of_an_earlier_start(store, world: int) -> str:
    """Run a complete start of `world` ranks on `store`; returns its session."""
    done: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda r=r: done.__setitem__(r, open_session(store, r, world)))
        for r in range(world)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(done.values())) == 1 and len(done) == world
    return done[0]
