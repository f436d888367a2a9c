"""The training step as a GPU runs it, proven on the CPU: no host read of a device value on a steady-state
optimizer step (counted through a dispatch mode), in one process and under DDP (two gloo processes), where
every rank's EMA also starts from, and stays, bitwise rank 0's."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace
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


# ---- a non-finite step skipped on the device, bitwise as the host's skip did


def _adamw_and_ema(seed: int = 0):
    from swin_train.config import TrainConfig
    from swin_train.ema import ModelEma
    from swin_train.models.swin import SwinTransformer
    from swin_train.optim import build_optimizer

    torch.manual_seed(seed)
    model = SwinTransformer(
        img_size=32, patch_size=4, embed_dim=24, depths=(2,), num_heads=(2,), window_size=4
    )
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05), lr=1e-2, device_type="cpu")
    return model, optimizer, ModelEma(model, 0.9, warmup=True, every=2)


def test_a_step_skipped_on_the_device_leaves_adamw_and_the_ema_as_not_stepping_did():
    from swin_train.trainer import optimizer_step

    skipped = [True, False, True, True, False, False, True, False, False]  # the first step too
    host_model, host_optimizer, host_ema = _adamw_and_ema()
    model, optimizer, ema = _adamw_and_ema()
    run = SimpleNamespace(optimizer=optimizer, ema=ema, train_model=model, amp=SimpleNamespace(scaler=None))
    for i, skip in enumerate(skipped):
        for m in (host_model, model):
            g = torch.Generator().manual_seed(i)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
        if not skip:  # what the trainer did before: no step() call at all
            host_optimizer.step()
            host_ema.update(host_model)
        optimizer_step(run, torch.tensor(not skip))
    assert_bitwise_equal(_state(host_model), _state(model))
    assert_bitwise_equal(host_ema.state_dict()["module"], ema.state_dict()["module"])
    assert (
        (int(ema.num_updates), int(ema.calls)) == (int(host_ema.num_updates), int(host_ema.calls)) == (2, 5)
    )
    theirs, ours = host_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    assert theirs.keys() == ours.keys()
    for i in theirs:
        assert theirs[i]["step"] == ours[i]["step"] == 5
        assert torch.equal(theirs[i]["exp_avg"], ours[i]["exp_avg"])
        assert torch.equal(theirs[i]["exp_avg_sq"], ours[i]["exp_avg_sq"])


def test_pending_steps_add_up_bitwise_as_reading_each_step_did_and_stop_at_the_limit():
    from swin_train.errors import TrainingError
    from swin_train.run import PendingSteps, TrainState

    g = torch.Generator().manual_seed(0)
    losses, norms = torch.rand(40, generator=g) * 7, torch.rand(40, generator=g) * 3
    finite = torch.rand(40, generator=g) > 0.3
    norms[~finite] = float("inf")
    expected, pending, state = TrainState(), PendingSteps(), TrainState()
    for i in range(40):  # the trainer's sums before: a Python float += each step's .item()
        if finite[i]:
            expected.nonfinite_in_a_row = 0
            expected.epoch_grad_norm_sum += norms[i].item()
        else:
            expected.nonfinite_total += 1
            expected.nonfinite_in_a_row += 1
            expected.epoch_nonfinite += 1
        expected.epoch_loss_sum += losses[i].item()
        expected.global_step += 1
        pending.add(losses[i], norms[i], finite[i])
        state.global_step += 1
        if i % 7 == 6:  # a log line or a save
            pending.flush(state, max_nonfinite_steps=40)
    pending.flush(state, max_nonfinite_steps=40)
    assert state == expected
    assert state.epoch_loss_sum != float(
        losses.sum()
    )  # not a float32 sum on the device: a test that can fail

    in_a_row = PendingSteps()
    for ok in [True, False, False, True, False, False, False, True]:
        in_a_row.add(torch.tensor(1.0), torch.tensor(1.0 if ok else float("nan")), torch.tensor(ok))
    with pytest.raises(TrainingError, match=r"^3 optimizer steps in a row .* \(step 19\)"):
        in_a_row.flush(TrainState(global_step=20), max_nonfinite_steps=3)  # steps 13-20: the 7th is 19


# ---- the smaller GPU items: wrapping, buffers, amp, evaluation, failing ranks


@pytest.mark.parametrize("version", [1, 2])
def test_training_never_changes_a_swin_buffer_and_none_is_saved(version):
    """Why DDP syncs no buffers before each forward, and the EMA copies them once: they are constants."""
    from swin_train.models.swin import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=32,
        patch_size=2,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        version=version,
    )
    before = {name: b.clone() for name, b in model.named_buffers()}
    assert before and not set(before) & set(model.state_dict())  # derived, not saved
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
        optimizer.step()
    assert_bitwise_equal(before, dict(model.named_buffers()))


def test_ddp_is_compiled_not_wrapped_around_a_compiled_model_and_syncs_no_buffers(tmp_path):
    import torch.distributed as dist

    from swin_train.device import unwrap_model, wrap_for_training
    from swin_train.models.swin import SwinTransformer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = SwinTransformer(
            img_size=32, patch_size=4, embed_dim=24, depths=(2,), num_heads=(2,), window_size=4
        )
        wrapped = wrap_for_training(model, compile=True, distributed=True, device=torch.device("cpu"))
        ddp = wrapped._orig_mod  # torch.compile's module around DDP (compiling is lazy: nothing runs here)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is model
        assert not ddp.broadcast_buffers and ddp.gradient_as_bucket_view
        assert unwrap_model(wrapped) is model and hasattr(wrapped, "no_sync")
    finally:
        dist.destroy_process_group()


def test_amp_auto_takes_bf16_only_where_the_gpu_computes_in_it(monkeypatch):
    from swin_train.device import resolve_amp

    cuda = torch.device("cuda", 0)
    # a pre-Ampere GPU: torch says bf16 is supported, counting emulation, unless asked not to
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_amp("auto", cuda).dtype is None
    assert resolve_amp("bf16", cuda).dtype is torch.bfloat16  # asked for: emulation allowed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", cuda).dtype is torch.bfloat16


class TensorsFromHostData(TorchDispatchMode):
    """Counts tensors made from Python data (torch.tensor(...)): on a GPU, each a blocking copy to it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_evaluation_makes_no_tensor_from_host_data_per_batch():
    from swin_train.device import Amp
    from swin_train.evaluation import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 2, 2, generator=g), torch.randint(3, (4,), generator=g)) for _ in range(6)]
    made, results = [], []
    for loader in (batches[:2], batches):
        with TensorsFromHostData() as counter:
            results.append(evaluate(model, loader, device=torch.device("cpu"), amp=Amp("cpu"), num_classes=3))
        made.append(counter.count)
    assert made[0] == made[1] and [r["num_samples"] for r in results] == [8, 24]


