"""The report: report.json (strict JSON: no NaN) and report.md (environment, a summary table of the parts,
each part's numbers, commands and, when it did not pass, the end of its output; the CPU cores one GPU
needs)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path


def fmt(value, spec: str, suffix: str = "") -> str:
    """`value` formatted, or n/a when it is unknown (None) or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) + suffix


def plain(obj):
    """JSON-safe: dataclasses to dicts, non-finite floats to None (JSON has no NaN), tuples to lists."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines + [""]


def _fence(text: str) -> list[str]:
    return ["```text", text.replace("```", "'''").rstrip(), "```", ""]


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """report.json (strict JSON) and report.md in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_safe = plain(report)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(json_safe, indent=1, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(json_safe))
    return md_path, json_path


def render_markdown(report: dict) -> str:
    """The report as markdown: environment, a summary table of the parts, then each part's details."""
    lines = _heading(report)
    lines += ["## Summary", ""]
    lines += _table(
        ("part", "status", "time / budget", "result"),
        [
            (p["name"], p["status"], f"{p['seconds']:.0f} s / {p['budget_s']:.0f} s", p["summary"])
            for p in report["parts"]
        ],
    )
    for p in report["parts"]:
        lines += _part(p)
    if report.get("loader_cores"):
        lines += _loader_cores(report["loader_cores"])
    return "\n".join(lines).rstrip() + "\n"


def _heading(report: dict) -> list[str]:
    env = report["environment"]
    gpus = ", ".join(f"{g['name']} ({g['memory_mib']} MiB)" for g in env.get("gpus", [])) or "none"
    lines = [
        f"# GPU check: {env.get('host', '?')}",
        "",
        f"Started {report['started']}, took {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"GPUs: {gpus}.",
        "",
    ]
    return lines + _table(("environment", "value"), [(k, str(v)) for k, v in env.items() if k != "gpus"])


def _part(p: dict) -> list[str]:
    """One part's section: status, its numbers, then each step's command (and output unless it passed)."""
    lines = [f"## {p['name']}: {p['title']}", "", f"**{p['status']}**: {p['summary']}", ""]
    data = p.get("data") or {}
    if data.get("rows"):
        lines += _bench_rows(data["rows"])
    if data.get("per_worker_img_s"):
        lines += _table(
            ("workers", "img/s", "img/s per worker"),
            [(w, fmt(data["img_s"][w], ".0f"), fmt(v, ".0f")) for w, v in data["per_worker_img_s"].items()],
        )
    other = {k: v for k, v in data.items() if k not in ("rows", "per_worker_img_s", "img_s")}
    if other:
        lines += _table(("measure", "value"), [(k, json.dumps(v)) for k, v in other.items()])
    for s in p.get("steps", []):
        state = (
            "timed out"
            if s["timed_out"]
            else "not run"
            if s["exit_code"] is None
            else f"exit {s['exit_code']}"
        )
        lines += [f"- `{s['name']}`: {state}, {s['seconds']:.0f} s; output `{s['stdout'] or '-'}`", ""]
        lines += _fence(s["command"])
        if p["status"] != "passed" and s["tail"]:
            lines += ["End of its output:", ""] + _fence(s["tail"])
    return lines


def _bench_rows(rows: list[dict]) -> list[str]:
    def pct(mfu: float | None) -> str:
        return fmt(mfu and 100 * mfu, ".1f", "%")

    head = (
        "model",
        "ours train img/s",
        "timm train img/s",
        "train vs timm",
        "ours infer img/s",
        "timm infer img/s",
        "infer vs timm",
        "MFU train ours / timm",
        "train mem ours / timm",
        "compile s (train, infer)",
    )
    cells = [
        (
            r["model"],
            fmt(r["ours_train_img_s"], ".1f"),
            fmt(r["timm_train_img_s"], ".1f"),
            fmt(r["train_vs_timm"], ".3f", "x"),
            fmt(r["ours_infer_img_s"], ".1f"),
            fmt(r["timm_infer_img_s"], ".1f"),
            fmt(r["infer_vs_timm"], ".3f", "x"),
            f"{pct(r['ours_train_mfu'])} / {pct(r['timm_train_mfu'])}",
            f"{fmt(r['ours_train_mem_mib'], '.0f', ' MiB')} / {fmt(r['timm_train_mem_mib'], '.0f', ' MiB')}",
            ", ".join(fmt(v, ".0f") for v in (r["ours_compile_s"] or {}).values()) or "-",
        )
        for r in rows
    ]
    return _table(head, cells)


def _loader_cores(rows: list[dict]) -> list[str]:
    lines = [
        "## CPU cores one GPU needs",
        "",
        "The GPU's train img/s (ours) over the data loader's img/s per worker (decode + the official "
        "train transform at 224): how many loader cores keep one GPU busy.",
        "",
    ]
    head = (
        "model",
        "mode",
        "GPU train img/s",
        "loader img/s per core",
        "cores needed per GPU",
        "cores per GPU here",
    )
    cells = [
        (
            r["model"],
            r["mode"],
            fmt(r["gpu_train_img_s"], ".0f"),
            fmt(r["loader_img_s_per_core"], ".0f"),
            fmt(r["cores_needed_per_gpu"], ".1f"),
            fmt(r["cores_per_gpu"], ".1f"),
        )
        for r in rows
    ]
    return lines + _table(head, cells)
