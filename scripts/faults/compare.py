"""The verdict on a campaign's output folder against the reference run's: checkpoints bitwise (tensors by
dtype, shape and bytes), metrics.jsonl equal but for wall-clock fields, and no temp file left behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

from faults.results import Check
from faults.trainer import TEMP_NAME
from swin_train.metrics import TIMING_KEYS

WALL_CLOCK_FIELDS = frozenset(TIMING_KEYS)
# Stored config entries that differ legitimately between the campaign and the reference run.
CONFIG_KEYS_THAT_MAY_DIFFER = (("output",), ("data", "num_workers"))


def tree_differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoint trees (dicts, lists, tensors, plain values) differ; tensors bitwise (dtype,
    shape and bytes, so NaNs and -0.0 count), floats exactly (NaN equals NaN)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path or '/'}: keys {sorted(map(str, a.keys() ^ b.keys()))} in only one of them"]
        return [d for key in a for d in tree_differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_differences(x, y, f"{path}/{i}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
        if not torch.equal(_as_bytes(a), _as_bytes(b)):
            return [f"{path}: tensors differ"]
        return []
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if type(a) is not type(b) or a != b:
        return [f"{path}: {a!r} != {b!r}"]
    return []


def _as_bytes(t):
    import torch

    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def without_keys(config: dict, keys=CONFIG_KEYS_THAT_MAY_DIFFER) -> dict:
    """A copy of a stored config without the entries that may differ (nested key paths)."""
    config = json.loads(json.dumps(config))
    for key_path in keys:
        holder = config
        for key in key_path[:-1]:
            holder = holder.get(key, {})
        holder.pop(key_path[-1], None)
    return config


def checkpoint_differences(reference: dict, run: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """Differences between two training checkpoints, over `keys` (default: all but the config) and the
    config without CONFIG_KEYS_THAT_MAY_DIFFER when `keys` is None."""
    if keys is None:
        if reference.keys() != run.keys():
            return [f"keys {sorted(reference.keys() ^ run.keys())} in only one of them"]
        diffs = tree_differences(without_keys(reference["config"]), without_keys(run["config"]), "/config")
        keys = tuple(k for k in reference if k != "config")
        return diffs + [d for k in keys for d in tree_differences(reference[k], run[k], f"/{k}")]
    return [d for k in keys for d in tree_differences(reference.get(k), run.get(k), f"/{k}")]


def metrics_differences(reference_text: str, run_text: str) -> list[str]:
    """Differences between two metrics.jsonl texts, ignoring WALL_CLOCK_FIELDS."""

    def records(text: str) -> list[dict]:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS} for row in rows]

    ref, run = records(reference_text), records(run_text)
    if [r.get("epoch") for r in ref] != [r.get("epoch") for r in run]:
        return [f"epochs {[r.get('epoch') for r in run]} != {[r.get('epoch') for r in ref]} (reference)"]
    return [d for i, (a, b) in enumerate(zip(ref, run)) for d in tree_differences(a, b, f"line {i + 1}")]


def compare_outputs(reference: Path, run: Path) -> list[Check]:
    """The checks of a campaign's output folder against the reference run's."""
    import torch

    def load(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    def check(name: str, diffs: list[str]) -> Check:
        detail = "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
        return Check(name, not diffs, detail)

    def missing(name: str) -> list[str]:
        return [f"{name} missing in {folder}" for folder in (run, reference) if not (folder / name).exists()]

    def read(path: Path) -> str:
        return path.read_text()

    folders = (reference, run)

    checks = []
    if not (absent := missing("last.pth")):
        ref_last, run_last = load(reference / "last.pth"), load(run / "last.pth")
    for name, keys in (
        ("last.pth model", ("model",)),
        ("last.pth optimizer", ("optimizer",)),
        ("last.pth everything else", None),
    ):
        checks.append(check(name, absent or checkpoint_differences(ref_last, run_last, keys)))
    absent = missing("best.pth")
    checks.append(
        check("best.pth", absent or checkpoint_differences(*(load(d / "best.pth") for d in folders)))
    )
    ref_steps = sorted(p.name for p in reference.glob("step-*.pth"))
    run_steps = sorted(p.name for p in run.glob("step-*.pth"))
    step_diffs = [] if ref_steps == run_steps else [f"files {run_steps} != {ref_steps} (reference)"]
    for name in ref_steps if not step_diffs else []:
        step_diffs += [f"{name}{d}" for d in checkpoint_differences(load(reference / name), load(run / name))]
    checks.append(check("step checkpoints", step_diffs))
    absent = missing("metrics.jsonl")
    checks.append(
        check("metrics.jsonl", absent or metrics_differences(*(read(d / "metrics.jsonl") for d in folders)))
    )
    leftovers = sorted(p.name for p in run.iterdir() if TEMP_NAME.match(p.name))
    checks.append(check("no temp files left", [f"left behind: {', '.join(leftovers)}"] if leftovers else []))
    return checks
