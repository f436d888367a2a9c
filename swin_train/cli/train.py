"""swin-train: train a Swin Transformer from a YAML config (one process, or many under torchrun)."""

from __future__ import annotations

from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli, setup_logging


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="swin-train",
        description=__doc__,
        epilog="Example: swin-train --config configs/swin_tiny_patch4_window7_224.yaml --data-path /data/imagenet "
        "train.epochs=100. Multi-GPU: torchrun --nproc_per_node 8 --no-python swin-train ...; on SLURM: "
        "srun swin-train ... (see scripts/slurm/train.sbatch)",
    )
    parser.add_argument("--config", help="YAML config (may inherit with _base_)")
    parser.add_argument(
        "--data-path",
        help="ImageFolder root with train/ and val/, a webdataset shard folder, "
        "brace pattern or pipe: URL, or a Hugging Face dataset",
    )
    parser.add_argument("--output", help="output folder (checkpoints, logs); re-running resumes from it")
    parser.add_argument("--batch-size", type=int, help="per-process batch size (data.batch_size)")
    parser.add_argument("--resume", help="resume from this checkpoint instead of the output folder's latest")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=10"
    )
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging()
    from swin_train.config import load_config
    from swin_train.data.build import check_stored_paths, typed_keys
    from swin_train.data.loader import worker_death
    from swin_train.outputs import is_run_config
    from swin_train.stopping import StopAborted, TrainingStopped
    from swin_train.trainer import train

    cfg = load_config(
        args.config, args.overrides, data_path=args.data_path, output=args.output, batch_size=args.batch_size
    )
    if args.config and is_run_config(args.config):  # a stored config: its paths are plain local paths
        shortcuts = {"data.data_path": args.data_path, "output": args.output}
        typed = typed_keys(args.overrides) | {key for key, value in shortcuts.items() if value}
        check_stored_paths(cfg, args.config, typed)
    try:
        train(cfg, resume=args.resume, device=args.device)
    except TrainingStopped as stop:
        return stop.exit_code
    except StopAborted:  # the second Ctrl-C, which the log has already reported
        return 130
    except RuntimeError as error:  # a worker found dead while its batch was awaited: one line, no traceback
        died = worker_death(error)
        if died is None:
            raise
        raise died from None
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-train", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
