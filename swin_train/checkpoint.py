"""Checkpoint files: the training-checkpoint format and file safety (atomic writes, safe loads, finding and
pruning a run's checkpoints, RNG state). The ground floor: it imports nothing of ours but errors and
leftovers, so every other module may use it; turning a file into a model is `swin_train.loading`.

A run's output folder holds
    last.pth                    written at epoch ends
    best.pth                    written when validation accuracy improves
    step-{global_step:09d}.pth  written every N optimizer steps, pruned to the newest K
Every checkpoint is a dict of plain data (tensors, str, int, float, bool, None, list, tuple, dict), so it
loads with `torch.load(weights_only=True)`: nothing in a checkpoint can run code. Its int `global_step`
(at the top level or in `train_state`) orders last.pth / best.pth among the resume candidates.

Writes go to a temp file in the same folder (`.{name}.tmp-{host}-{pid}-{random}`), are fsynced and then
renamed over the target, so a crash or a full disk never leaves a half-written `last.pth`. A process killed
while writing (SIGKILL, OOM killer) leaves its temp file behind; the next run removes it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from swin_train.errors import CheckpointError, SwinTrainError
from swin_train.leftovers import left_by_dead_process, owner_tag

_log = logging.getLogger(__name__)

# The training checkpoint: a dict with these keys (see `training_checkpoint`), marked by FORMAT.
FORMAT = "swin-train/1"
# What every trained-model file holds besides the weights, so that it predicts without the run's config
# file: a training checkpoint and a safetensors export alike.
EXPORT_METADATA_KEYS = ("config", "class_names", "preprocess")

LAST = "last.pth"
BEST = "best.pth"
_STEP_RE = re.compile(r"^step-(\d{9,})\.pth$")
_TEMP_RE = re.compile(r"^\..+\.tmp-(.+)$")  # temp_path's names; group 1: the writer's owner tag
_PLAIN_SCALARS = (str, int, float, bool, type(None))
# Parameter loads under weights_only (torch allow-lists its rebuild function); other tensor
# subclasses and dict/tuple subclasses (namedtuples, ...) are pickled by class name and would not.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, list, tuple, dict, collections.OrderedDict, *_PLAIN_SCALARS)


def step_checkpoint_name(global_step: int) -> str:
    """File name of the step checkpoint for `global_step`, e.g. 'step-000001200.pth'."""
    return f"step-{global_step:09d}.pth"


# ----------------------------------------------------------------------------------------- plain data


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def ensure_plain(obj: object, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value in `obj` that is not plain data (see module docstring)."""
    if type(obj) not in _PLAIN_TYPES:
        raise TypeError(
            f"{where} is a {_type_name(obj)}; a checkpoint may hold only tensors, str, int, float, bool, "
            "None, list, tuple and dict"
        )
    if isinstance(obj, dict):
        for key, value in obj.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(f"{where} has a key {key!r} of type {_type_name(key)}; use str or int keys")
            ensure_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            ensure_plain(value, f"{where}[{i}]")


# ------------------------------------------------------------------------------------------ save / load


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: torch.save reports a failed write of its file object as a
    RuntimeError ('unexpected pos ...') whose __context__ is the real OSError (e.g. ENOSPC)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _not_a_write_failure(exc: BaseException) -> BaseException | None:
    """The user error or interrupt behind `exc` (a second Ctrl-C, a data worker's death raised by a signal
    handler mid-write), which must pass on as itself, also when torch.save reports it as its own
    RuntimeError ('unexpected pos ...') with the real one as its context; None for a failed write."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, SwinTrainError) or not isinstance(exc, Exception):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Some file systems cannot open or fsync a directory; the
    file itself is already fsynced there, so that is not an error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where an atomic save of `path` writes before the rename: a hidden name in the same folder that
    carries this process's owner tag (`remove_stale_temp_files` reads it back)."""
    return path.with_name(f".{path.name}.tmp-{owner_tag()}")


