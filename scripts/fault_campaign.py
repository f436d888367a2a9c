"""Kill a training run at random instants, many times in a row on one output folder, and check that it
ends exactly where an uninterrupted run ends.

Each attempt re-runs the same `python -m swin_train.cli.train` command (which resumes from the newest
checkpoint in --output by itself) and is killed at an instant of one phase:

    anytime     a random time from the start to a few steps into training (starting up, loading, cleaning up)
    step        during an optimizer step, a random fraction of a step after one of the next few steps
    validation  after the epoch's last step (and its step checkpoint), before the epoch's metrics record
    checkpoint  the moment this attempt's temp file `.NAME.tmp-HOST-PID-...` of a save appears in --output
                (saves of any file, or of those named in --checkpoint-files)
    metrics     the moment a new record appears in metrics.jsonl (before last.pth / best.pth are saved)

Kills are SIGKILL; with --sigterm-share some step kills are SIGTERM instead, which must write a checkpoint
and exit 143. Phases are drawn in shuffled rounds so that every phase comes up. After the last kill the
command runs to its end, and the output folder is compared with an uninterrupted run of the same command
(run alongside): last.pth and best.pth (model, optimizer and all other state) and the kept step
checkpoints bitwise, metrics.jsonl equal except wall-clock fields, and no temp files left behind. Only
`output` and `data.num_workers` may differ in the stored configs: attempts cycle through --workers.

    python scripts/fault_campaign.py --kills 30 --epochs 12 --seed 0

`--launcher exec` (default) starts each attempt as that command. `--launcher fork` forks this process,
which has imported swin_train once, and calls the same CLI entry point in the child: the same code and
files without an interpreter start and imports per attempt (no kill then lands in the imports, which
write nothing); the tests use it to stay fast.

Exit status 0 when every check passes, 1 otherwise (the folders are then kept for inspection). The core is
`run_campaign(...) -> CampaignResult`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

# The parts are in scripts/faults/: `python scripts/fault_campaign.py` puts scripts/ on sys.path, loading this
# file by path (tests/test_fault_campaign.py) does not.
if (scripts_dir := str(Path(__file__).resolve().parent)) not in sys.path:
    sys.path.insert(0, scripts_dir)

from faults.campaign import run_campaign
from faults.plan import PHASES
from faults.results import summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills before the run may finish (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phases and instants")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1],
        help="data.num_workers, cycled over the attempts (default: 0 1)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="train.epochs (8 steps each; default 3)")
    parser.add_argument("--checkpoint-every", type=int, default=2, help="train.checkpoint_every_steps")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="kill phases")
    parser.add_argument(
        "--sigterm-share",
        type=float,
        default=0.2,
        help="share of step kills sent as SIGTERM (must checkpoint, exit 143)",
    )
    parser.add_argument(
        "--checkpoint-files",
        nargs="+",
        default=[],
        metavar="PREFIX",
        help="checkpoint kills only during saves of these names, e.g. best.pth step- (default: all)",
    )
    parser.add_argument(
        "--launcher",
        choices=["exec", "fork"],
        default="exec",
        help="exec: each attempt is the command; fork: a forked child of this process (faster)",
    )
    parser.add_argument(
        "--data-path", type=Path, help="an ImageFolder root (default: a generated shapes set)"
    )
    parser.add_argument("--root", type=Path, help="work folder (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (always kept on FAIL)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kills < 0 or args.epochs < 1 or args.checkpoint_every < 1 or min(args.workers) < 0:
        parser.error("--kills >= 0, --epochs >= 1, --checkpoint-every >= 1 and --workers >= 0 are needed")
    if not 0 <= args.sigterm_share <= 1:
        parser.error("--sigterm-share is a share in [0, 1]")
    root = args.root or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    echo = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.json else None
    result = run_campaign(
        root,
        kills=args.kills,
        seed=args.seed,
        workers=tuple(args.workers),
        epochs=args.epochs,
        checkpoint_every=args.checkpoint_every,
        phases=tuple(args.phases),
        sigterm_share=args.sigterm_share,
        checkpoint_files=tuple(args.checkpoint_files),
        launcher=args.launcher,
        data_path=args.data_path,
        echo=echo,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else summary(result))
    if args.keep or not result.passed:
        print(f"work folder kept: {root}", file=sys.stderr)
    elif args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
