"""Whole training runs: swin-train against timm's own train.py, same recipe, alternating A B A B.

Each run is a fresh subprocess (`python -m swin_train.cli.train --config RUN/swin.yaml`, then
`python TIMM_TRAIN ...`) with the same environment and thread settings. Measured per run: wall time,
CPU time (user + system of the trainer and its data workers, from `os.wait4`), peak memory (the largest
sum of PSS over the process tree, sampled from /proc, and the largest single-process RSS), end-to-end
img/s (epochs x train images / wall time) and the best val top-1 (timm: `summary.csv`; swin-train:
`metrics.jsonl`). The speed ratio is timm wall / swin-train wall per pair and its median is reported
(> 1: swin-train is faster), so slow drifts of a shared machine cancel.

    git --git-dir=/path/to/pytorch-image-models/.git show HEAD:train.py > /tmp/timm_train.py
    python scripts/benchmark_trainer.py --timm-train /tmp/timm_train.py            # 3 pairs, default recipe
    python scripts/benchmark_trainer.py --timm-train /tmp/timm_train.py --pairs 1 --epochs 2 --json

Without `--data` the script generates its own set into `--work-dir`/data (once): 10 classes of 32 px
images (5 shapes x solid or striped fill, in random colours, brightness, size and position, on a noisy
background with a brightness ramp), 1,300 train / 497 val images as PNG ImageFolders. Colour says nothing
about the class: it is a shape *and* a texture, which the default recipe learns to well below 100%.

The recipe and how each setting maps onto both trainers (swin-train key / timm train.py flag):

    model       micro Swin: embed 48, depths 2-2-2, heads 3-6-12, patch 2, window 4, img 32, 10 classes
                model.embed_dim ... / --model swin_tiny_patch4_window7_224 --model-kwargs embed_dim=48
                depths='(2,2,2)' num_heads='(3,6,12)' patch_size=2 window_size=4 img_size=32
                --num-classes 10 --input-size 3 32 32
    drop path   0.1: model.drop_path_rate / --drop-path
    precision   fp32 on CPU: amp=none, --device cpu / --device cpu (no --amp)
    batch       64, drop_last: data.batch_size / --batch-size (timm drops the last train batch too)
    workers     1: data.num_workers / --workers (both keep workers alive across epochs)
    optimizer   AdamW, betas 0.9/0.999, eps 1e-8, weight decay 0.05 (not on norms, biases, position
                bias tables): train.weight_decay / --opt adamw --weight-decay 0.05 (timm's
                create_optimizer_v2 skips the same parameters)
    lr          2e-3 at batch 64, unscaled: train.base_lr with train.lr_base_batch = batch size /
                --lr (an absolute lr, so timm's --lr-base scaling does not apply)
    schedule    1 warmup epoch from 1e-5 then cosine to 1e-5, stepped per optimizer step, over `epochs`
                in total: train.warmup_epochs, train.warmup_lr, train.min_lr / --sched cosine
                --sched-on-updates --warmup-epochs 1 --warmup-prefix --epochs (epochs - warmup)
                --warmup-lr --min-lr (with --warmup-prefix timm adds the warmup epochs to --epochs and
                decays over the rest, which is swin-train's schedule)
    clipping    gradient norm 5.0: train.clip_grad / --clip-grad 5.0
    loss        label smoothing 0.1: aug.label_smoothing / --smoothing 0.1
    crop        random-resized crop, scale 0.6-1, ratio 3/4-4/3, bicubic, hflip 0.5: aug.crop_scale,
                data.interpolation / --scale 0.6 1 --train-interpolation bicubic --hflip 0.5
    off         no RandAugment, colour jitter, erasing, mixup, cutmix: aug.auto_augment=null,
                aug.color_jitter=0, aug.reprob=0, aug.mixup=0, aug.cutmix=0 / no --aa,
                --color-jitter 0, --reprob 0, --mixup 0 --cutmix 0
    eval        every epoch, plain 32 px resize (crop pct 1), bicubic, batch 64: eval.crop_pct=1.0 /
                --crop-pct 1.0 --interpolation bicubic --val-split val
    seed        0: seed / --seed 0
    checkpoint  every epoch end: save_freq=1 (last.pth, best.pth, fsynced) / timm's CheckpointSaver
                (last.pth.tar and checkpoint-N.pth.tar every epoch, model_best.pth.tar)
    logging     a line every 50 steps: print_freq / --log-interval 50

Both normalise in the main process (uint8 batches from the workers). Differences that stay: swin-train runs
each CPU batch as parts on threads (train.cpu_split, its default; timm's train.py has no such setting) and
seeds every sample's augmentation for bitwise resume; the models are initialised from different random
streams.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from swin_train.errors import ConfigError, DataError, SwinTrainError

# The parts are in scripts/trainerbench/: `python scripts/benchmark_trainer.py` puts scripts/ on sys.path,
# loading this file by path (tests/test_benchmark_trainer.py) does not.
if (scripts_dir := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.insert(0, scripts_dir)

from trainerbench.compare import compare, format_table, pair_order
from trainerbench.recipe import TRAINERS, Recipe, trainer_env
from trainerbench.runs import run_one
from trainerbench.shapes import count_images, ensure_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark_trainer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--timm-train", type=Path, help="timm's train.py (from a pytorch-image-models checkout)")
    p.add_argument(
        "--trainers",
        nargs="+",
        choices=TRAINERS,
        default=list(TRAINERS),
        help="default: both; 'swin' alone needs no --timm-train",
    )
    p.add_argument("--pairs", type=int, default=3, help="alternating rounds (each runs every trainer once)")
    p.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/; default: generated")
    p.add_argument("--train-images", type=int, default=1300, help="size of the generated train set")
    p.add_argument("--val-images", type=int, default=497, help="size of the generated val set")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("output/benchmark_trainer"),
        help="generated data and one folder per run (logs, outputs)",
    )
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--warmup-epochs", type=int, default=Recipe.warmup_epochs)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--workers", type=int, default=Recipe.workers)
    p.add_argument(
        "--threads", type=int, help="OMP/MKL threads for both trainers; default: torch's own choice"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    p.add_argument(
        "--memory-interval",
        type=float,
        default=5.0,
        help="seconds between samples of the process tree's PSS (0: off; max RSS is always measured)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (every run, medians, ratios, recipe)")
    return p


def check_settings(args: argparse.Namespace) -> None:
    """The settings that are not the recipe's (Recipe.check has those)."""
    if args.pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {args.pairs}")
    if (args.threads is not None and args.threads < 1) or args.timeout <= 0 or args.memory_interval < 0:
        raise ConfigError(
            f"--threads must be >= 1, --timeout > 0 and --memory-interval >= 0, got {args.threads}, "
            f"{args.timeout}, {args.memory_interval}"
        )


