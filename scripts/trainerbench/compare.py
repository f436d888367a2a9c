"""The comparison: the alternating run order, medians per trainer and medians of the pairwise ratios over
complete pairs (speed, CPU time, memory, top-1), and the table printed instead of the JSON."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from trainerbench.recipe import TRAINERS
from trainerbench.results import RunResult


def pair_order(pairs: int, trainers: Sequence[str]) -> list[tuple[int, str]]:
    """(pair, trainer) in run order: A B A B ..., the first trainer alternating between pairs (A B, B A, ...)
    so neither always runs on a machine warmed (or heated) by the other."""
    order = []
    for p in range(pairs):
        names = list(trainers) if p % 2 == 0 else list(reversed(trainers))
        order += [(p, t) for t in names]
    return order


def _median(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else float("nan")


def compare(results: Sequence[RunResult]) -> dict:
    """Medians per trainer and, over complete pairs (both runs without error), the median of the pairwise
    ratios: speed as timm / swin-train time, memory as swin-train / timm peak, and the top-1 difference."""
    by_trainer: dict[str, list[RunResult]] = {}
    for r in results:
        if r.error is None:
            by_trainer.setdefault(r.trainer, []).append(r)
    medians = {}
    for trainer, runs in by_trainer.items():
        medians[trainer] = {
            "runs": len(runs),
            "wall_s": statistics.median(r.measurement.wall_s for r in runs),
            "cpu_s": statistics.median(r.measurement.cpu_s for r in runs),
            "peak_tree_pss_mib": _median([r.measurement.peak_tree_pss_mib for r in runs]),
            "peak_rss_mib": statistics.median(r.measurement.peak_rss_mib for r in runs),
            "images_per_second": statistics.median(r.images_per_second for r in runs),
            "best_top1": statistics.median(r.best_top1 for r in runs),
            "final_top1": statistics.median(r.final_top1 for r in runs),
        }
    pairs: dict[int, dict[str, RunResult]] = {}
    for r in results:
        if r.error is None:
            pairs.setdefault(r.pair, {})[r.trainer] = r
    complete = [p for p in pairs.values() if set(TRAINERS) <= set(p)]
    ratios = {}
    if complete:

        def median_ratio(get, numerator: str, denominator: str) -> float:
            pairs = [(get(p[numerator]), get(p[denominator])) for p in complete]
            return _median([a / b for a, b in pairs if a is not None and b])

        ratios = {
            "pairs": len(complete),
            # timm / swin-train: > 1 when swin-train is faster
            "speedup_wall": median_ratio(lambda r: r.measurement.wall_s, "timm", "swin"),
            "speedup_cpu": median_ratio(lambda r: r.measurement.cpu_s, "timm", "swin"),
            # swin-train / timm: < 1 when swin-train uses less memory
            "memory_tree_pss": median_ratio(lambda r: r.measurement.peak_tree_pss_mib, "swin", "timm"),
            "memory_rss": median_ratio(lambda r: r.measurement.peak_rss_mib, "swin", "timm"),
            "top1_difference": statistics.median(p["swin"].best_top1 - p["timm"].best_top1 for p in complete),
        }
    return {"medians": medians, "ratios": ratios}


def format_table(results: Sequence[RunResult], comparison: dict) -> str:
    head = (
        "pair",
        "trainer",
        "wall s",
        "cpu s",
        "tree PSS MiB",
        "max RSS MiB",
        "img/s e2e",
        "loop img/s",
        "best top-1",
        "last top-1",
        "status",
    )
    rows = [head]
    for r in results:
        m = r.measurement
        rows.append(
            (
                str(r.pair),
                r.trainer,
                f"{m.wall_s:.1f}",
                f"{m.cpu_s:.1f}",
                "n/a" if m.peak_tree_pss_mib is None else f"{m.peak_tree_pss_mib:.0f}",
                f"{m.peak_rss_mib:.0f}",
                f"{r.images_per_second:.1f}",
                f"{r.train_img_s:.1f}",
                f"{100 * r.best_top1:.2f}%",
                f"{100 * r.final_top1:.2f}%",
                r.error or "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    ratios = comparison["ratios"]
    if ratios:
        lines.append(
            f"median over {ratios['pairs']} pairs: swin-train {ratios['speedup_wall']:.3f}x faster than timm in "
            f"wall time ({ratios['speedup_cpu']:.3f}x in CPU time); memory swin-train/timm "
            f"{ratios['memory_tree_pss']:.3f} (tree PSS), {ratios['memory_rss']:.3f} (max RSS); best top-1 "
            f"swin-train - timm {100 * ratios['top1_difference']:+.2f} points"
        )
    return "\n".join(lines)
