"""One trainer run in a fresh folder of its own: its config or command line written there, run and measured,
its results parsed into a RunResult."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import yaml

from swin_train.errors import DataError
from trainerbench.measure import run_measured
from trainerbench.recipe import Recipe, swin_command, swin_config, timm_command
from trainerbench.results import (
    RunResult,
    read_swin_metrics,
    read_timm_summary,
    summarize_trainer,
    timm_train_img_s,
)


def run_one(
    trainer: str,
    pair: int,
    *,
    recipe: Recipe,
    data_dir: Path,
    work_dir: Path,
    timm_train: Path | None,
    env: dict,
    train_images: int,
    timeout: float | None,
    memory_interval: float = 5.0,
) -> RunResult:
    """One trainer run in a fresh folder `work_dir/runs/{trainer}-{pair}`; parses its results."""
    run_dir = work_dir / "runs" / f"{trainer}-{pair}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover output folder would make swin-train resume
    run_dir.mkdir(parents=True)
    log_path = run_dir / "log.txt"
    if trainer == "swin":
        config_path = run_dir / "swin.yaml"
        config_path.write_text(
            yaml.safe_dump(swin_config(recipe, data_dir, run_dir / "out"), sort_keys=False)
        )
        cmd = swin_command(config_path)
    else:
        assert timm_train is not None
        cmd = timm_command(recipe, timm_train, data_dir, run_dir, "out")
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    m = run_measured(
        cmd, env=env, cwd=run_dir, log_path=log_path, timeout=timeout, memory_interval=memory_interval
    )
    log = log_path.read_text(errors="replace")
    epochs, loop_img_s = [], []
    try:
        if trainer == "swin":
            epochs = read_swin_metrics(run_dir / "out" / "metrics.jsonl")
            loop_img_s = [e["train_img_s"] for e in epochs]
        else:
            epochs = read_timm_summary(run_dir / "out" / "summary.csv")
            loop_img_s = timm_train_img_s(log)
    except DataError as e:
        if m.exit_code == 0:
            raise
        print(f"{trainer} run {pair} failed ({e})", file=sys.stderr)
    usable = (train_images // recipe.batch_size) * recipe.batch_size  # both drop the last partial batch
    return summarize_trainer(
        trainer,
        pair,
        m,
        epochs,
        train_images=usable,
        epochs_planned=recipe.epochs,
        loop_img_s=loop_img_s,
        log=str(log_path),
    )
