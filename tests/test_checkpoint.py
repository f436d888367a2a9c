"""Tests for swin_train.checkpoint: atomic save, safe load, resume candidates, pruning, RNG state."""

from __future__ import annotations

import collections
import errno
import logging
import os
import pathlib
import pickle
import random
import resource
import signal
import socket
import stat
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from swin_train import checkpoint as ck
from swin_train.checkpoint import (
    capture_rng_state,
    check_output_writable,
    checkpoint_candidates,
    ensure_plain,
    find_resume_checkpoint,
    load_checkpoint,
    prune_step_checkpoints,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
)
from swin_train.errors import CheckpointError


def _state(step: int, n: int = 64) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g)}, "epoch": step // 10, "global_step": step}


class _Evil:
    """A pickle payload that creates `marker` when unpickled by an unsafe loader."""

    def __init__(self, fn, marker: pathlib.Path):
        self.fn, self.marker = fn, marker

    def __reduce__(self):
        if self.fn is open:
            return (open, (str(self.marker), "w"))
        return (pathlib.Path.touch, (self.marker,))


class _Foo:
    pass


class _ListLogger:
    def __init__(self):
        self.warnings: list[str] = []

    def warning(self, msg, *args):
        self.warnings.append(msg % args)


# ------------------------------------------------------------------------------------------ save


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    save_checkpoint(_state(2), path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    loaded = load_checkpoint(path)
    assert loaded["global_step"] == 2
    assert torch.equal(loaded["model"]["w"], _state(2)["model"]["w"])


def test_save_fsyncs_file_before_rename_and_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(_state(1), tmp_path / "last.pth")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_disk_full_midway_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    old_bytes = path.read_bytes()
    temps: list[pathlib.Path] = []

    def full_disk_save(obj, f):
        f.write(b"\0" * 4096)
        f.flush()
        temps.append(pathlib.Path(f.name))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_state(2), path)
    assert str(info.value) == (
        f"could not write checkpoint {path}: No space left on device; free space or change --output"
    )
    # the partial write went to a temp file in the same folder, which is gone now
    assert len(temps) == 1 and temps[0].parent == tmp_path and temps[0].name.startswith(".last.pth.tmp-")
    assert not temps[0].exists()
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_real_write_failure_inside_torch_save(tmp_path):
    # A real OS write error through the real torch.save: the file-size limit makes write() fail with
    # EFBIG. torch.save turns it into a RuntimeError ("unexpected pos"); the message must still give the
    # OS reason.
    path = tmp_path / "last.pth"
    save_checkpoint(_state(1), path)
    old_bytes = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(_state(2, n=100_000), path)  # 400 KB of tensor data
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(info.value) == (
        f"could not write checkpoint {path}: File too large; check the output folder or change --output"
    )
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_save_into_path_under_a_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*: Not a directory"):
        save_checkpoint(_state(1), tmp_path / "file" / "last.pth")


# ---------------------------------------------------------------------------------- plain data


def test_ensure_plain_accepts_real_training_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
        "param": torch.nn.Parameter(torch.ones(2)),
        "rng": capture_rng_state(),
        "config": {"model": {"depths": (2, 2, 6, 2)}, "output": "runs/x", "seed": None},
    }
    ensure_plain(state)  # does not raise


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"config": {"x": _Foo()}}, f"checkpoint['config']['x'] is a {__name__}._Foo;"),
        ({"config": {"lr": np.float64(0.1)}}, "checkpoint['config']['lr'] is a numpy.float64;"),
        ({"a": [1, (2, pathlib.PurePosixPath("p"))]}, "checkpoint['a'][1][1] is a pathlib.PurePosixPath;"),
        ({"a": collections.namedtuple("P", "x")(1)}, f"checkpoint['a'] is a {__name__}.P;"),
        ({"a": {_Foo: 1}}, "checkpoint['a'] has a key"),
    ],
)
def test_ensure_plain_names_the_offending_path(state, message):
    with pytest.raises(TypeError) as info:
        ensure_plain(state)
    assert str(info.value).startswith(message)


def test_save_refuses_non_plain_state_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['x'\] is a "):
        save_checkpoint({"config": {"x": _Foo()}}, tmp_path / "last.pth")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- load


def test_load_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint .*nope\.pth does not exist; check the path$"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match=r"is a folder; pass the \.pth file inside it$"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "text"])
def test_load_unreadable_file_gives_one_line_error(tmp_path, kind):
    path = tmp_path / "x.pth"
    save_checkpoint(_state(1), path)
    data = {
        "garbage": np.random.default_rng(0).bytes(3000),
        "truncated": path.read_bytes()[:700],
        "empty": b"",
        "text": b"epoch: 3\nlr: 0.1\n",
    }[kind]
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert (
        str(info.value) == f"checkpoint {path} is not a readable checkpoint (truncated or not a torch file)"
    )


