"""`swin-train` end to end: build data/model/optimizer from a Config, resume, run epochs, checkpoint, log.

The loop itself is `engine.train_one_epoch`; this module wires the pieces and owns the run's state on disk.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swin_train import checkpoint as ckpt
from swin_train.allocator import keep_freed_memory
from swin_train.config import Config, config_from_dict, config_to_dict, dump_config
from swin_train.data import (
    ExactEvalSampler,
    ResumableTrainSampler,
    SyntheticDataset,
    build_datasets,
    build_eval_transform,
    build_loader,
    build_mixup,
    build_train_criterion,
    build_train_transform,
)
from swin_train.distributed import DistEnv, all_gather_objects, any_rank, barrier, init_distributed, shutdown
from swin_train.ema import ModelEma
from swin_train.engine import Amp, TrainState, evaluate, resolve_amp, train_one_epoch
from swin_train.errors import ConfigError, DataError, TrainingError
from swin_train.models.convert import check_fits
from swin_train.models.flex import flex_attention_available
from swin_train.models.pretrained import load_pretrained
from swin_train.models.swin import SwinTransformer
from swin_train.optim import WarmupCosineSchedule, build_optimizer, scaled_lrs
from swin_train.prefetch import DeviceTransform

log = logging.getLogger("swin_train")

# Exit status after a requested stop (SIGTERM / SIGINT): 128 + signal number, the shell convention, so
# schedulers see "killed by a signal" and requeue; the checkpoint written on the way out resumes the run.
STOP_EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclass
class Data:
    train_loader: object
    val_loader: object
    train_sampler: ResumableTrainSampler
    class_names: list[str]
    num_train: int
    num_val: int
    # the uint8 pipeline's device half (normalise, erase); None: the workers return normalised floats
    device_transform: DeviceTransform | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Stopper:
    """Turns SIGTERM/SIGINT into a request to stop after the current optimizer step."""

    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in STOP_EXIT_CODES:
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum


class TrainingStopped(Exception):
    """Raised after a requested stop has been checkpointed; carries the exit status."""

    def __init__(self, exit_code: int):
        super().__init__(f"stopped with status {exit_code}")
        self.exit_code = exit_code


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_root(cfg: Config, env: DistEnv) -> Path:
    """The ImageFolder root; for the built-in shapes set, generated once (on rank 0) into its cache."""
    if cfg.data.dataset == "shapes":
        from swin_train.shapes import default_shapes_root, ensure_shapes_dataset

        root = Path(cfg.data.data_path) if cfg.data.data_path else default_shapes_root()
        if env.is_main:
            ensure_shapes_dataset(root, img_size=cfg.data.img_size, seed=0)
        barrier()
        return root
    if not cfg.data.data_path:
        raise DataError("no data path: pass --data-path DIR (a folder with train/ and val/ ImageFolders)")
    return Path(cfg.data.data_path)


def eval_transform(cfg: Config, *, uint8: bool = False):
    d = cfg.data
    return build_eval_transform(d.img_size, crop_pct=cfg.eval.crop_pct, interpolation=d.interpolation,
                                mean=d.mean, std=d.std, uint8=uint8)  # fmt: skip


def build_data(cfg: Config, env: DistEnv, *, device_pipeline: bool = False) -> Data:
    """Datasets and loaders. `device_pipeline`: the workers return uint8 images and normalisation and
    random erasing run on `env.device` (`Data.device_transform`); otherwise the workers do all of it."""
    d, a = cfg.data, cfg.aug
    device_transform = None
    if d.synthetic:  # random tensors: measures the loop without decoding
        classes = [f"class_{i}" for i in range(cfg.model.num_classes)]
        train_set = SyntheticDataset(
            50 * d.batch_size * env.world_size, len(classes), d.img_size, seed=cfg.seed
        )
        val_set = SyntheticDataset(
            4 * d.batch_size * env.world_size, len(classes), d.img_size, seed=cfg.seed + 1
        )
    else:
        train_tf = build_train_transform(
            d.img_size, auto_augment=a.auto_augment, color_jitter=a.color_jitter, reprob=a.reprob,
            remode=a.remode, recount=a.recount, hflip=a.hflip, crop_scale=a.crop_scale,
            interpolation=d.interpolation, mean=d.mean, std=d.std, uint8=device_pipeline,
        )  # fmt: skip
        train_set, val_set, classes = build_datasets(
            data_root(cfg, env), train_transform=train_tf, eval_transform=eval_transform(cfg, uint8=device_pipeline),
            skip_bad_images=d.skip_bad_images,
        )  # fmt: skip
        if device_pipeline:
            device_transform = DeviceTransform(env.device, d.mean, d.std, reprob=a.reprob, remode=a.remode,
                                               recount=a.recount, seed=cfg.seed, rank=env.rank)  # fmt: skip
    train_sampler = ResumableTrainSampler(
        len(train_set), num_replicas=env.world_size, rank=env.rank, seed=cfg.seed
    )
    common = dict(num_workers=d.num_workers, pin_memory=d.pin_memory, seed=cfg.seed, rank=env.rank)
    train_loader = build_loader(
        train_set, batch_size=d.batch_size, sampler=train_sampler, drop_last=True, **common
    )
    val_sampler = ExactEvalSampler(len(val_set), env.world_size, env.rank)
    val_loader = build_loader(
        val_set, batch_size=cfg.eval.batch_size or d.batch_size, sampler=val_sampler, **common
    )
    return Data(
        train_loader, val_loader, train_sampler, list(classes), len(train_set), len(val_set), device_transform
    )


def build_model(cfg: Config, num_classes: int) -> SwinTransformer:
    if cfg.model.num_classes != num_classes:
        raise DataError(
            f"the data has {num_classes} classes but model.num_classes is {cfg.model.num_classes}; "
            f"set model.num_classes={num_classes}"
        )
    model = SwinTransformer(**cfg.model_kwargs())
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, head_map=cfg.model.head_map)
    return model


def check_attention_backend(cfg: Config, device: torch.device) -> None:
    """model.attention=flex needs FlexAttention with gradients on `device`, and no attention dropout."""
    if cfg.model.attention != "flex":
        return
    if not flex_attention_available(device):
        raise ConfigError(
            f"model.attention=flex needs a CUDA GPU of compute capability 8.0+ with Triton (this run is on "
            f"{device}); use model.attention=auto"
        )
    if cfg.model.attn_drop_rate > 0:
        raise ConfigError(
            "model.attention=flex has no attention dropout; set model.attn_drop_rate=0 or use auto"
        )


def preprocessing(cfg: Config) -> dict:
    """What a user of the trained model needs to feed it images (stored in checkpoints)."""
    d = cfg.data
    return {"img_size": d.img_size, "crop_pct": cfg.eval.crop_pct, "interpolation": d.interpolation,
            "mean": list(d.mean), "std": list(d.std)}  # fmt: skip


class Run:
    """Everything a training run holds, and how it is saved and restored.

    `device_pipeline` (None: on CUDA only) sends uint8 batches to the device and normalises and erases
    them there (`prefetch.DeviceTransform`). On CPU the workers do it by default: they normalise in
    parallel, the main process would do it serially. Not a config option: the tests set it on CPU.
    """

    def __init__(self, cfg: Config, env: DistEnv, *, device_pipeline: bool | None = None):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.output)
        self.amp: Amp = resolve_amp(cfg.amp, env.device)
        if env.device.type == "cuda":  # TF32 tensor cores for the fp32 matmuls/convs left outside autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed + env.rank)
        if device_pipeline is None:
            device_pipeline = env.device.type == "cuda"
        check_attention_backend(cfg, env.device)
        self.data = build_data(cfg, env, device_pipeline=device_pipeline)
        self.model = build_model(cfg, self.data.num_classes).to(env.device)
        t = cfg.train
        self.steps_per_epoch = len(self.data.train_loader) // t.accumulation_steps
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the train set ({self.data.num_train} images) gives no optimizer step per epoch at batch "
                f"{cfg.data.batch_size} x {env.world_size} processes x {t.accumulation_steps} accumulation; "
                "lower the batch size"
            )
        global_batch = cfg.data.batch_size * env.world_size
        self.lrs, self.lr_text = scaled_lrs(t.base_lr, t.warmup_lr, t.min_lr, global_batch=global_batch,
                                            accumulation_steps=t.accumulation_steps, base_batch=t.lr_base_batch,
                                            world_size=env.world_size)  # fmt: skip
        self.optimizer = build_optimizer(self.model, lr=self.lrs["lr"], weight_decay=t.weight_decay,
                                         betas=tuple(t.betas), eps=t.eps, layer_decay=t.layer_decay,
                                         device_type=env.device.type)  # fmt: skip
        self.schedule = WarmupCosineSchedule(self.optimizer, self.lrs["lr"], self.lrs["warmup_lr"], self.lrs["min_lr"],
                                             total_steps=t.epochs * self.steps_per_epoch,
                                             warmup_steps=t.warmup_epochs * self.steps_per_epoch)  # fmt: skip
        self.ema = (
            ModelEma(self.model, t.ema_decay, warmup=t.ema_warmup, every=t.ema_every) if t.ema else None
        )
        a = cfg.aug
        self.mixup = build_mixup(mixup=a.mixup, cutmix=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                                 mode=a.mixup_mode, label_smoothing=a.label_smoothing,
                                 num_classes=self.data.num_classes)  # fmt: skip
        if self.mixup is not None and cfg.data.batch_size % 2:
            raise ConfigError(f"mixup/cutmix needs an even data.batch_size, got {cfg.data.batch_size}")
        self.criterion = build_train_criterion(
            mixup_active=self.mixup is not None, label_smoothing=a.label_smoothing
        )
        self.state = TrainState()
        self.best = {"top1": -1.0, "epoch": -1, "on": t.best_on}
        self.train_model: nn.Module = self.model
        if t.compile:
            self.train_model = torch.compile(self.model, fullgraph=True)
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rng_per_rank: list) -> dict:
        return {
            "format": "swin-train/1",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "train_state": asdict(self.state),
            "best": dict(self.best),
            "config": config_to_dict(self.cfg),
            "rng": rng_per_rank,
            "world_size": self.env.world_size,
            "class_names": list(self.data.class_names),
            "preprocess": preprocessing(self.cfg),
        }

    def save(self, name: str) -> Path | None:
        """Write a checkpoint atomically (rank 0 writes; every rank contributes its RNG state)."""
        rng = all_gather_objects(ckpt.capture_rng_state())
        path = self.out / name
        if self.env.is_main:
            ckpt.save_checkpoint(self.state_dict(rng), path)
        barrier()
        return path

    def load(self, state: dict, path: Path) -> None:
        check_fits(state["model"], self.model, str(path))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.amp.scaler and state.get("scaler"):
            self.amp.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.state = TrainState(**state["train_state"])
        self.best = dict(state["best"])
        rng = state["rng"]
        if state.get("world_size") == self.env.world_size and len(rng) == self.env.world_size:
            ckpt.restore_rng_state(rng[self.env.rank])
        else:
            log.warning(
                "world size changed since %s: random streams are re-seeded (resume is not bitwise)", path
            )
            seed_everything(self.cfg.seed + self.env.rank + 1000 * self.state.global_step)
        saved_cfg = config_from_dict(state["config"])
        if config_to_dict(saved_cfg) != config_to_dict(self.cfg):
            log.warning("the config differs from the one in %s; continuing with the current config", path)


def setup_output(cfg: Config, env: DistEnv) -> logging.Handler | None:
    """Create the output folder (checked writable), start log.txt and write config.yaml; rank 0 only."""
    out = Path(cfg.output)
    handler = None
    if env.is_main:
        ckpt.check_output_writable(out, min_free_bytes=0)  # the size check follows once the model exists
        handler = logging.FileHandler(out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        for path in ckpt.remove_stale_temp_files(out):
            log.warning("removed %s, left behind by a save that was killed before it finished", path)
        (out / "config.yaml").write_text(dump_config(cfg))
    barrier()
    return handler


def checkpoint_bytes(model: nn.Module) -> int:
    """Rough size of a checkpoint: weights + two AdamW moments (+ an EMA copy), fp32."""
    return 4 * 4 * sum(p.numel() for p in model.parameters()) + (1 << 20)


def resume_if_possible(run: Run, resume: str | None) -> None:
    if resume:
        found = (Path(resume), ckpt.load_checkpoint(resume))
    else:
        found = ckpt.find_resume_checkpoint(run.out, logger=log)
    if found is None:
        return
    path, state = found
    if state.get("format") != "swin-train/1":
        raise TrainingError(
            f"{path} is not a swin-train training checkpoint; use model.pretrained for weights"
        )
    run.load(state, path)
    s = run.state
    log.info("resuming from %s: epoch %d, step %d of %d (global step %d)", path, s.epoch, s.step_in_epoch,
             run.steps_per_epoch, s.global_step)  # fmt: skip


class Metrics:
    """metrics.jsonl (one record per epoch) and TensorBoard scalars, written by rank 0 only.

    On resume, records of epochs that will be trained again are dropped, and TensorBoard purges events
    after the resumed step, so both read as if the run had never stopped.
    """

    def __init__(self, out: Path, enabled: bool, state: TrainState):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] < state.epoch]  # fmt: skip
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=state.global_step or None)

    def epoch(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, int | float) and key != "epoch" and math.isfinite(value):
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(
    cfg: Config, *, resume: str | None = None, device: str | None = None, device_pipeline: bool | None = None
) -> dict:
    """Train as `cfg` says; returns the last epoch's record. Raises TrainingStopped after SIGTERM/SIGINT.
    `device_pipeline`: see `Run` (None: on CUDA only)."""
    env = init_distributed(device)
    if env.device.type == "cpu":
        keep_freed_memory()  # CPU steps page-fault their activations otherwise (see allocator.py)
    if not env.is_main:
        log.setLevel(logging.WARNING)
    handler = setup_output(cfg, env)
    try:
        return _train(cfg, env, resume, device_pipeline)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        shutdown()


def _train(cfg: Config, env: DistEnv, resume: str | None, device_pipeline: bool | None) -> dict:
    log.info(
        "effective config (also in %s):\n%s", Path(cfg.output) / "config.yaml", dump_config(cfg).rstrip()
    )
    run = Run(cfg, env, device_pipeline=device_pipeline)
    if env.is_main:
        ckpt.check_output_writable(run.out, checkpoint_bytes(run.model))
    resume_if_possible(run, resume)
    t = cfg.train
    log.info("device %s x %d processes, amp %s; %d train / %d val images, %d classes; %d steps per epoch; "
             "images normalised %s", env.device, env.world_size, run.amp.name, run.data.num_train, run.data.num_val,
             run.data.num_classes, run.steps_per_epoch,
             "on the device" if run.data.device_transform
             else "nowhere (synthetic tensors)" if cfg.data.synthetic else "in the data workers")  # fmt: skip
    log.info("effective lr: %s", run.lr_text)
    if run.data.num_classes < 5:
        log.info("only %d classes: 'top5' is reported as top-%d", run.data.num_classes, run.data.num_classes)
    metrics = Metrics(run.out, env.is_main, run.state)
    stopper = Stopper()
    stopper.install()

    def after_step(state: TrainState) -> bool:
        if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
            raise TrainingError(
                f"{state.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(step {state.global_step}); lower train.base_lr, use amp bf16, or check the data. "
                "The last good checkpoint is kept"
            )
        stop = any_rank(stopper.signum is not None, env.device)
        if stop or (t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0):
            run.save(ckpt.step_checkpoint_name(state.global_step))
            if env.is_main:
                ckpt.prune_step_checkpoints(run.out, t.keep_checkpoints)
        return stop

    record: dict = {}
    try:
        while run.state.epoch < t.epochs:
            s = run.state
            run.data.train_sampler.set_epoch(s.epoch)
            run.data.train_sampler.set_start(s.step_in_epoch * t.accumulation_steps, cfg.data.batch_size)
            stats = train_one_epoch(
                run.train_model, run.data.train_loader, s, optimizer=run.optimizer, schedule=run.schedule,
                criterion=run.criterion, amp=run.amp, device=env.device, steps_per_epoch=run.steps_per_epoch,
                accumulation_steps=t.accumulation_steps, clip_grad=t.clip_grad, mixup=run.mixup, ema=run.ema,
                after_step=after_step, show_progress=env.is_main, print_freq=cfg.print_freq,
                device_transform=run.data.device_transform,
            )  # fmt: skip
            if stats.stopped:
                signum = stopper.signum or signal.SIGTERM
                log.info("stop requested (%s): checkpoint written at global step %d; run the same command to "
                         "continue", signal.Signals(signum).name, s.global_step)  # fmt: skip
                raise TrainingStopped(STOP_EXIT_CODES[signum])
            record = {"epoch": s.epoch, "train_loss": stats.loss, "train_lr": stats.lr,
                      "train_grad_norm": stats.grad_norm, "train_img_s": stats.images_per_second * env.world_size,
                      "train_epoch_time": stats.seconds, "train_nonfinite_steps": stats.nonfinite}  # fmt: skip
            record.update(validate(run))
            s.next_epoch()
            improved = record[f"{'val' if t.best_on == 'raw' else 'ema'}_top1"] > run.best["top1"]
            if improved:
                run.best = {"top1": record[f"{'val' if t.best_on == 'raw' else 'ema'}_top1"], "epoch": s.epoch - 1,
                            "on": t.best_on}  # fmt: skip
            record["best_top1"] = run.best["top1"]
            # The record goes first: a kill before the checkpoint re-trains this epoch and rewrites it.
            metrics.epoch(record, s.global_step)
            log.info(epoch_line(record, run))
            if s.epoch % cfg.save_freq == 0 or s.epoch == t.epochs:
                run.save(ckpt.LAST)
            if improved:
                run.save(ckpt.BEST)
    finally:
        stopper.uninstall()
        metrics.close()
    if not record and run.state.epoch >= t.epochs:
        run.save(
            ckpt.LAST
        )  # resumed a finished run (e.g. from best.pth after last.pth was damaged): rewrite it
    if record:
        log.info("done: top-1 %.2f%%, top-%d %.2f%% on %d val images; checkpoints in %s", 100 * record["val_top1"],
                 record["val_topk"], 100 * record["val_top5"], record["val_num_samples"], run.out)  # fmt: skip
    return record


def validate(run: Run) -> dict:
    kw = dict(device=run.env.device, amp=run.amp, num_classes=run.data.num_classes,
              device_transform=run.data.device_transform)  # fmt: skip
    result = {f"val_{k}": v for k, v in evaluate(run.model, run.data.val_loader, **kw).items()}
    if run.ema is not None:
        result.update({f"ema_{k}": v for k, v in evaluate(run.ema.module, run.data.val_loader, **kw).items()})
    return result


def epoch_line(r: dict, run: Run) -> str:
    k = r["val_topk"]
    line = (f"epoch {r['epoch'] + 1}/{run.cfg.train.epochs}: loss {r['train_loss']:.4f}, lr {r['train_lr']:.2e}, "
            f"{r['train_img_s']:.1f} img/s, {r['train_epoch_time']:.1f}s | val top-1 {100 * r['val_top1']:.2f}%, "
            f"top-{k} {100 * r['val_top5']:.2f}%, loss {r['val_loss']:.4f}")  # fmt: skip
    if "ema_top1" in r:
        line += f" | ema top-1 {100 * r['ema_top1']:.2f}%, top-{k} {100 * r['ema_top5']:.2f}%"
    if r["train_nonfinite_steps"]:
        line += f" | {r['train_nonfinite_steps']} non-finite steps skipped"
    return line + f" | best {100 * r['best_top1']:.2f}%"


__all__ = ["train", "TrainingStopped", "STOP_EXIT_CODES", "Run"]