def find_timm_train(path: Path | None) -> Path:
    if path is None:
        raise ConfigError("--timm-train PATH is needed to run timm (or pass --trainers swin)")
    timm_train = path.expanduser().resolve()
    if not timm_train.is_file():
        raise ConfigError(f"--timm-train {path}: no such file; point it at timm's train.py")
    return timm_train


def training_data(args: argparse.Namespace, work_dir: Path, batch_size: int) -> tuple[Path, int]:
    """The ImageFolder root (--data, or the set generated once in the work folder) and its train images."""
    if args.data is not None:
        data_dir = args.data.expanduser().resolve()
    else:
        data_dir = ensure_dataset(work_dir / "data", train=args.train_images, val=args.val_images)
    train_images = count_images(data_dir / "train")
    count_images(data_dir / "val")
    if train_images < batch_size:
        raise DataError(f"{data_dir}/train has {train_images} images, fewer than one batch of {batch_size}")
    return data_dir, train_images


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    recipe = replace(
        Recipe(),
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    recipe.check()
    check_settings(args)
    trainers = [t for t in TRAINERS if t in args.trainers]
    timm_train = find_timm_train(args.timm_train) if "timm" in trainers else None
    work_dir = args.work_dir.expanduser().resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir, train_images = training_data(args, work_dir, recipe.batch_size)
    env = trainer_env(args.threads)
    results = []
    for pair, trainer in pair_order(args.pairs, trainers):
        print(f"pair {pair}: {trainer} ...", file=sys.stderr, flush=True)  # stdout holds only the result
        results.append(
            run_one(
                trainer,
                pair,
                recipe=recipe,
                data_dir=data_dir,
                work_dir=work_dir,
                timm_train=timm_train,
                env=env,
                train_images=train_images,
                timeout=args.timeout,
                memory_interval=args.memory_interval,
            )
        )
    comparison = compare(results)
    report = {
        "recipe": asdict(recipe),
        "data": str(data_dir),
        "threads": args.threads,
        "runs": [{**asdict(r), "measurement": asdict(r.measurement)} for r in results],
        **comparison,
    }
    print(json.dumps(report, indent=1) if args.json else format_table(results, comparison))
    return report


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with user errors as one line on stderr and exit status 2."""
    try:
        report = main(argv)
    except SwinTrainError as e:
        print(f"benchmark_trainer.py: error: {e}", file=sys.stderr)
        return e.exit_code
    failed = [r for r in report["runs"] if r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli())