def test_load_rejects_non_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"holds a list, not a dict"):
        load_checkpoint(tmp_path / "list.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")
@pytest.mark.parametrize("fmt", ["torch.save", "pickle-protocol-2", "pickle-protocol-5"])
@pytest.mark.parametrize("fn", [open, pathlib.Path.touch], ids=["open", "Path.touch"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt, fn):
    # the payload really runs under an unsafe loader ...
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(fn, control), protocol=2))
    assert control.exists()
    # ... and load_checkpoint refuses it without running it
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    if fmt == "torch.save":
        torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil(fn, marker)}, path)
    else:  # no tensors: plain pickle would name torch's own rebuild function first
        path.write_bytes(pickle.dumps({"epoch": 3, "x": _Evil(fn, marker)}, protocol=int(fmt[-1])))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(info.value)
    if fmt == "pickle-protocol-5":  # STACK_GLOBAL: torch rejects the opcode before naming the import
        assert msg.endswith("is not a readable checkpoint (truncated or not a torch file)")
    else:
        name = "io.open" if fn is open else "getattr"  # Path.touch pickles as getattr(Path, 'touch')
        assert msg == (
            f"refusing to load {path}: it contains pickled Python objects (e.g. '{name}'), which could "
            "run code; only tensors and plain data are accepted"
        )


def test_load_safetensors(tmp_path):
    tensors = {"head.weight": torch.randn(3, 4), "head.bias": torch.arange(3.0)}
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_checkpoint(tmp_path / "w.safetensors")
    assert list(loaded) == ["model"]
    assert sorted(loaded["model"]) == ["head.bias", "head.weight"]
    for key, value in tensors.items():
        assert torch.equal(loaded["model"][key], value)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors is not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_load_onto_missing_device_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    save_checkpoint(_state(1), tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"^cannot load .*x\.pth onto cuda: Attempting to deserialize"):
        load_checkpoint(tmp_path / "x.pth", map_location="cuda")


# ------------------------------------------------------------------------------- output folder


def _fill_run(folder: pathlib.Path, steps=(10, 20), last: int | None = 25, best: int | None = 20) -> None:
    for step in steps:
        save_checkpoint(_state(step), folder / step_checkpoint_name(step))
    if last is not None:
        save_checkpoint(_state(last), folder / "last.pth")
    if best is not None:
        save_checkpoint(_state(best), folder / "best.pth")
    # never candidates: a crashed save's temp file, other files
    (folder / ".last.pth.tmp-123-abcd1234").write_bytes(b"partial")
    (folder / "log.txt").write_text("x")
    (folder / "step-12.pth").write_bytes(b"not our name pattern")


def test_step_checkpoint_name():
    assert step_checkpoint_name(1200) == "step-000001200.pth"


def test_candidates_order(tmp_path):
    _fill_run(tmp_path, steps=(10, 20, 25))
    names = [p.name for p in checkpoint_candidates(tmp_path)]
    # ties: last.pth, then the step file, then best.pth
    assert names == ["last.pth", "step-000000025.pth", "step-000000020.pth", "best.pth", "step-000000010.pth"]
    (tmp_path / step_checkpoint_name(25)).unlink()
    # a step file newer than last.pth comes first
    save_checkpoint(_state(30), tmp_path / step_checkpoint_name(30))
    names = [p.name for p in checkpoint_candidates(tmp_path)]
    assert names == ["step-000000030.pth", "last.pth", "step-000000020.pth", "best.pth", "step-000000010.pth"]
    # the trainer's layout keeps the step in `train_state`
    save_checkpoint({"train_state": {"epoch": 3, "global_step": 15}}, tmp_path / "last.pth")
    names = [p.name for p in checkpoint_candidates(tmp_path)]
    assert names == ["step-000000030.pth", "step-000000020.pth", "best.pth", "last.pth", "step-000000010.pth"]
    # an unreadable best.pth is tried first (and reported); a last.pth without global_step last
    (tmp_path / "best.pth").write_bytes(b"garbage")
    save_checkpoint({"model": {}}, tmp_path / "last.pth")
    names = [p.name for p in checkpoint_candidates(tmp_path)]
    assert names == ["best.pth", "step-000000030.pth", "step-000000020.pth", "step-000000010.pth", "last.pth"]
    assert checkpoint_candidates(tmp_path / "missing") == []


