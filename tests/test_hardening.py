"""Fixes from an adversarial run (issue #14): each test names the hostile input and what must happen."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import env_for_subprocess, image_folder, png, two_class_train_args

from swin_train import create_model
from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.export import cli as export_cli
from swin_train.cli.predict import cli as predict_cli
from swin_train.cli.train import cli as train_cli
from swin_train.config import config_diff, load_config
from swin_train.data.folder import scan_image_folder
from swin_train.data.loader import usable_workers
from swin_train.device import resolve_amp
from swin_train.errors import ConfigError
from swin_train.metrics import StepMeter
from swin_train.models.convert import to_layout
from swin_train.stopping import Stopper

CLASSES = ("cat", "dog")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


# 1. a directory link inside a class folder


def test_a_symlink_loop_in_a_class_folder_neither_multiplies_nor_mislabels(tmp_path, caplog):
    root = image_folder(tmp_path / "data")
    (root / "train" / "cat" / "loop").symlink_to("..")  # DATA/train/cat/loop -> DATA/train
    (root / "train" / "dog" / "again").symlink_to(root / "train" / "dog")  # a link to itself: a duplicate
    outside = tmp_path / "more_cats"
    png(outside / "extra.png", 7)
    (root / "train" / "cat" / "more").symlink_to(outside)  # a link out of the data set is followed
    classes, samples = scan_image_folder(root / "train")
    assert classes == list(CLASSES)
    assert sum(label == 0 for _, label in samples) == 9 and sum(label == 1 for _, label in samples) == 8
    assert not any("dog" in path for path, label in samples if label == 0)
    skipped = [r.getMessage() for r in caplog.records if "skipped directory link" in r.getMessage()]
    assert len(skipped) == 2 and any("loop" in m for m in skipped) and any("again" in m for m in skipped)


# 2. two runs in one output folder


def test_a_second_run_in_a_busy_output_folder_fails_at_once(tmp_path):
    data, out = image_folder(tmp_path / "data", train=64), tmp_path / "run"
    cmd = [sys.executable, "-m", "swin_train.cli.train", *two_class_train_args(data, out, "train.epochs=50")]
    first = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env_for_subprocess()
    )
    try:
        deadline = time.time() + 120
        while not (out / "log.txt").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env_for_subprocess(), timeout=120)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1
        assert f"another swin-train (pid {first.pid} on host" in second.stderr and str(out) in second.stderr
    finally:
        first.kill()
        first.wait()
    # the holder was killed (-9): its lock is stale, the next run takes it (a whole run: test_runlock.py)
    from swin_train.runlock import acquire_output_lock

    acquire_output_lock(out).release()


# 3. YAML aliases


def test_yaml_alias_bomb_is_refused_with_a_short_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 12)
    ]
    lines += ["model:", "  name: *a11"]
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml:2: YAML aliases \(\*a0\) are not supported"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="YAML aliases") as error:
        load_config(None, ["train.betas=[&b 0.9, *b]"])
    assert len(str(error.value)) < 200


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.name=" + "x" * 5000])
    assert "x" * 100 not in str(error.value) and "\n" not in str(error.value)


# 4. devices and precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [train_cli, eval_cli])
def test_cuda_without_a_gpu_is_one_line_exit_2(command, tmp_path, capsys):
    args = two_class_train_args(image_folder(tmp_path / "data"), tmp_path / "run")
    if command is eval_cli:
        args = ["--checkpoint", str(tmp_path / "x.pth"), "--device", "cuda"]
    assert command([*args, "--device", "cuda"]) == 2
    assert "no CUDA device is available" in _error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("setting", ["amp=fp16", "model.attention=flex"])
def test_a_run_this_machine_cannot_do_writes_nothing(setting, tmp_path, capsys):
    args = two_class_train_args(image_folder(tmp_path / "data"), tmp_path / "run")
    assert train_cli([*args, setting]) == 2
    assert "needs a CUDA GPU" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_impossible_precision_and_device_pairs_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="amp=fp16 needs a CUDA GPU"):
        resolve_amp("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 does not support bfloat16; use amp=fp16"):
        resolve_amp("bf16", torch.device("cuda", 0))
    assert resolve_amp("auto", torch.device("cuda", 0)).name == "none"  # auto falls back, no error


def test_flex_below_sm80_is_refused(monkeypatch):
    import torch.utils._triton

    from swin_train.device import check_attention_backend
    from swin_train.models import flex

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(flex, "flex_attention", flex.flex_attention or object())
    with pytest.raises(ConfigError, match=r"compute capability 8\.0\+"):
        check_attention_backend("flex", 0.0, torch.device("cuda", 0))


# 5. weights that load back


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    data, out = image_folder(root / "data"), root / "run"
    assert train_cli(two_class_train_args(data, out)) == 0
    return data, out


def test_own_safetensors_export_loads_in_eval_and_predict_with_its_metadata(trained_run, tmp_path, capsys):
    data, out = trained_run
    exported = tmp_path / "w.safetensors"
    assert (
        export_cli(["--checkpoint", str(out / "last.pth"), "--format", "safetensors", "--out", str(exported)])
        == 0
    )
    assert stat.S_IMODE(exported.stat().st_mode) == stat.S_IMODE((out / "last.pth").stat().st_mode)
    capsys.readouterr()
    for checkpoint in (out / "last.pth", exported):
        metrics = tmp_path / f"{checkpoint.suffix}.json"
        assert (
            eval_cli(["--checkpoint", str(checkpoint), "--metrics-json", str(metrics), "--device", "cpu"])
            == 0
        )
    assert json.loads((tmp_path / ".pth.json").read_text()) == json.loads(
        (tmp_path / ".safetensors.json").read_text()
    )
    capsys.readouterr()
    assert (
        predict_cli(["--checkpoint", str(exported), str(data / "val" / "cat"), "--json", "--device", "cpu"])
        == 0
    )
    document = json.loads(capsys.readouterr().out)
    assert len(document["predictions"]) == 4 and document["predictions"][0]["topk"][0]["class"] in CLASSES


def test_a_head_of_another_size_names_the_setting_to_pass(tmp_path, capsys):
    model = create_model("swin_tiny_patch4_window7_224", num_classes=2)
    torch.save(to_layout(model.state_dict(), "timm"), tmp_path / "timm2.pth")
    code = eval_cli(
        [
            "--checkpoint",
            str(tmp_path / "timm2.pth"),
            "--model",
            "swin_tiny_patch4_window7_224",
            "--throughput",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert "has 2 classes, the model 1000: pass model.num_classes=2" in _error(capsys)


def test_eval_refuses_a_model_that_contradicts_the_checkpoint(trained_run, capsys):
    _, out = trained_run
    code = eval_cli(["--checkpoint", str(out / "last.pth"), "--model", "swin_tiny_patch4_window7_224"])
    assert code == 2
    assert "own architecture, which --model swin_tiny_patch4_window7_224 contradicts" in _error(capsys)


# 6. one class


def test_a_one_class_data_set_is_refused(tmp_path, capsys):
    data = image_folder(tmp_path / "data", classes=("cat",))
    assert train_cli(two_class_train_args(data, tmp_path / "run", "model.num_classes=1")) == 2
    assert "needs at least 2 classes" in _error(capsys)


# 7. a damaged best.pth after a fallback resume


def test_a_damaged_checkpoint_is_moved_aside_and_best_is_rewritten(trained_run, tmp_path, capsys):
    data, done = trained_run
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pth", "best.pth"):
        (out / name).write_bytes((done / name).read_bytes())
    (out / "best.pth").write_bytes(b"garbage" * 100)
    os.utime(out / "best.pth", None)
    assert train_cli(two_class_train_args(data, out, "train.epochs=2")) == 0
    logged = capsys.readouterr().out
    assert "moved" in logged and "best.pth.damaged" in logged
    assert (out / "best.pth.damaged").read_bytes() == b"garbage" * 100
    assert torch.load(out / "best.pth", weights_only=True)["train_state"]["epoch"] == 2
    assert eval_cli(["--checkpoint", str(out / "best.pth"), "--device", "cpu"]) == 0


# 8. Ctrl-C feedback


def test_first_ctrl_c_says_what_happens_and_the_second_aborts(caplog):
    caplog.set_level("WARNING", logger="swin_train")  # the lines go to the log (and log.txt), not bare stderr
    with Stopper(steps_unsaved=lambda: 17) as stopper:
        os.kill(os.getpid(), signal.SIGINT)
        assert stopper.requested and stopper.exit_code == 130
        err = caplog.text
        caplog.clear()
        assert "SIGINT received: stopping with a checkpoint after this step or validation" in err
        assert "press Ctrl-C again to abort (the last 17 steps are lost)" in err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with Stopper() as stopper:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning before the time limit
        assert stopper.exit_code == 138 and "Ctrl-C" not in caplog.text


# 9. what differs on resume


def test_config_differences_are_listed_old_to_new():
    old = {"train": {"epochs": 300, "base_lr": 5e-4}, "seed": 0}
    new = {"train": {"epochs": 100, "base_lr": 5e-4}, "seed": 1}
    assert config_diff(old, new) == ["train.epochs: 300 -> 100", "seed: 0 -> 1"]


# 10. smaller ones


def test_zero_byte_image_error_names_the_file_not_a_file_object(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    (data / "train" / "cat" / "empty.png").write_bytes(b"")
    assert train_cli(two_class_train_args(data, tmp_path / "run")) == 2
    err = _error(capsys)
    assert "empty.png" in err and "BufferedReader" not in err and "not an image file PIL can identify" in err


def test_infinite_learning_rate_is_called_a_number_that_is_not_finite():
    with pytest.raises(ConfigError, match=r"train\.base_lr must be a finite number > 0, got inf"):
        load_config(None, ["train.base_lr=inf"])


def test_a_run_that_cannot_start_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(["--output", str(out), "--device", "cpu"]) == 2
    assert "no data path" in _error(capsys)
    assert not out.exists()


def test_step_lines_report_the_window_since_the_last_line():
    now = [0.0]
    meter = StepMeter(clock=lambda: now[0])
    for seconds, images in ((1.0, 10), (1.0, 10), (0.1, 10)):  # a fast step after two slow ones
        now[0] += seconds
        meter.add(images)
    assert meter.window_rate() == pytest.approx(30 / 2.1)
    now[0] += 2.0
    meter.add(10)
    assert meter.window_rate() == pytest.approx(5.0) and meter.rate == pytest.approx(40 / 4.1)


def test_loader_workers_are_sized_to_the_machine():
    cpus = len(os.sched_getaffinity(0))
    assert usable_workers(cpus + 6) == cpus and usable_workers(1) == 1 and usable_workers(0) == 0


def test_a_cut_off_metrics_line_is_dropped_on_resume_not_fatal(tmp_path):
    from swin_train.metrics import Metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "val_top1": 0.5}\n{"epoch": 1, "val_to')
    with Metrics(tmp_path, True, epoch=1, global_step=10):
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 0, "val_top1": 0.5}\n'
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_console_command_exits_with_its_code_after_atexit_handlers_and_buffered_output():
    """exit_process skips the interpreter's teardown, not what a command still has to say or flush."""
    code = (
        "import atexit, logging, sys\n"
        "from swin_train.cli.common import exit_process, setup_logging\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "setup_logging().info('logged')\n"
        "sys.stdout.write('buffered, no newline')\n"
        "sys.stderr.write('to stderr')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env_for_subprocess(), timeout=120
    )
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["logged", "buffered, no newlineatexit ran"]
    assert done.stderr == "to stderr"


def test_a_closed_pipe_ends_a_command_quietly_with_141():
    """`swin-predict ... | head`: the reader leaves early; the command stops without a traceback."""
    script = textwrap.dedent(
        """
        from swin_train.cli.common import exit_process, run_cli

        def main(argv):
            for i in range(200_000):
                print(f"line {i} " + "x" * 60)

        exit_process(run_cli("swin-predict", main, []))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for_subprocess(),
    )
    assert proc.stdout.read(100).startswith(b"line 0")
    proc.stdout.close()  # what `head` does once it has its lines
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
