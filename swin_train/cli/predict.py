"""swin-predict: classify images with a trained swin-train checkpoint (top-k classes with probabilities)."""

from __future__ import annotations

import json
import sys

from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in its error message


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="swin-predict",
        description=__doc__,
        epilog="Example: swin-predict --checkpoint output/run/best.pth photos/ cat.jpg --topk 3. Exits 1 "
        "when some files could not be read (they are named on stderr), 2 on a usage or checkpoint error.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a swin-train checkpoint (last.pth, best.pth, ...)"
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched recursively"
    )
    parser.add_argument("--topk", type=_positive_int, default=5, help="classes per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument(
        "--own-size",
        action="store_true",
        help="classify each image at its own size (no resize or crop; the model pads it), not the eval crop",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add_debug_flag(parser)
    return parser


def format_prediction(prediction) -> str:
    """The file, then one `probability  class` line per top-k class."""
    lines = [prediction.file]
    lines += [f"  {c.prob:.4f}  {c.name}" for c in prediction.topk]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from swin_train.predict import Failure, Predictor, find_images

    files, missing = find_images(args.inputs)
    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=args.device, ema=args.ema, own_size=args.own_size
    )
    failed = [Failure(str(path), "No such file or directory") for path in missing]
    for failure in failed:
        print(f"swin-predict: cannot read {failure.file}: {failure.error}", file=sys.stderr)
    predictions = []
    for result in predictor.predict_files(files, topk=args.topk, batch_size=args.batch_size):
        if isinstance(result, Failure):
            failed.append(result)
            print(f"swin-predict: cannot read {result.file}: {result.error}", file=sys.stderr)
        elif args.json:
            predictions.append(result)
        else:
            print(format_prediction(result), flush=True)  # streamed: long runs show progress
    if args.json:
        document = {
            "checkpoint": str(args.checkpoint),
            "predictions": [p.to_dict() for p in predictions],
            "failed": [f.to_dict() for f in failed],
        }
        print(json.dumps(document, indent=2))
    if failed:
        print(
            f"swin-predict: {len(failed)} of {len(files) + len(missing)} files could not be read",
            file=sys.stderr,
        )
        return 1
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-predict", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
