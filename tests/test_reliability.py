"""Crash safety: SIGTERM, a rank killed under torchrun --max-restarts, damaged and malicious checkpoints,
and one-line errors for bad input."""

import os
import shutil
import signal
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

from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.train import cli as train_cli

COMMON = [*MICRO_OVERRIDES, "data.batch_size=32", "train.epochs=2"]


def _wait_for(path: Path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared"
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(shapes_root, tmp_path_factory):
    """An uninterrupted 2-epoch run (64 steps) with step checkpoints every 5 steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_cli(
        "train", "--data-path", shapes_root, "--output", out, *COMMON, "train.checkpoint_every_steps=5"
    )
    assert done.returncode == 0, done.stderr
    return out


def test_sigterm_checkpoints_exits_143_and_resumes_bitwise(shapes_root, tmp_path, reference):
    out = tmp_path / "run"
    args = ["--data-path", str(shapes_root), "--output", str(out), *COMMON, "train.checkpoint_every_steps=5"]
    cmd = [sys.executable, "-m", "swin_train.cli.train", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for_subprocess()
    )
    _wait_for(out / "step-000000005.pth", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    assert "stop requested (SIGTERM): checkpoint written at global step" in output
    stopped_at = torch.load(max(out.glob("step-*.pth")), weights_only=True)["train_state"]["global_step"]
    assert stopped_at < 64
    resumed = run_cli("train", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"global step {stopped_at})" in resumed.stdout
    assert_bitwise_equal(weights(reference / "last.pth"), weights(out / "last.pth"))


def test_keeps_only_the_newest_step_checkpoints(reference):
    steps = sorted(p.name for p in reference.glob("step-*.pth"))
    assert steps == ["step-000000050.pth", "step-000000055.pth", "step-000000060.pth"]  # keep_checkpoints=3
    assert not list(reference.glob(".*tmp*"))


def test_a_resume_prunes_what_a_kill_before_pruning_left(reference, tmp_path):
    """Killed after writing a step checkpoint but before deleting the oldest: the resumed run, even one
    with no step left to train (so no new step checkpoint to prune after), keeps only the newest."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.copy(out / "step-000000050.pth", out / "step-000000045.pth")
    data_path = torch.load(reference / "best.pth", weights_only=True)["config"]["data"]["data_path"]
    args = ["--data-path", data_path, "--output", str(out), *COMMON, "train.checkpoint_every_steps=5"]
    done = run_cli("train", *args)
    assert done.returncode == 0, done.stderr
    steps = sorted(p.name for p in out.glob("step-*.pth"))
    assert steps == ["step-000000050.pth", "step-000000055.pth", "step-000000060.pth"]
    assert "step-000000045.pth: train.keep_checkpoints=3" in (out / "log.txt").read_text()


def test_truncated_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("last.pth", "best.pth"):  # both hold step 64; the newest intact one is step 60
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    args = ["--output", str(out), *COMMON, "train.checkpoint_every_steps=5"]
    data_path = torch.load(reference / "best.pth", weights_only=True)["config"]["data"]["data_path"]
    done = run_cli("train", "--data-path", data_path, *args)
    assert done.returncode == 0, done.stderr
    assert "last.pth is not a readable checkpoint" in done.stdout + done.stderr
    assert "resuming from" in done.stdout and "step-000000060.pth" in done.stdout
    assert_bitwise_equal(weights(reference / "last.pth"), weights(out / "last.pth"))


def _worker_pids(output_dir: Path, rank: int) -> list[int]:
    """Processes started by torchrun for `rank` of the run writing to output_dir (read from /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            str(output_dir) in cmdline
            and f"RANK={rank}".encode() in environ
            and "torch.distributed.run" not in cmdline
        ):
            pids.append(int(proc.name))
    return pids


def test_killed_rank_is_restarted_by_torchrun_and_the_run_finishes(shapes_root, tmp_path):
    out = tmp_path / "elastic"
    cmd = torchrun_command(
        2,
        "train",
        "--data-path",
        shapes_root,
        "--output",
        out,
        *MICRO_OVERRIDES,
        "data.batch_size=16",
        "train.epochs=2",
        extra=("--max-restarts=3",),
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for_subprocess()
    )
    _wait_for(out / "last.pth", proc)  # epoch 0 done and saved
    victims = _worker_pids(out, rank=1)
    assert victims, "no rank-1 worker found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from" in output
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["train_state"]["epoch"] == 2 and state["train_state"]["global_step"] == 2 * (1024 // 32)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Evil(marker)}, evil)  # what a booby-trapped .pth from the internet looks like
    assert (
        train_cli(["--resume", str(evil), "--output", str(tmp_path / "o"), *COMMON, "data.dataset=shapes"])
        == 2
    )
    assert eval_cli(["--checkpoint", str(evil), "--model", "swin_tiny_patch4_window7_224"]) == 2
    err = capsys.readouterr().err
    assert err.count("refusing to load") == 2 and "could run code" in err and "Traceback" not in err
    assert not marker.exists()


def _bad_image_folder(root: Path, shapes_root: Path) -> Path:
    shutil.copytree(shapes_root, root)
    (root / "train" / "star" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_config", "config file not found"),
        ("yaml_syntax", "bad.yaml:3: invalid YAML"),
        ("unknown_key", "did you mean 'train.epochs'"),
        ("wrong_type", "train.epochs must be an int"),
        ("impossible_arch", "model.num_heads[0]=3 does not divide stage 0 width 32"),
        ("missing_data", "does not exist or is not a folder"),
        ("no_val", "has no val/ subfolder"),
        ("empty_class", "no images"),
        ("bad_image", "broken.png"),
        ("class_count", "the data has 8 classes but model.num_classes is 5"),
        ("missing_checkpoint", "does not exist"),
        ("not_a_checkpoint", "is not a readable checkpoint"),
        (
            "shape_mismatch",
            "'layers.0.blocks.0.attn.relative_position_bias_table' has shape (49, 2), the model (9, 2)",
        ),
        ("unwritable_output", "is not writable"),
        ("flex_on_cpu", "model.attention=flex needs a CUDA GPU"),
    ],
)
def test_bad_input_is_one_line_exit_2(case, message, tmp_path, shapes_root, capsys):
    data, out = str(shapes_root), str(tmp_path / "out")
    extra: list[str] = []
    config = None
    if case == "missing_config":
        config = str(tmp_path / "nope.yaml")
    elif case == "yaml_syntax":
        (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")
        config = str(tmp_path / "bad.yaml")
    elif case == "unknown_key":
        extra = ["train.epoch=3"]
    elif case == "wrong_type":
        extra = ["train.epochs=ten"]
    elif case == "impossible_arch":
        extra = ["model.num_heads=[3,4]"]  # any window and image size build (the model pads)
    elif case == "flex_on_cpu":
        extra = ["model.attention=flex"]
    elif case == "missing_data":
        data = str(tmp_path / "nowhere")
    elif case == "no_val":
        shutil.copytree(shapes_root / "train", tmp_path / "d" / "train")
        data = str(tmp_path / "d")
    elif case == "empty_class":
        shutil.copytree(shapes_root, tmp_path / "d")
        for f in (tmp_path / "d" / "val" / "ring").iterdir():
            f.unlink()
        data = str(tmp_path / "d")
    elif case == "bad_image":
        data = str(_bad_image_folder(tmp_path / "d", shapes_root))
        extra = ["train.epochs=1"]
    elif case == "class_count":
        extra = ["model.num_classes=5"]
    elif case == "missing_checkpoint":
        extra = ["--resume", str(tmp_path / "none.pth")]
    elif case == "not_a_checkpoint":
        (tmp_path / "junk.pth").write_bytes(os.urandom(1000))
        extra = ["--resume", str(tmp_path / "junk.pth")]
    elif case == "shape_mismatch":
        assert train_cli(["--data-path", data, "--output", out, *COMMON, "train.epochs=1"]) == 0
        capsys.readouterr()
        extra = ["--resume", str(Path(out) / "last.pth"), "model.window_size=2"]
        out = str(tmp_path / "out2")
    elif case == "unwritable_output":
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "run")
    args = ["--data-path", data, "--output", out, *COMMON, *extra]
    if config:
        args = ["--config", config, *args]
    assert train_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("swin-train: error:") and message in err and "Traceback" not in err


def test_skip_bad_images_logs_and_trains(tmp_path, shapes_root, capsys):
    data = _bad_image_folder(tmp_path / "d", shapes_root)
    out = tmp_path / "out"
    args = [
        "--data-path",
        str(data),
        "--output",
        str(out),
        *COMMON,
        "train.epochs=1",
        "data.skip_bad_images=true",
    ]
    assert train_cli(args) == 0
    assert "broken.png" in capsys.readouterr().out + (out / "log.txt").read_text()


def test_debug_shows_the_traceback(tmp_path):
    done = run_cli(
        "train", "--debug", "--data-path", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), *COMMON
    )
    assert done.returncode != 0 and "Traceback" in done.stderr and "DataError" in done.stderr


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(shapes_root, tmp_path, capsys):
    out = tmp_path / "nan"
    # an absurd lr makes the weights blow up; every later step is non-finite
    args = [
        "--data-path",
        str(shapes_root),
        "--output",
        str(out),
        *COMMON,
        "train.epochs=2",
        "train.base_lr=1e30",
        "train.warmup_lr=1e30",
        "train.min_lr=1e30",
        "train.clip_grad=null",
        "train.max_nonfinite_steps=4",
    ]
    assert train_cli(args) == 2
    err = capsys.readouterr().err
    assert "4 optimizer steps in a row had a non-finite loss or gradient" in err


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(shapes_root, tmp_path):
    out = tmp_path / "ddp-stop"
    args = [
        "--data-path",
        str(shapes_root),
        "--output",
        str(out),
        *MICRO_OVERRIDES,
        "data.batch_size=16",
        "train.epochs=2",
        "train.checkpoint_every_steps=5",
    ]
    cmd = torchrun_command(2, "train", *args)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for_subprocess()
    )
    _wait_for(out / "step-000000005.pth", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    output, _ = proc.communicate(timeout=120)
    assert "stop requested (SIGTERM): checkpoint written at global step" in output
    newest = max(out.glob("step-*.pth"))
    state = torch.load(newest, weights_only=True)
    assert 5 <= state["train_state"]["global_step"] < 64 and len(state["rng"]) == 2
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_for_subprocess())
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {newest}" in done.stdout
    assert torch.load(out / "last.pth", weights_only=True)["train_state"]["global_step"] == 64
