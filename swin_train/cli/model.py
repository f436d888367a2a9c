"""swin-model: print the Layer/Block hierarchy of a Swin variant with parameters and FLOPs, or with --features HxW
the feature maps its backbone (create_model(features_only=True)) gives for an H x W image."""

from __future__ import annotations

import json

import torch

from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli
from swin_train.errors import ConfigError
from swin_train.models.registry import ARCHITECTURE_ONLY, build_model, default_num_classes, variant_names
from swin_train.models.summary import describe_model


def _n(x: int) -> str:
    return f"{x:,}"


def _g(flops: int) -> str:
    return f"{flops / 1e9:.3f}G" if flops >= 1e8 else f"{flops / 1e6:.2f}M"


def format_table(title: str, d: dict) -> str:
    rows = [("module", "input", "dim", "heads", "window", "depth", "params", "FLOPs")]
    pe = d["patch_embed"]
    rows.append(
        (
            "PatchEmbed",
            "x".join(map(str, d["img_size"])),
            str(d["embed_dim"]),
            "",
            "",
            "",
            _n(pe["params"]),
            _g(pe["flops"]),
        )
    )
    for layer in d["layers"]:
        res = "x".join(map(str, layer["resolution"]))
        rows.append(
            (
                f"Layer {layer['index']}",
                res,
                str(layer["dim"]),
                str(layer["heads"]),
                str(layer["window"]),
                str(layer["depth"]),
                _n(layer["params"]),
                _g(layer["flops"]),
            )
        )
        for block in layer["blocks"]:
            kind = block["type"] + (f" (shift {block['shift']})" if block["shift"] else "")
            rows.append(
                (
                    f"  Block {block['index']} {kind}",
                    "",
                    "",
                    "",
                    "",
                    "",
                    _n(block["params"]),
                    _g(block["flops"]),
                )
            )
        if layer["downsample"]:
            ds = layer["downsample"]
            rows.append(
                (f"  PatchMerging -> {ds['out_dim']}", "", "", "", "", "", _n(ds["params"]), _g(ds["flops"]))
            )
    rows.append(("Norm + pool + head", "", "", "", "", "", _n(d["head"]["params"]), _g(d["head"]["flops"])))
    rows.append(("total", "", "", "", "", "", _n(d["params"]), _g(d["flops"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    lines.append("FLOPs are multiply-adds per image, as the Swin paper counts them.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="swin-model", description=__doc__)
    source = parser.add_mutually_exclusive_group()
    with_recipe = [name for name in variant_names() if name not in ARCHITECTURE_ONLY]
    source.add_argument(
        "--model",
        help=f"variant name, with its recipe in configs/: {', '.join(with_recipe)}; architecture only (no "
        f"official weights or recipe): {', '.join(ARCHITECTURE_ONLY)}. A *_22k name has the 21841-class "
        "head of its ImageNet-22k weights",
    )
    source.add_argument("--config", help="a swin-train YAML config (its model section and data.img_size)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.window_size=12")
    parser.add_argument("--num-classes", type=int, help="override the number of classes")
    parser.add_argument("--json", action="store_true", help="print JSON (top-level 'params' and 'flops')")
    parser.add_argument(
        "--features",
        metavar="HxW",
        help="print the backbone's feature maps (norm{i}: channels, stride, C x H x W) for an H x W image",
    )
    add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)

    from swin_train.models.registry import DEFAULT_VARIANT, variant_arch

    if args.model:
        try:
            variant = variant_arch(args.model)
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"") + "; pass --model with a known name") from None
    if args.config or args.overrides:
        from swin_train.config import load_config

        # --model with overrides: the variant at its own image size, then the overrides
        named = [f"model.name={args.model}", f"data.img_size={variant['img_size']}"] if args.model else []
        cfg = load_config(args.config, [*named, *args.overrides])
        kwargs = cfg.model_kwargs()
        title = cfg.model.name or "custom Swin"
    else:
        title = args.model or DEFAULT_VARIANT
        kwargs = {
            "num_classes": default_num_classes(title),
            **(variant if args.model else variant_arch(title)),
        }
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.features:
        print(describe_features(title, kwargs, args.features, args.json))
        return 0
    with torch.device("meta"):  # shapes only: parameters and FLOPs, no memory and no initialisation
        model = build_model(**kwargs)
    summary = describe_model(model)
    if args.json:
        print(json.dumps({"model": title, **summary}, indent=2))
    else:
        pretrained = model.pretrained_window_sizes
        windows = f" (pre-trained with {list(pretrained)})" if pretrained and any(pretrained) else ""
        heading = f"{title}: Swin V{model.version}, {model.num_classes} classes, window {model.window_size}"
        print(format_table(heading + windows, summary))
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'800x1333' -> (800, 1333); ConfigError (one line) for anything but two positive sides."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise ConfigError(f"--features takes HxW, e.g. 800x1333, got {text!r}")
    return height, width


def describe_features(title: str, kwargs: dict, size: str, as_json: bool) -> str:
    """The backbone's maps for an image of `size` ("HxW") as a table or JSON; ConfigError for a bad size."""
    from swin_train.models.backbone import SwinBackbone

    height, width = parse_size(size)
    with torch.device("meta"):
        backbone = SwinBackbone(**{k: v for k, v in kwargs.items() if k != "always_partition"})
        try:
            backbone.check_input(torch.empty(1, backbone.in_chans, height, width))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    shapes = backbone.feature_shapes((height, width))
    maps = [dict(info, shape=list(shape)) for info, shape in zip(backbone.feature_info, shapes)]
    if as_json:
        return json.dumps({"model": title, "size": [height, width], "features": maps}, indent=2)
    rows = [("map", "channels", "stride", "C x H x W")]
    rows += [
        (m["module"], str(m["num_chs"]), str(m["reduction"]), " x ".join(map(str, m["shape"]))) for m in maps
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"{title} as a backbone (detection rule: window {backbone.window_size} in every stage) at {height}x{width}:"
    ]
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-model", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
