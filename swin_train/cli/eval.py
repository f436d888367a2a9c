"""swin-eval: exact top-1/top-5 of a checkpoint on an ImageFolder val/ split (one process or many under torchrun);
for a swin-train SimMIM pre-training checkpoint, its masked reconstruction loss on the val images."""

from __future__ import annotations

import json
from pathlib import Path

from swin_train.allocator import keep_freed_memory
from swin_train.cli.common import ArgumentParser, add_debug_flag, exit_process, run_cli, setup_logging
from swin_train.errors import DataError
from swin_train.models.arch import largest_activation_bytes


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
    p.add_argument(
        "--metrics-json",
        help='write {"top1", "top5", "loss", "num_samples", "num_skipped", "skipped_files"} (fractions) here',
    )
    p.add_argument("--force", action="store_true", help="replace an existing --metrics-json file")
    p.add_argument(
        "--throughput", action="store_true", help="measure inference img/s instead (no data needed)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    add_debug_flag(p)
    return p


def load_model_and_config(args):
    """(model with weights, config, class names or None) for swin-eval's arguments (loading.load_for_evaluation)."""
    from swin_train.loading import load_for_evaluation

    return load_for_evaluation(
        args.checkpoint,
        config=args.config,
        model_name=args.model,
        overrides=args.overrides,
        ema=args.ema,
        data_path=args.data_path,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    log = setup_logging()
    from swin_train.device import resolve_amp, resolve_device
    from swin_train.distributed import init_distributed, shutdown
    from swin_train.evaluation import throughput
    from swin_train.simmim_weights import is_simmim_file

    resolve_device(args.device)
    if args.metrics_json and not args.throughput:  # refused before minutes of evaluation, not after
        from swin_train.outputs import check_output_file

        check_output_file(
            args.metrics_json, inputs=[args.checkpoint], force=args.force, option="--metrics-json"
        )
    env = init_distributed(args.device)
    try:
        if is_simmim_file(args.checkpoint):
            return _evaluate_pretraining(args, env)
        model, cfg, expected_classes = load_model_and_config(args)
        _apply_command_line(cfg, args)
        if env.device.type == "cpu":
            keep_freed_memory(largest_activation_bytes(batch_size=cfg.eval_batch_size, **cfg.model_kwargs()))
        model.to(env.device)
        amp = resolve_amp(cfg.amp, env.device)
        if args.throughput:
            shape = dict(
                batch_size=cfg.eval_batch_size, in_chans=cfg.model.in_chans, img_size=cfg.data.img_size
            )
            img_s = throughput(model, **shape, device=env.device, amp=amp)
            log.info(
                "throughput: %.1f img/s (batch %d, %s, amp %s)",
                img_s,
                cfg.eval_batch_size,
                env.device,
                amp.name,
            )
            return 0
        m = _evaluate(model, cfg, env, amp, expected_classes)
        if env.is_main:
            _report(m, model.num_classes, env.world_size, args.metrics_json)
        return 0
    finally:
        shutdown()


def _pretraining_model_and_config(args):
    """(SimMIM model with the checkpoint's weights, config) for a swin-train pre-training checkpoint: its stored
    config (or --config; the architecture stays the checkpoint's), the overrides and --data-path over it. An
    official SimMIM file holds no config: it gets the one line on how to fine-tune it."""
    from swin_train.checkpoint import load_checkpoint, stored_task
    from swin_train.config import config_from_dict, load_config
    from swin_train.data.build import DATA_SOURCE_KEYS, check_stored_paths, typed_keys
    from swin_train.errors import ConfigError
    from swin_train.loading import ARCH_KEYS, load_exact_weights, select_weights
    from swin_train.models.simmim import simmim_state_dict
    from swin_train.simmim_weights import pretraining_checkpoint_error
    from swin_train.tasks import task_of

    state = load_checkpoint(args.checkpoint)
    if stored_task(state) != "simmim":
        raise pretraining_checkpoint_error(args.checkpoint)
    stored = state["config"]
    if args.model or args.throughput:
        raise ConfigError(
            f"{args.checkpoint} is a SimMIM pre-training checkpoint with its own architecture, evaluated by its "
            "masked reconstruction loss; drop --model / --throughput"
        )
    own = config_from_dict(stored).model_kwargs()
    cfg = load_config(args.config, args.overrides, base=None if args.config else stored)
    changed = sorted(k for k, v in cfg.model_kwargs().items() if k in ARCH_KEYS and v != own[k])
    if cfg.task != "simmim" or changed:
        raise ConfigError(
            f"{args.checkpoint} is a SimMIM pre-training checkpoint (task simmim, its own architecture); the "
            f"config or overrides change {', '.join(changed) or 'task'}: drop them"
        )
    if args.data_path:
        cfg.data.data_path = args.data_path
    if not args.config:  # data sources from the checkpoint's config: plain local paths only
        typed = typed_keys(args.overrides) | ({"data.data_path"} if args.data_path else set())
        check_stored_paths(cfg, f"the config stored in {args.checkpoint}", typed, DATA_SOURCE_KEYS)
    model = task_of(cfg).build_model(cfg, None)
    weights = select_weights(state, args.ema, f"checkpoint {args.checkpoint}")
    load_exact_weights(model, simmim_state_dict(weights), args.checkpoint)
    return model, cfg


def _evaluate_pretraining(args, env) -> int:
    """swin-eval on a SimMIM pre-training checkpoint: the masked reconstruction loss over the val images (the
    masks fixed per image, as the pre-training's validation computes it)."""
    from swin_train.data.pretraining import build_pretraining_data
    from swin_train.device import resolve_amp
    from swin_train.reconstruction import reconstruction_loss

    model, cfg = _pretraining_model_and_config(args)
    _apply_command_line(cfg, args)
    data = build_pretraining_data(cfg, env, device_pipeline=True)
    amp = resolve_amp(cfg.amp, env.device)
    m, _ = reconstruction_loss(
        model.to(env.device),
        data.val_loader,
        device=env.device,
        amp=amp,
        device_transform=data.device_transform,
    )
    if env.is_main:
        skipped = f"; {m['num_skipped']} unreadable left out" if m["num_skipped"] else ""
        print(
            f"masked reconstruction loss {m['loss']:.4f} | {m['num_samples']} images, {env.world_size} "
            f"process(es){skipped}"
        )
        if args.metrics_json:
            Path(args.metrics_json).write_text(json.dumps(m, indent=2) + "\n")
    return 0


def _apply_command_line(cfg, args) -> None:
    """--batch-size and --num-workers over the checkpoint's or config's values (--data-path: load_for_evaluation)."""
    if args.batch_size:
        cfg.data.batch_size = cfg.eval.batch_size = args.batch_size
    if args.num_workers is not None:
        cfg.data.num_workers = args.num_workers


def _evaluate(model, cfg, env, amp, expected_classes) -> dict:
    """Exact top-1/top-5 and loss of `model` on the config's val split, fed as the trainer's evaluation feeds
    it: uint8 batches from the workers, normalised on the device (prefetch.py) on every device, and split on CPU
    as the trainer splits, so a checkpoint's numbers are those its training run logged."""
    from swin_train.cpu_split import evaluation_split
    from swin_train.data.build import build_eval_data, device_transform_for
    from swin_train.evaluation import evaluate

    loader, classes = build_eval_data(cfg, env, device_pipeline=True)
    if len(classes) != model.num_classes:
        raise DataError(f"the data has {len(classes)} classes but the model has {model.num_classes}")
    if expected_classes and list(expected_classes) != list(classes):
        raise DataError("the val/ class folders differ from the class names stored in the checkpoint")
    cpu_split = evaluation_split(
        cfg.train.cpu_split,
        device_type=env.device.type,
        distributed=env.distributed,
        batch_size=cfg.eval_batch_size,
    )
    try:
        return evaluate(
            model,
            loader,
            device=env.device,
            amp=amp,
            num_classes=model.num_classes,
            show_progress=env.is_main,
            device_transform=device_transform_for(cfg, env, train=False),
            cpu_split=cpu_split,
        )
    finally:
        if cpu_split is not None:
            cpu_split.close()


def _report(m: dict, num_classes: int, world_size: int, metrics_json: str | None) -> None:
    k = m["topk"]
    from swin_train.data.folder import few

    note = f" (only {num_classes} classes: top-{k})" if k < 5 else ""
    skipped = (
        f"; {m['num_skipped']} unreadable left out: {few(m['skipped_files'])}" if m["num_skipped"] else ""
    )
    print(
        f"top-1 {100 * m['top1']:.3f}% | top-5 {100 * m['top5']:.3f}%{note} | loss {m['loss']:.4f} | "
        f"{m['num_samples']} images, {world_size} process(es){skipped}"
    )
    if metrics_json:
        keys = ("top1", "top5", "loss", "num_samples", "num_skipped", "skipped_files")
        out = {key: m[key] for key in keys}
        Path(metrics_json).write_text(json.dumps(out, indent=2) + "\n")


def cli(argv: list[str] | None = None) -> int:
    return run_cli("swin-eval", main, argv)


def console() -> None:
    """The console script: `cli()`, then `exit_process` (common.py)."""
    exit_process(cli())


if __name__ == "__main__":
    console()