def cpu_tensors(obj, *, copy: bool = False):
    """`obj` (plain data) with every tensor in host memory: a device tensor copied there, a CPU tensor kept
    as it is or, with `copy`, cloned (a snapshot that later in-place updates of the original cannot reach)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            return obj.detach().to("cpu")
        return obj.detach().clone() if copy else obj
    if isinstance(obj, dict):
        return type(obj)((key, cpu_tensors(value, copy=copy)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tensors(value, copy=copy) for value in obj)
    return obj


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically, its tensors in host memory (a plain `torch.load` works on a
    machine without the device that trained it); an existing file at `path` stays intact on any failure."""
    ensure_plain(state)  # a programming error (TypeError), raised before anything touches the disk
    state = cpu_tensors(state)

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:  # our own file object: a failed write surfaces as its OSError
            torch.save(state, f)

    write_atomically(Path(path), write, what="checkpoint ")


class CheckpointWriter:
    """Writes checkpoints in the order asked, one at a time: at once, or (`background`) on a thread of its
    own while training goes on. A background save first copies the state to host memory, the snapshot of
    that moment (for a GPU run, the one wait of the save); the write to disk then costs the training
    nothing. `wait()` returns once every write asked for is on disk, and raises the error of one that
    failed; call it before anything that needs the file (a stop, the end of the run)."""

    def __init__(self, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: str | os.PathLike, then: Callable[[], object] | None = None) -> None:
        """`save_checkpoint(state, path)`, then `then()` (e.g. pruning older files) once it is on disk."""
        self.wait()
        if not self.background:
            save_checkpoint(state, path)
            if then is not None:
                then()
            return
        ensure_plain(state)  # as save_checkpoint does: a programming error, raised here
        snapshot = cpu_tensors(state, copy=True)

        def write() -> None:
            try:
                save_checkpoint(snapshot, path)
                if then is not None:
                    then()
            except BaseException as exc:  # handed to the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=write, name="swin-train checkpoint writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def write_atomically(path: Path, write: Callable[[Path], None], *, what: str = "") -> None:
    """`write(tmp)` into a temp file beside `path` (`temp_path`), fsync it, give it the mode a new file gets
    (0666 less the umask; some writers create 0600), rename it over `path`, fsync the folder: `path` is the
    old file or the whole new one, never a part. A user error raised by `write` (e.g. an export that fails
    its own check) passes through; a failed write becomes a one-line CheckpointError."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # also when the temp file was never created
            tmp.unlink()
        passed_on = _not_a_write_failure(exc)
        if passed_on is exc:
            raise  # KeyboardInterrupt etc.: the temp file is gone, the old file untouched
        if passed_on is not None:
            raise passed_on from None
        os_err = _os_error_in(exc)
        if os_err is None:  # not the file system's: no advice about the folder
            raise CheckpointError(f"could not write {what}{path}: {str(exc).splitlines()[0]}") from exc
        hint = "check the output folder or change --output"
        if os_err.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "free space or change --output"
        raise CheckpointError(f"could not write {what}{path}: {os_err.strerror or os_err}; {hint}") from exc
    _fsync_dir(path.parent)


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _load_safetensors(path: Path, map_location) -> dict:
    """{'model': tensors}, plus the config, class names and preprocessing a swin-train export stores in its
    metadata (`models.convert.save_weights`), decoded."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not isinstance(map_location, (str, torch.device)):
        raise CheckpointError(f"cannot load {path} with map_location={map_location!r}; pass a device name")
    try:
        tensors = load_file(path, device=str(map_location))
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({str(exc).splitlines()[0]})"
        ) from None
    state: dict = {"model": tensors}
    for key in EXPORT_METADATA_KEYS:
        if key in metadata:
            try:
                state[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                raise CheckpointError(
                    f"{path}: its '{key}' metadata is not valid JSON; the file is damaged"
                ) from None
    return state


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint dict safely (`weights_only=True`); a `.safetensors` file gives {'model': tensors}."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .pth file inside it")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    unreadable = f"checkpoint {path} is not a readable checkpoint (truncated or not a torch file)"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler names a forbidden import as "GLOBAL module.name"; any other
        # unpickling error (unknown opcode, bad data) means the file is damaged or not a checkpoint.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise CheckpointError(unreadable) from None
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects (e.g. '{found.group(1)}'), "
            "which could run code; only tensors and plain data are accepted"
        ) from None
    except PermissionError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc.strerror}; check its permissions"
        ) from None
    except Exception as exc:
        if "Attempting to deserialize object on" in str(exc):  # map_location names a missing device
            reason = str(exc).splitlines()[0]
            raise CheckpointError(f"cannot load {path} onto {map_location}: {reason}") from None
        # A damaged file makes torch's readers fail in many ways (fuzzed: RuntimeError for a truncated
        # zip, EOFError, KeyError, IndexError, struct.error, AssertionError, ...): all mean unreadable.
        raise CheckpointError(unreadable) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {_type_name(state)}, not a dict; it is not a checkpoint"
        )
    return state