def test_resume_falls_back_past_truncated_and_garbage_files(tmp_path):
    _fill_run(tmp_path, steps=(10, 20, 30), last=None, best=None)
    newest, middle = tmp_path / step_checkpoint_name(30), tmp_path / step_checkpoint_name(20)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    middle.write_bytes(b"\x80\x02garbage")
    logger = _ListLogger()
    path, state = find_resume_checkpoint(tmp_path, logger=logger)
    assert path.name == "step-000000010.pth" and state["global_step"] == 10
    assert torch.equal(state["model"]["w"], _state(10)["model"]["w"])
    assert len(logger.warnings) == 2
    assert logger.warnings[0].startswith(f"checkpoint {newest} is not a readable checkpoint")
    assert logger.warnings[1].startswith(f"checkpoint {middle} is not a readable checkpoint")
    assert all(w.endswith("; trying the next older checkpoint") for w in logger.warnings)


def test_resume_prefers_last_and_uses_module_logger_by_default(tmp_path, caplog):
    _fill_run(tmp_path)
    path, state = find_resume_checkpoint(tmp_path)
    assert path.name == "last.pth" and state["global_step"] == 25
    (tmp_path / "last.pth").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="swin_train.checkpoint"):
        path, state = find_resume_checkpoint(tmp_path)
    assert path.name == "step-000000020.pth" and state["global_step"] == 20
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "last.pth is not a readable checkpoint" in caplog.records[0].getMessage()


def test_resume_with_nothing_and_with_only_broken_files(tmp_path):
    assert find_resume_checkpoint(tmp_path / "new-run") is None
    (tmp_path / ".last.pth.tmp-1-ab").write_bytes(b"partial")  # temp files are not candidates
    assert find_resume_checkpoint(tmp_path) is None
    (tmp_path / "last.pth").write_bytes(b"junk")
    (tmp_path / step_checkpoint_name(5)).write_bytes(b"junk")
    logger = _ListLogger()
    with pytest.raises(CheckpointError, match=r"^none of the 2 checkpoints in .* could be loaded"):
        find_resume_checkpoint(tmp_path, logger=logger)
    assert len(logger.warnings) == 2


def test_prune_keeps_exactly_the_newest(tmp_path):
    _fill_run(tmp_path, steps=(1, 2, 3, 4, 5, 6, 7, 1000))
    deleted = prune_step_checkpoints(tmp_path, keep=3)
    assert sorted(p.name for p in deleted) == [step_checkpoint_name(s) for s in (1, 2, 3, 4, 5)]
    assert sorted(p.name for p in tmp_path.glob("step-*.pth")) == [
        "step-000000006.pth",
        "step-000000007.pth",
        "step-000001000.pth",
        "step-12.pth",  # not a step checkpoint name: untouched
    ]
    assert (tmp_path / "last.pth").exists() and (tmp_path / "best.pth").exists()
    assert prune_step_checkpoints(tmp_path, keep=3) == []
    assert len(prune_step_checkpoints(tmp_path, keep=0)) == 3
    with pytest.raises(ValueError):
        prune_step_checkpoints(tmp_path, keep=-1)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path, monkeypatch):
    # the temp name save_checkpoint really uses (captured at the rename, which then fails)
    names = []

    def failing_replace(src, dst):
        names.append(pathlib.Path(src).name)
        raise KeyboardInterrupt  # stop the save there; it removes its temp file

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"a": 1}, tmp_path / "last.pth")
    monkeypatch.undo()
    (ours,) = names
    assert ck._TEMP_RE.match(ours) and not (tmp_path / ours).exists()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that existed and is gone
    host = socket.gethostname().replace("-", "_")
    stale = f".last.pth.tmp-{host}-{dead.pid}-0123abcd"
    alive = f".best.pth.tmp-{host}-{os.getppid()}-89abcdef"  # another live process's save in progress
    elsewhere = f".last.pth.tmp-otherhost-{dead.pid}-0123abcd"  # another node's pid means nothing here
    malformed = f".last.pth.tmp-{host}-notapid-0123abcd"
    # `ours` stands for a save of this process in progress: never touched
    for name in (stale, alive, elsewhere, ours, malformed, "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert ck.remove_stale_temp_files(tmp_path) == [tmp_path / stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive, elsewhere, ours, malformed, "notes.txt"]
    )
    assert ck.remove_stale_temp_files(tmp_path / "missing") == []


# ------------------------------------------------------------------------- check_output_writable


