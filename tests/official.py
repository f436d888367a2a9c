"""The official microsoft/Swin-Transformer code, read from a fetched snapshot of its git repository (set
SWIN_OFFICIAL_REPO to its git directory): never part of this repository. Tests that compare against it skip
where there is no snapshot; each also has a committed check against timm or the same math."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import load_module

OFFICIAL_REPO = Path(os.environ.get("SWIN_OFFICIAL_REPO", "/work/.mirror/microsoft+Swin-Transformer/repo"))


def official_source(path: str) -> str:
    """The text of `path` at the snapshot's HEAD; skips the calling test without a snapshot."""
    if shutil.which("git") is None or not OFFICIAL_REPO.is_dir():
        pytest.skip(f"no snapshot of the official Swin code at {OFFICIAL_REPO} (set SWIN_OFFICIAL_REPO)")
    done = subprocess.run(
        ["git", "--git-dir", str(OFFICIAL_REPO), "show", f"HEAD:{path}"], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"the snapshot at {OFFICIAL_REPO} has no {path}")
    return done.stdout


def official_module(name: str, path: str, tmp_path: Path):
    """The official file `path` written under `tmp_path` and imported as module `name`."""
    file = tmp_path / Path(path).name
    file.write_text(official_source(path))
    return load_module(name, file)


def official_models_package(root: Path, package: str, *extra: str) -> None:
    """The snapshot's models/swin_transformer.py, swin_transformer_v2.py and simmim.py (which import each other
    relatively), with the top-level files `extra`, written as the package `package` under `root` (put root on
    sys.path to import it)."""
    folder = root / package
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for path in (
        *(f"models/{name}" for name in ("swin_transformer.py", "swin_transformer_v2.py", "simmim.py")),
        *extra,
    ):
        (folder / Path(path).name).write_text(official_source(path))