# ----------------------------------------------------------------------------------- output folder


_UNREADABLE = 1 << 62  # sort key of a file that cannot even be opened as a checkpoint: try it first


def object_tree(path: str | os.PathLike) -> object:
    """A torch checkpoint's objects with its tensors memory-mapped, not read: mmap=True unpickles only the
    small object tree (weights only, as load_checkpoint), so a look at a file's counters, class names or keys
    never costs a full load. Raises what torch.load raises (a legacy, non-zip file cannot be mapped)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _stored_step(path: Path) -> int:
    """`global_step` stored in a checkpoint (`object_tree`); -1 if it has none, _UNREADABLE if the file cannot
    be read."""
    try:
        state = object_tree(path)
    except Exception:  # damaged in any way (see load_checkpoint)
        return _UNREADABLE
    # top level, or in the trainer's `train_state` counters
    for holder in (state, state.get("train_state") if isinstance(state, dict) else None):
        if isinstance(holder, dict) and type(holder.get("global_step")) is int:
            return holder["global_step"]
    return -1


def stored_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a swin-train checkpoint or export stores (None where it stores none or cannot be
    read), read cheaply: a .pth's `object_tree`, a .safetensors file's metadata."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                names = json.loads((f.metadata() or {}).get("class_names", "null"))
        else:
            state = object_tree(path)
            names = state.get("class_names") if isinstance(state, dict) else None
    except Exception:  # a folder, a legacy file or one damaged; the weights' loader has the say on those
        return None
    return [str(c) for c in names] if isinstance(names, list | tuple) else None


def checkpoint_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Resume candidates in `output_dir`, newest first.

    Rule: by global step, taken from the name for step files (no read) and from the stored
    `global_step` for last.pth / best.pth (a cheap mmap read); at equal steps last.pth comes first,
    then the step file, then best.pth. A last.pth / best.pth without `global_step` comes after all
    others. One that cannot be read at all comes first: it is most likely the newest file, damaged,
    and trying it first makes find_resume_checkpoint report it instead of passing over it silently.
    Temp files and any other names are never candidates.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    keyed: list[tuple[tuple[int, int], Path]] = []
    for path in folder.iterdir():
        if match := _STEP_RE.match(path.name):
            keyed.append(((int(match.group(1)), 1), path))
        elif path.name in (LAST, BEST):
            keyed.append(((_stored_step(path), 2 if path.name == LAST else 0), path))
    keyed.sort(key=lambda kp: kp[0], reverse=True)
    return [path for _, path in keyed]


def find_resume_checkpoint(
    output_dir: str | os.PathLike, logger: logging.Logger | None = None, damaged: list[Path] | None = None
) -> tuple[Path, dict] | None:
    """Load the newest loadable checkpoint in `output_dir`; None when the folder holds none.

    A candidate that fails to load is reported with logger.warning (and appended to `damaged`) and the
    next older one is tried. If every candidate fails, CheckpointError is raised rather than returning
    None: starting over silently would later overwrite the damaged files the user may still want to rescue.
    """
    logger = logger or _log
    candidates = checkpoint_candidates(output_dir)
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("%s; trying the next older checkpoint", exc)
            if damaged is not None:
                damaged.append(path)
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints in {output_dir} could be loaded (see the warnings "
            "above); move them away to start over, or pass a good checkpoint with --resume"
        )
    return None


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not load to `NAME.damaged` (kept for rescue, never a resume candidate)."""
    target = path.with_name(path.name + ".damaged")
    os.replace(path, target)
    return target


