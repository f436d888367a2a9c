"""`swin-data`: prepare data for training at scale.

swin-data pack SRC OUT    webdataset shards from an ImageFolder root or the official zip layout
swin-data index DIR       the per-shard sample counts (_info.json) for shards that came without one
"""

from __future__ import annotations

import sys
from pathlib import Path

from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli, setup_logging


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="swin-data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    p = commands.add_parser(
        "pack",
        help="write webdataset shards (NAME-train-0000.tar, ..., _info.json)",
        epilog="Example: swin-data pack /data/imagenet /data/imagenet-wds --workers 16",
    )
    p.add_argument(
        "src", help="a folder with train/ and val/ ImageFolders, or train.zip + train_map.txt (+ val)"
    )
    p.add_argument("out", help="output folder; re-run the same command to continue a pack that was stopped")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument(
        "--max-size", type=int, metavar="PX", help="store images resized to at most PX on the longer side"
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip undecodable images (listed) instead of failing"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train split's shuffle before sharding")
    p.add_argument("--name", default="data", help="shard name prefix: NAME-train-0000.tar (default data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--force",
        action="store_true",
        help="pack into a folder that holds a shard index not written by a pack",
    )
    add_debug_flag(p)
    i = commands.add_parser("index", help="count the samples of NAME-SPLIT-NNNN.tar shards into _info.json")
    i.add_argument("folder")
    i.add_argument("--force", action="store_true", help="replace an existing _info.json")
    add_debug_flag(i)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging()
    check_outputs(args)
    if args.command == "pack":
        from swin_train.data.pack import PackOptions, pack

        options = PackOptions(
            shard_size=args.shard_size,
            max_size=args.max_size,
            skip_bad=args.skip_bad,
            seed=args.seed,
            name=args.name,
        )
        pack(
            args.src,
            args.out,
            options,
            workers=args.workers,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    else:
        from swin_train.data.shards import write_index

        log.info("wrote %s", write_index(args.folder))
    return 0


def check_outputs(args) -> None:
    """Before anything is written: a pack goes outside its source (shards and an _info.json inside it would make
    the source read as shards) and continues only its own pack; an index replaces an _info.json only with
    --force."""
    from swin_train.data.pack import PLAN_NAME
    from swin_train.data.shards import require_webdataset
    from swin_train.errors import ConfigError
    from swin_train.outputs import check_output_file

    require_webdataset()  # a missing package is said first: nothing can be written without it
    if args.command == "index":
        check_output_file(Path(args.folder) / "_info.json", inputs=[], force=args.force, option="the index")
        return
    src, out = (Path(p).expanduser().resolve() for p in (args.src, args.out))
    if out == src or src in out.parents:
        raise ConfigError(f"OUT {args.out} is inside SRC {args.src}; write the shards to a folder outside it")
    if (out / "_info.json").exists() and not (out / PLAN_NAME).exists() and not args.force:
        raise ConfigError(
            f"{args.out} holds a shard index that no pack wrote; pack into an empty folder, or pass --force to "
            "replace its _info.json"
        )


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-data", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
