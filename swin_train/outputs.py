"""What a command may write over. Every command that writes a file (swin-export in every format, swin-eval's
--metrics-json, swin-data) checks each output here before it writes anything: never over one of its own
inputs, never over a checkpoint of a training run (--force does not change that), and over any other existing
file only with --force. swin-train's own folder is runlock.py's and trainer.py's business.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

from swin_train.checkpoint import BEST, LAST, is_training_checkpoint, object_tree
from swin_train.errors import ConfigError
from swin_train.runlock import LOCK_FILE_NAME

_STEP_NAME = re.compile(r"^step-\d{9,}\.pth$")
# What a run writes beside its checkpoints: one of them marks a folder as a run's
_RUN_MARKERS = ("log.txt", "config.yaml", LOCK_FILE_NAME)


def is_checkpoint_name(name: str) -> bool:
    """A name a run gives its checkpoints: last.pth, best.pth, step-NNNNNNNNN.pth."""
    return name in (LAST, BEST) or _STEP_NAME.match(name) is not None


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder swin-train has trained in: it holds a run's log, config, lock or a checkpoint by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any((folder / name).exists() for name in _RUN_MARKERS) or any(
        is_checkpoint_name(p.name) for p in folder.iterdir()
    )


def is_run_config(path: str | os.PathLike) -> bool:
    """The config.yaml a run wrote into its output folder (a stored config, not a recipe of the user's)."""
    path = Path(path)
    return path.name == "config.yaml" and path.is_file() and is_run_folder(path.parent)


def holds_training_checkpoint(path: Path) -> bool:
    """Whether an existing file is a swin-train training checkpoint, whatever its name. torch files are zip
    archives: anything else is not one; a zip's `object_tree` is read without the tensor data."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        state = object_tree(path)
    except Exception:  # a damaged or foreign zip: not a checkpoint we could lose
        return False
    return is_training_checkpoint(state)


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The files a command reads: each input file, and the files directly in each input folder (a Hugging Face
    folder)."""
    files = []
    for item in map(Path, inputs):
        files += sorted(p for p in item.iterdir() if p.is_file()) if item.is_dir() else [item]
    return files


def _refuse_replacing_inputs_and_checkpoints(path: Path, inputs: Iterable, option: str) -> None:
    for source in input_files(inputs):
        if _same_file(path, source):
            raise ConfigError(f"{option} {path} is the input {source}; write to another file")
    if (is_checkpoint_name(path.name) and is_run_folder(path.parent)) or holds_training_checkpoint(path):
        raise ConfigError(
            f"{option} {path} is a checkpoint of a training run, which no command replaces; "
            "write to another file"
        )


def check_output_file(
    path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike], force: bool, option: str = "--out"
) -> None:
    """ConfigError, before anything is written, when writing `path` would replace one of `inputs` (files or
    folders, whose files count), a checkpoint of a training run (by its name in a run folder, or by its
    content anywhere), or, without `force`, any other existing file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    _refuse_replacing_inputs_and_checkpoints(path, inputs, option)
    if path.exists() and not force:
        raise ConfigError(f"{option} {path} exists; pass --force to replace it")


def check_output_folder(
    folder: str | os.PathLike,
    names: Iterable[str],
    *,
    inputs: Iterable[str | os.PathLike],
    force: bool,
    option: str = "--out",
) -> None:
    """check_output_file for the files `names` (those a command writes or removes) in `folder`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file; give a folder")
    inputs, names = list(inputs), list(names)
    for name in names:
        _refuse_replacing_inputs_and_checkpoints(folder / name, inputs, option)
    present = [name for name in names if (folder / name).exists()]
    if present and not force:
        raise ConfigError(f"{option} {folder} already holds {', '.join(present)}; pass --force to replace")


__all__ = [
    "check_output_file",
    "check_output_folder",
    "holds_training_checkpoint",
    "input_files",
    "is_checkpoint_name",
    "is_run_config",
    "is_run_folder",
]