def prune_step_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest step checkpoints (by step number); returns the deleted paths.
    Call it only after the newest one is safely on disk."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    folder = Path(output_dir)
    steps = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))), reverse=True
    )
    deleted = [path for _, path in steps[keep:]]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def remove_stale_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp files of saves whose writer, a process of this host, is gone (killed mid-save);
    returns them. A temp file of a live process or of another host (another run writing to the same
    folder) is left alone."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    stale = [
        p for p in folder.iterdir() if (m := _TEMP_RE.match(p.name)) and left_by_dead_process(m.group(1))
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_output_writable(output_dir: str | os.PathLike, min_free_bytes: int) -> None:
    """Create `output_dir` if needed and make sure a checkpoint of `min_free_bytes` can be written there."""
    folder = Path(output_dir)
    probe = folder / f".write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_bytes(b"swin-train")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError):
            reason = "a file has that name"
        raise CheckpointError(
            f"output folder {folder} is not writable: {reason}; choose another --output"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise CheckpointError(
            f"only {free // 10**6} MB free in {folder}, a checkpoint needs about "
            f"{-(-min_free_bytes // 10**6)} MB; free space or change --output"
        )


# ----------------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """States of python `random`, numpy's global RNG, torch CPU and every CUDA device, as plain data."""
    version, internal, gauss_next = random.getstate()  # internal: 625 ints < 2**32
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()  # keys: (624,) uint32
    return {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(d: dict) -> None:
    """Restore what capture_rng_state saved. CUDA states are restored for the devices present both then
    and now (a different device count cannot resume bit-exactly anyway)."""
    try:
        py, npy = d["python"], d["numpy"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
        keys = npy["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
        torch.set_rng_state(d["torch"].cpu())
        if torch.cuda.is_available():
            for i, cuda_state in enumerate(d["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state.cpu(), device=i)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"the checkpoint's random-number state cannot be restored ({type(exc).__name__}: {exc}); "
            "it was not written by this version of swin-train"
        ) from None


# ------------------------------------------------------------------------------ the trained-model format


def is_training_checkpoint(state: object) -> bool:
    """A checkpoint `swin-train` wrote (last.pth, best.pth, step-*.pth): it resumes a run."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def holds_trained_model(state: object) -> bool:
    """A training checkpoint or an export with its config, class names and preprocessing: what
    `load_trained_model` takes (anything else is bare weights)."""
    return is_training_checkpoint(state) or (
        isinstance(state, dict) and all(k in state for k in EXPORT_METADATA_KEYS)
    )


def stored_task(state: object) -> str | None:
    """What the run that wrote a swin-train checkpoint or export trained for (`task` of its config; files from
    before pre-training existed are classification), None for anything else."""
    config = state.get("config") if holds_trained_model(state) else None
    return config.get("task", "classification") if isinstance(config, dict) else None


def training_checkpoint(
    *,
    model: dict,
    optimizer: dict,
    schedule: dict,
    scaler: dict | None,
    ema: dict | None,
    train_state: dict,
    best: dict,
    config: dict,
    rng: list,
    world_size: int,
    class_names: list[str],
    preprocess: dict,
    shard_streams_per_rank: int | None = None,
) -> dict:
    """The one layout of a training checkpoint: everything a run needs to continue bitwise, and everything
    a user of the model needs (config, class names, preprocessing). `shard_streams_per_rank`: shard readers
    per process when training from shards, whose data order depends on it."""
    return {
        "format": FORMAT,
        "model": model,
        "optimizer": optimizer,
        "schedule": schedule,
        "scaler": scaler,
        "ema": ema,
        "train_state": train_state,
        "best": best,
        "config": config,
        "rng": rng,
        "world_size": world_size,
        "class_names": list(class_names),
        "preprocess": preprocess,
        "shard_streams_per_rank": shard_streams_per_rank,
    }