def test_check_output_writable_creates_the_folder(tmp_path):
    out = tmp_path / "runs" / "a"
    check_output_writable(out, min_free_bytes=1)
    assert out.is_dir() and os.listdir(out) == []  # the probe file is gone


def test_check_output_writable_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError) as info:
        check_output_writable(tmp_path / "file" / "out", min_free_bytes=1)
    assert str(info.value) == (
        f"output folder {tmp_path / 'file' / 'out'} is not writable: Not a directory; choose another --output"
    )
    with pytest.raises(CheckpointError, match=r"is not writable: a file has that name; choose another"):
        check_output_writable(tmp_path / "file", min_free_bytes=1)


def test_check_output_writable_read_only_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        try:
            (out / "probe").write_text("x")
            (out / "probe").unlink()
            pytest.skip("chmod does not stop writes here (running as root); covered by the test above")
        except PermissionError:
            pass
        with pytest.raises(CheckpointError, match=r"is not writable: Permission denied; choose another"):
            check_output_writable(out, min_free_bytes=1)
    finally:
        out.chmod(0o700)


def test_check_output_writable_low_space(tmp_path, monkeypatch):
    usage = ck.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=5_500_000))
    with pytest.raises(CheckpointError) as info:
        check_output_writable(tmp_path, min_free_bytes=119_000_001)
    assert str(info.value) == (
        f"only 5 MB free in {tmp_path}, a checkpoint needs about 120 MB; free space or change --output"
    )
    check_output_writable(tmp_path, min_free_bytes=5_500_000)  # exactly enough: fine
    with pytest.raises(CheckpointError, match=r"^only 5 MB free in .*, a checkpoint needs about 6 MB;"):
        check_output_writable(tmp_path, min_free_bytes=5_500_001)


# ------------------------------------------------------------------------------------------ RNG


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist() + torch.randn(1).tolist(),
        torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else [],
    )


def test_rng_round_trip_in_memory_and_through_a_file(tmp_path):
    random.seed(0), np.random.seed(0)  # no cached gaussian yet, whatever ran before
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn(1)  # and in numpy's
    state = capture_rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    expected = _draw()
    assert _draw() != expected  # the draws consume state
    restore_rng_state(state)
    assert _draw() == expected
    save_checkpoint({"rng": state, "global_step": 0}, tmp_path / "last.pth")
    loaded = load_checkpoint(tmp_path / "last.pth")["rng"]  # weights_only=True
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(loaded)
    assert _draw() == expected


def test_restore_rng_state_malformed():
    with pytest.raises(CheckpointError, match=r"random-number state cannot be restored \(KeyError"):
        restore_rng_state({"torch": torch.get_rng_state()})


def test_background_writer_saves_the_state_of_the_moment_in_order_then_runs_what_follows(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32)
    writer = ck.CheckpointWriter(background=True)
    seen_on_disk = []
    for step in (1, 2):
        path = tmp_path / step_checkpoint_name(step)
        writer.save(
            {"global_step": step, "w": weights}, path, then=lambda p=path: seen_on_disk.append(p.exists())
        )
        weights.add_(1)  # the next optimizer step, while the file may still be written
    writer.wait()
    assert seen_on_disk == [True, True]
    for step in (1, 2):
        state = torch.load(tmp_path / step_checkpoint_name(step), weights_only=True)
        assert torch.equal(state["w"], torch.arange(1000, dtype=torch.float32) + step - 1)
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_failed_background_write_is_raised_by_the_next_wait_or_save(tmp_path):
    writer = ck.CheckpointWriter(background=True)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    writer.save({"w": torch.zeros(3)}, blocked / "last.pth")  # returns: the write happens elsewhere
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        writer.wait()
    writer.wait()  # reported once
    writer.save({"w": torch.zeros(3)}, blocked / "best.pth")
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        writer.save({"w": torch.zeros(3)}, tmp_path / "last.pth")
    with pytest.raises(TypeError, match="is a set"):  # a programming error is raised at once
        writer.save({"w": {1}}, tmp_path / "x.pth")


def test_cpu_tensors_clones_only_when_asked_and_keeps_the_containers():
    t = torch.ones(2)
    state = collections.OrderedDict(a=[t, (t, 1)], b={"c": None})
    same, copied = ck.cpu_tensors(state), ck.cpu_tensors(state, copy=True)
    assert type(same) is collections.OrderedDict and same["a"][0] is t and isinstance(same["a"][1], tuple)
    assert copied["a"][0] is not t and torch.equal(copied["a"][1][0], t) and copied["b"] == {"c": None}
