"""swin-eval: exact top-1/top-5 of a checkpoint on an ImageFolder val/ split (one process or many under torchrun)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from swin_train.allocator import keep_freed_memory
from swin_train.cli.common import ArgumentParser, add_debug_flag, run_cli, setup_logging
from swin_train.errors import ConfigError, DataError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="swin-eval", description=__doc__)
    p.add_argument(
        "--checkpoint", required=True, help="swin-train checkpoint, or bare weights (any Swin layout)"
    )
    p.add_argument("--data-path", help="ImageFolder root with val/ (default: the checkpoint config's)")
    p.add_argument("--config", help="YAML config (needed for bare weights unless --model is given)")
    p.add_argument("--model", help="variant name for bare weights, e.g. swin_tiny_patch4_window7_224")
    p.add_argument("--batch-size", type=int, help="eval batch size per process")
    p.add_argument("--num-workers", type=int, help="data loader workers per process")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--metrics-json", help='write {"top1", "top5", "loss", "num_samples"} (fractions) here')
    p.add_argument(
        "--throughput", action="store_true", help="measure inference img/s instead (no data needed)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    add_debug_flag(p)
    return p


def load_model_and_config(args):
    """(model with weights, config): config from the checkpoint when it is a swin-train one."""
    from swin_train.checkpoint import load_checkpoint
    from swin_train.config import load_config
    from swin_train.models.pretrained import load_pretrained
    from swin_train.models.swin import SwinTransformer

    state = load_checkpoint(args.checkpoint)
    trained_here = state.get("format") == "swin-train/1"
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={args.model}")
    if trained_here and not args.config:
        cfg = load_config(None, overrides, base=state["config"])  # the training config, overrides on top
    elif args.config:
        cfg = load_config(args.config, overrides)
    elif args.model:  # bare weights of a named variant: its image size and the official eval crop
        from swin_train.models.registry import variant_arch

        img_size = variant_arch(args.model)["img_size"]
        crop = 0.875 if img_size == 224 else 1.0
        cfg = load_config(None, [f"data.img_size={img_size}", f"eval.crop_pct={crop}", *overrides])
    else:
        raise ConfigError(
            f"{args.checkpoint} holds bare weights without a config; pass --model NAME or --config YAML"
        )
    if args.data_path:
        cfg.data.data_path = args.data_path
    if args.batch_size:
        cfg.data.batch_size = cfg.eval.batch_size = args.batch_size
    if args.num_workers is not None:
        cfg.data.num_workers = args.num_workers
    model = SwinTransformer(**cfg.model_kwargs())
    load_pretrained(model, state, strict=True, use_ema=args.ema)
    return model, cfg, state


def throughput(model, cfg, device, amp, batches: int = 10, warmup: int = 3) -> float:
    import torch

    batch = cfg.eval.batch_size or cfg.data.batch_size
    x = torch.randn(batch, cfg.model.in_chans, cfg.data.img_size, cfg.data.img_size, device=device)
    model.eval()
    with torch.inference_mode(), amp.autocast():
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    log = setup_logging()
    from swin_train.data import ExactEvalSampler, build_eval_dataset, build_loader
    from swin_train.distributed import init_distributed, shutdown
    from swin_train.engine import evaluate, resolve_amp
    from swin_train.prefetch import DeviceTransform
    from swin_train.trainer import data_root, eval_transform

    env = init_distributed(args.device)
    if env.device.type == "cpu":
        keep_freed_memory()
    try:
        model, cfg, state = load_model_and_config(args)
        model.to(env.device)
        amp = resolve_amp(cfg.amp, env.device)
        if args.throughput:
            img_s = throughput(model, cfg, env.device, amp)
            log.info("throughput: %.1f img/s (batch %d, %s, amp %s)", img_s, cfg.eval.batch_size or cfg.data.batch_size,
                     env.device, amp.name)  # fmt: skip
            return 0
        # on CUDA, as in training: uint8 batches from the workers, normalised on the GPU (prefetch.py)
        on_device = env.device.type == "cuda"
        dataset, classes = build_eval_dataset(data_root(cfg, env), eval_transform(cfg, uint8=on_device),
                                              skip_bad_images=cfg.data.skip_bad_images)  # fmt: skip
        if len(classes) != model.num_classes:
            raise DataError(f"the data has {len(classes)} classes but the model has {model.num_classes}")
        expected = state.get("class_names")
        if expected and list(expected) != list(classes):
            raise DataError("the val/ class folders differ from the class names stored in the checkpoint")
        loader = build_loader(dataset, batch_size=cfg.eval.batch_size or cfg.data.batch_size,
                              sampler=ExactEvalSampler(len(dataset), env.world_size, env.rank),
                              num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory)  # fmt: skip
        device_transform = DeviceTransform(env.device, cfg.data.mean, cfg.data.std) if on_device else None
        m = evaluate(model, loader, device=env.device, amp=amp, num_classes=model.num_classes,
                     show_progress=env.is_main, device_transform=device_transform)  # fmt: skip
        if env.is_main:
            k = m["topk"]
            note = f" (only {model.num_classes} classes: top-{k})" if k < 5 else ""
            print(f"top-1 {100 * m['top1']:.3f}% | top-5 {100 * m['top5']:.3f}%{note} | loss {m['loss']:.4f} | "
                  f"{m['num_samples']} images, {env.world_size} process(es)")  # fmt: skip
            if args.metrics_json:
                out = {key: m[key] for key in ("top1", "top5", "loss", "num_samples")}
                Path(args.metrics_json).write_text(json.dumps(out, indent=2) + "\n")
        return 0
    finally:
        shutdown()


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-eval", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
