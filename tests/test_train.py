"""swin-train / swin-eval end to end on micro models (CPU)."""

import json
import os
import shutil
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
    torchrun,
    torchrun_command,
    weights,
)

from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.train import cli as train_cli


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_args(data, out, *extra):
    return ["--data-path", str(data), "--output", str(out), *MICRO_OVERRIDES, "data.batch_size=32", *extra]


def test_short_run_learns_and_writes_its_outputs(shapes_root, tmp_path, capsys):
    out = tmp_path / "run"
    learn_fast = ["train.base_lr=3e-3", "aug.crop_scale=[0.8,1.0]", "model.drop_path_rate=0"]
    assert train_cli(_train_args(shapes_root, out, "train.epochs=5", *learn_fast)) == 0
    records = _records(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.15
    assert records[-1]["val_top1"] >= 0.25 and records[-1]["val_top1"] > records[0]["val_top1"]  # chance: 1/8
    assert all(r["val_num_samples"] == 128 for r in records)
    for name in ("last.pth", "best.pth", "config.yaml", "log.txt"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["train_state"]["epoch"] == 5 and state["train_state"]["global_step"] == 5 * 32
    assert state["class_names"] == ["circle", "cross", "hbar", "ring", "square", "star", "triangle", "vbar"]
    assert state["preprocess"]["img_size"] == 32 and state["config"]["train"]["epochs"] == 5
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["best"]["top1"] == max(r["val_top1"] for r in records)
    logged = capsys.readouterr().out
    assert "effective lr: lr 3e-3 x (32 x 1 procs x 1 accum / 32) = 3e-3" in logged
    assert "done: top-1" in logged

    # swin-eval on the checkpoint reproduces the last validation exactly
    metrics = tmp_path / "m.json"
    assert eval_cli(["--checkpoint", str(out / "last.pth"), "--metrics-json", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["num_samples"] == 128
    assert m["top1"] == records[-1]["val_top1"] and m["top5"] == records[-1]["val_top5"]
    assert m["loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-6)


def test_bf16_autocast_and_accumulation_on_cpu(shapes_root, tmp_path, capsys):
    out = tmp_path / "bf16"
    args = _train_args(
        shapes_root, out, "train.epochs=1", "amp=bf16", "train.accumulation_steps=2", "data.batch_size=16"
    )
    assert train_cli(args) == 0
    (record,) = _records(out)
    assert record["train_nonfinite_steps"] == 0
    assert torch.load(out / "last.pth", weights_only=True)["train_state"]["global_step"] == 1024 // 32
    assert "amp bf16" in capsys.readouterr().out


def test_fewer_than_five_classes_reports_top_k(tmp_path, shapes_root, capsys):
    data = tmp_path / "three"
    for split in ("train", "val"):
        for name in ("circle", "square", "cross"):
            shutil.copytree(shapes_root / split / name, data / split / name)
    out = tmp_path / "run"
    assert train_cli(_train_args(data, out, "train.epochs=1", "model.num_classes=3")) == 0
    logged = capsys.readouterr().out
    assert "only 3 classes: 'top5' is reported as top-3" in logged
    assert _records(out)[0]["val_topk"] == 3


def test_data_and_model_class_counts_must_agree(shapes_root, tmp_path, capsys):
    assert train_cli(_train_args(shapes_root, tmp_path / "x", "model.num_classes=10")) == 2
    err = capsys.readouterr().err
    assert "the data has 8 classes but model.num_classes is 10; set model.num_classes=8" in err
    assert "Traceback" not in err


def test_a_cpu_split_the_model_cannot_take_is_one_line_and_nothing_is_trained(shapes_root, tmp_path, capsys):
    out = tmp_path / "x"
    assert train_cli(_train_args(shapes_root, out, "train.cpu_split=2", "model.drop_rate=0.1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.cpu_split=2 cannot apply: dropout draws from the generator the threads share" in err
    assert not (out / "last.pth").exists()


def _children(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def _kill_when(proc, path, timeout=240):
    """kill -9 `proc` as soon as `path` exists; fails if the run ended first (the test would prove nothing)."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "kill_at, extra",
    [
        ("last.pth", ["data.num_workers=0"]),  # epoch boundary
        ("step-000000017.pth", ["train.checkpoint_every_steps=17", "data.num_workers=2"]),  # mid-epoch 1
        # Swin V2 under bf16 autocast (its logit scale in fp32), mid-epoch 1
        ("step-000000017.pth", ["model.version=2", "amp=bf16", "train.checkpoint_every_steps=17"]),
    ],
    ids=["epoch-boundary", "mid-epoch-workers", "swinv2-bf16-mid-epoch"],
)
def test_resume_after_kill_9_is_bitwise(shapes_root, tmp_path, kill_at, extra):
    common = [
        *MICRO_OVERRIDES,
        "data.batch_size=32",
        "train.epochs=2",
        "aug.mixup=0.8",
        "aug.cutmix=1.0",
        "train.ema=true",
        "train.ema_decay=0.9",
        "train.cpu_split=2",  # stochastic depth in two threads at once (cpu_split.py), on any core count
        *extra,
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli("train", "--data-path", shapes_root, "--output", ref, *common)
    assert done.returncode == 0, done.stderr

    cmd = [
        sys.executable,
        "-m",
        "swin_train.cli.train",
        "--data-path",
        str(shapes_root),
        "--output",
        str(run),
        *common,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for_subprocess()
    )
    _kill_when(proc, run / kill_at)
    host = socket.gethostname().replace("-", "_")
    left_behind = run / f".last.pth.tmp-{host}-{proc.pid}-0badf00d"  # as if killed while writing last.pth
    left_behind.write_bytes(b"partial")
    resumed = run_cli("train", "--data-path", shapes_root, "--output", run, *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert not left_behind.exists() and f"removed {left_behind}" in (run / "log.txt").read_text()

    assert_bitwise_equal(weights(ref / "last.pth"), weights(run / "last.pth"))
    a, b = (torch.load(d / "last.pth", weights_only=True) for d in (ref, run))
    assert a["train_state"] == b["train_state"] and a["schedule"] == b["schedule"]
    assert_bitwise_equal(a["ema"]["module"], b["ema"]["module"])
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 2 * 32
    assert all(
        torch.equal(x, y) for x, y in zip(_flat(a["optimizer"]["state"]), _flat(b["optimizer"]["state"]))
    )
    timing = ("train_img_s", "train_epoch_time")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(_records(ref)) == strip(_records(run))


def _flat(optimizer_state):
    return [t for i in sorted(optimizer_state) for _, t in sorted(optimizer_state[i].items())]


def test_torchrun_two_processes_train_and_evaluate(shapes_root, tmp_path):
    out = tmp_path / "ddp"
    done = torchrun(2, "train", *_train_args(shapes_root, out, "train.epochs=2", "data.batch_size=16"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(out)
    assert len(records) == 2 and records[-1]["val_num_samples"] == 128
    assert "x 2 processes" in done.stdout and "(16 x 2 procs x 1 accum / 32)" in done.stdout
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["train_state"]["global_step"] == 2 * (1024 // 32)


def test_distributed_eval_is_exact_for_any_world_size(shapes_root, tmp_path):
    # 127 val images: not divisible by 2, 3 or 4 processes; a padding sampler would count duplicates
    data = tmp_path / "odd"
    shutil.copytree(shapes_root, data)
    next((data / "val" / "star").iterdir()).unlink()
    out = tmp_path / "run"
    assert train_cli(_train_args(data, out, "train.epochs=1")) == 0
    results = {}
    for world in (1, 2, 3):
        metrics = tmp_path / f"m{world}.json"
        args = ["--checkpoint", out / "last.pth", "--metrics-json", metrics]
        if world == 1:  # in this process: one interpreter start fewer
            assert eval_cli(list(map(str, args))) == 0
        else:
            done = torchrun(world, "eval", *args)
            assert done.returncode == 0, done.stderr[-3000:]
        results[world] = json.loads(metrics.read_text())
    assert {r["num_samples"] for r in results.values()} == {127}
    for world in (2, 3):
        assert results[world]["top1"] == results[1]["top1"] and results[world]["top5"] == results[1]["top5"]
        assert results[world]["loss"] == pytest.approx(
            results[1]["loss"], rel=1e-6
        )  # fp32 sums differ by batch


def test_ema_is_validated_selects_best_and_is_evaluated(shapes_root, tmp_path, capsys):
    out = tmp_path / "ema"
    args = _train_args(
        shapes_root, out, "train.epochs=2", "train.ema=true", "train.ema_decay=0.8", "train.best_on=ema"
    )
    assert train_cli(args) == 0
    records = _records(out)
    assert all("ema_top1" in r and "ema_top5" in r for r in records)
    assert any(r["ema_top1"] != r["val_top1"] or r["ema_loss"] != r["val_loss"] for r in records)
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["best"]["on"] == "ema" and best["best"]["top1"] == max(r["ema_top1"] for r in records)
    assert "ema top-1" in capsys.readouterr().out
    metrics = tmp_path / "ema.json"
    assert eval_cli(["--checkpoint", str(out / "last.pth"), "--ema", "--metrics-json", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["top1"] == records[-1]["ema_top1"] and m["loss"] == pytest.approx(
        records[-1]["ema_loss"], rel=1e-6
    )


def test_quickstart_config_end_to_end(tmp_path):
    """The README's first command (cut to two epochs for CI time), then swin-eval on its checkpoint."""
    env = env_for_subprocess(SWIN_TRAIN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "qs"
    done = run_cli(
        "train",
        "--config",
        Path(__file__).parents[1] / "configs" / "quickstart.yaml",
        "--output",
        out,
        "train.epochs=2",
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: top-1" in done.stdout
    first, record = _records(out)
    assert record["val_num_samples"] == 800 and record["val_top1"] > max(
        0.3, first["val_top1"]
    )  # chance: 1/8
    evaluated = run_cli("eval", "--checkpoint", out / "best.pth", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"top-1 {100 * record['val_top1']:.3f}%" in evaluated.stdout
    assert f"loss {record['val_loss']:.4f}" in evaluated.stdout  # the same pixels and parts as the trainer


def test_torchrun_resume_after_kill_9_is_bitwise(shapes_root, tmp_path):
    """Two processes, killed (the whole group, as a lost node would be) mid-epoch, then relaunched."""
    args = [
        *_train_args(
            shapes_root,
            tmp_path / "ref",
            "train.epochs=2",
            "data.batch_size=16",
            "train.checkpoint_every_steps=10",
        )
    ]
    done = torchrun(2, "train", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    args = [
        *_train_args(
            shapes_root, out, "train.epochs=2", "data.batch_size=16", "train.checkpoint_every_steps=10"
        )
    ]
    cmd = torchrun_command(2, "train", *args)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_for_subprocess(),
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (out / "step-000000040.pth").exists():  # epoch 1, step 8 of 32
        assert proc.poll() is None and time.time() < deadline, "run ended before the checkpoint appeared"
        time.sleep(0.01)
    workers = _children(proc.pid)  # torchrun starts each in a session of its own: killpg misses them
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        os.killpg(pid, signal.SIGKILL)  # the worker and its data loader processes
    proc.wait()
    resumed = torchrun(2, "train", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_bitwise_equal(weights(tmp_path / "ref" / "last.pth"), weights(out / "last.pth"))


def test_synthetic_data_measures_the_loop_and_eval_throughput(tmp_path, capsys):
    out = tmp_path / "synthetic"
    args = [
        "--output",
        str(out),
        *MICRO_OVERRIDES,
        "data.synthetic=true",
        "data.batch_size=8",
        "train.epochs=1",
    ]
    assert train_cli(args) == 0
    (record,) = _records(out)
    assert record["train_img_s"] > 0 and record["val_num_samples"] == 4 * 8
    capsys.readouterr()
    assert eval_cli(["--checkpoint", str(out / "last.pth"), "--throughput", "--batch-size", "4"]) == 0
    assert "throughput:" in capsys.readouterr().out


def test_create_model_loads_a_checkpoint(tmp_path, micro_arch):
    from swin_train import create_model

    source = create_model(**micro_arch, num_classes=3).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    loaded = create_model(**micro_arch, num_classes=3, checkpoint=str(tmp_path / "w.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
