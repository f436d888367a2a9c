"""The training step as a GPU runs it, proven on the CPU: no host read of a device value on a steady-state
optimizer step (counted through a dispatch mode), in one process and under DDP (two gloo processes), where
every rank's EMA also starts from, and stays, bitwise rank 0's."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.multiprocessing as mp
from helpers import MICRO_OVERRIDES, assert_bitwise_equal
from torch.utils._python_dispatch import TorchDispatchMode

PRINT_FREQ = 4
# What makes the host wait for a GPU: a tensor's value read into Python (.item(), bool(), float()).
HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value into Python, in the thread that enters it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def run_config(data: Path, out: Path, *extra: str):
    from swin_train.config import load_config

    overrides = [
        *MICRO_OVERRIDES,
        "data.batch_size=32",
        "data.num_workers=1",  # the workers' decoding is not the training step's
        "train.cpu_split=1",  # a GPU step runs whole batches
        "train.ema=true",
        "train.ema_decay=0.9",
        "train.ema_warmup=true",
        f"print_freq={PRINT_FREQ}",
        "train.epochs=1",
        *extra,
    ]
    return load_config(None, overrides, data_path=str(data), output=str(out))


def train_recording(cfg) -> dict:
    """`train(cfg)` on the CPU with the host reads counted: {"reads": {step in epoch: reads from that
    optimizer step's start to the next one's (the loop's logging, stop check and saves included)},
    "ema_start"/"model_start": the EMA and the model before the first step, "ema_end": the EMA at the end}."""
    from swin_train import trainer

    real_step, starts, runs = trainer.train_step, [], []

    def recorded_step(run, batches):
        starts.append((run.state.step_in_epoch + 1, counter.count))
        if not runs:
            runs.append(run)
            record["ema_start"] = _state(run.ema.module)
            record["model_start"] = _state(run.model)
        return real_step(run, batches)

    record: dict = {}
    with patch.object(trainer, "train_step", recorded_step), HostReads() as counter:
        trainer.train(cfg, device="cpu")
    record["reads"] = {step: after - before for (step, before), (_, after) in zip(starts, starts[1:])}
    record["ema_end"] = _state(runs[0].ema.module)
    return record


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def steady_steps(reads: dict[int, int]) -> dict[int, int]:
    """The steps that neither print (every PRINT_FREQ), nor come first (lazy optimizer state), nor end the
    epoch (validation, checkpoints): no step here saves or stops."""
    last = max(reads)
    return {step: n for step, n in reads.items() if step % PRINT_FREQ and step not in (1, last)}


# ---- two processes (gloo), started here as torchrun would start them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: str, out: str, results: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    record = train_recording(run_config(Path(data), Path(out)))
    torch.save(record, Path(results) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(shapes_root, tmp_path_factory) -> list[dict]:
    """One epoch of the micro model on two gloo processes (16 steps each): each rank's record."""
    folder = tmp_path_factory.mktemp("ddp")
    args = (2, _free_port(), str(shapes_root), str(folder / "run"), str(folder))
    mp.start_processes(_rank_main, args=args, nprocs=2, join=True, start_method="spawn")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_ddp_every_ranks_ema_is_rank_0s_model_at_start_and_rank_0s_ema_after_steps(two_ranks):
    rank0, rank1 = two_ranks
    assert_bitwise_equal(rank0["ema_start"], rank0["model_start"])
    assert_bitwise_equal(rank1["ema_start"], rank0["model_start"])
    assert_bitwise_equal(rank1["ema_end"], rank0["ema_end"])
    moved = [k for k, v in rank0["ema_end"].items() if not torch.equal(v, rank0["ema_start"][k])]
    assert len(moved) > len(rank0["ema_end"]) // 2  # the EMA did move: the equality is not vacuous