def test_a_rank_failing_before_a_barrier_ends_every_rank_within_a_minute_with_its_one_line_error(
    shapes_root, tmp_path
):
    """Two tasks started as srun starts them (no torchrun agent to stop the other): rank 0 cannot lock the
    output folder and fails, while rank 1 waits for it in a barrier."""
    import subprocess
    import sys
    import time

    from helpers import env_for_subprocess

    from swin_train.runlock import acquire_output_lock

    out, port = tmp_path / "run", _free_port()
    lock = acquire_output_lock(out)  # as another run holding the folder would
    cmd = [sys.executable, "-m", "swin_train.cli.train", "--device", "cpu", "--data-path", str(shapes_root)]
    cmd += ["--output", str(out), *MICRO_OVERRIDES]
    procs = []
    for rank in range(2):
        env = env_for_subprocess(
            SLURM_JOB_ID="1",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    try:
        _, rank0_err = procs[0].communicate(timeout=300)  # interpreter starts on a busy machine: slow
        rank0_ended = time.monotonic()
        _, rank1_err = procs[1].communicate(timeout=60)
        assert time.monotonic() - rank0_ended < 60
    finally:
        for proc in procs:
            proc.kill()
        lock.release()
    assert [p.returncode for p in procs] == [2, 2]
    error = f"another swin-train (pid {os.getpid()} on host {socket.gethostname()}) is using {out}"
    assert rank0_err.splitlines() == [
        f"swin-train: error: {error}; wait for it to finish or choose another --output"
    ]
    assert rank1_err.splitlines() == [rank0_err.strip().replace("error: ", "error: rank 0: ", 1)]


# ---- on a GPU (scripts/gpu_check.py runs these)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_steady_state_step_never_synchronizes_and_checkpoints_hold_cpu_tensors(
    shapes_root, tmp_path
):
    import warnings

    from swin_train import trainer

    real_step, starts = trainer.train_step, []

    def recorded_step(run, batches):
        starts.append((run.state.step_in_epoch + 1, len(caught)))
        return real_step(run, batches)

    cfg = run_config(shapes_root, tmp_path / "run", "amp=auto")
    torch.cuda.set_sync_debug_mode("warn")  # a warning for every operation that waits for the GPU
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            patch.object(trainer, "train_step", recorded_step),
        ):
            warnings.simplefilter("always")
            trainer.train(cfg, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = {step: after - before for (step, before), (_, after) in zip(starts, starts[1:])}
    steady = steady_steps(syncs)
    assert len(steady) >= 20 and set(steady.values()) == {0}, (steady, [str(w.message) for w in caught][:5])
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)  # no map_location: as saved
    devices = {t.device.type for t in _tensors_in(state)}
    assert devices == {"cpu"}


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value)
