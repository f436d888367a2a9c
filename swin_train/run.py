"""A training run's parts, built from a Config: data, model, optimizer, schedule, EMA, loss; and how they are
saved into and restored from one training checkpoint (`checkpoint.training_checkpoint`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from swin_train import checkpoint as ckpt
from swin_train.config import Config, config_diff, config_from_dict, config_to_dict
from swin_train.cpu_split import CpuSplit, choose_parts, evaluation_split
from swin_train.data.build import Data
from swin_train.data.seeding import seed_everything
from swin_train.data.transforms import Preprocess
from swin_train.device import Amp, resolve_amp, wrap_for_training
from swin_train.distributed import DistEnv, all_gather_objects, barrier
from swin_train.ema import ModelEma
from swin_train.errors import CheckpointError, ConfigError, DataError, TrainingError
from swin_train.loading import ARCH_KEYS, load_exact_weights
from swin_train.losses import build_mixup, build_train_criterion
from swin_train.optim import build_optimizer, build_schedule, scaled_lrs
from swin_train.tasks import task_of

log = logging.getLogger("swin_train")


@dataclass
class TrainState:
    """Counters that must survive a resume (saved in every checkpoint), including the running sums of
    the current epoch, so an epoch's reported loss is the same whether or not it was interrupted."""

    epoch: int = 0  # the epoch being trained (0-based)
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    epoch_loss_sum: float = 0.0  # sum of micro-batch losses in this epoch
    epoch_grad_norm_sum: float = 0.0  # sum of finite gradient norms in this epoch
    epoch_nonfinite: int = 0  # skipped steps in this epoch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = self.epoch_grad_norm_sum = 0.0
        self.epoch_nonfinite = 0


class PendingSteps:
    """The numbers of the optimizer steps taken since the last flush, still on the device: each step's loss
    (summed over its micro-batches), gradient norm and whether that norm was finite. `flush` reads them in
    one host wait and adds them to the TrainState one step after another, in the order and float
    arithmetic of a step-by-step `.item()` (bitwise the same sums), so a step never waits for the device."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.finite: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.finite.append(finite)

    def flush(self, s: TrainState, max_nonfinite_steps: int) -> None:
        """Add the pending steps to `s` (whose global_step already counts them); TrainingError at the first
        of them that makes `max_nonfinite_steps` non-finite steps in a row."""
        if not self.losses:
            return
        # float32 -> float64 is exact: these are the doubles `.item()` returned
        numbers = [torch.stack(values).double() for values in (self.losses, self.grad_norms, self.finite)]
        losses, grad_norms, finite = torch.stack(numbers).tolist()
        first_step = s.global_step - len(losses) + 1
        self.losses, self.grad_norms, self.finite = [], [], []
        for i, (loss, grad_norm, ok) in enumerate(zip(losses, grad_norms, finite)):
            if ok:
                s.nonfinite_in_a_row = 0
                s.epoch_grad_norm_sum += grad_norm
            else:
                s.nonfinite_total += 1
                s.nonfinite_in_a_row += 1
                s.epoch_nonfinite += 1
            s.epoch_loss_sum += loss
            if s.nonfinite_in_a_row >= max_nonfinite_steps:
                raise TrainingError(
                    f"{s.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"(step {first_step + i}); lower train.base_lr, use amp bf16, or check the data. "
                    "The last good checkpoint is kept"
                )


def check_pretrained_given(cfg: Config, resume: str | None) -> None:
    """A fine-tuning recipe started without its weights would fine-tune random ones, for as long as asked;
    refused before anything is written. A resume takes its weights from the checkpoint."""
    if cfg.model.pretrained_required and not cfg.model.pretrained and not resume:
        raise ConfigError(
            "this recipe fine-tunes weights (model.pretrained_required: true) but model.pretrained is not set; "
            "pass model.pretrained=WEIGHTS (released or your own), or model.pretrained_required=false to "
            "train from random weights"
        )


class Run:
    """Everything a training run holds, and how it is saved and restored.

    `device_pipeline` sends uint8 batches to the device and normalises and erases them there
    (`data.prefetch.DeviceTransform`), on CPU too: float batches from the workers made a whole CPU run slower
    although the workers normalise in parallel (README, whole runs against timm). Not a config option: the
    tests set it both ways.
    """

    def __init__(self, cfg: Config, env: DistEnv, *, device_pipeline: bool = True):
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.output)
        t = cfg.train
        self.amp: Amp = resolve_amp(cfg.amp, env.device)
        if env.device.type == "cuda":  # TF32 tensor cores for the fp32 matmuls/convs left outside autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        seed_everything(cfg.seed + env.rank)
        self.task = task_of(cfg)  # what differs between classification and pre-training (tasks.py)
        self.data: Data = self.task.build_data(cfg, env, device_pipeline=device_pipeline)
        self.model = self.task.build_model(cfg, self.data).to(env.device)
        self.steps_per_epoch = len(self.data.train_loader) // t.accumulation_steps
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the train set ({self.data.num_train} images) gives no optimizer step per epoch at batch "
                f"{cfg.data.batch_size} x {env.world_size} processes x {t.accumulation_steps} accumulation; "
                "lower the batch size"
            )
        self.lrs, self.lr_text = scaled_lrs(
            t.base_lr,
            t.warmup_lr,
            t.min_lr,
            global_batch=cfg.data.batch_size * env.world_size,
            accumulation_steps=t.accumulation_steps,
            base_batch=t.lr_base_batch,
            world_size=env.world_size,
        )
        self.optimizer = build_optimizer(
            self.model, t, lr=self.lrs["lr"], device_type=env.device.type, skip_names=self.task.no_decay_names
        )
        self.schedule, schedule_text = build_schedule(
            self.optimizer, t, self.lrs, steps_per_epoch=self.steps_per_epoch
        )
        self.lr_text += f"; {schedule_text}"
        self.mixup = build_mixup(cfg.aug, self.data.num_classes) if self.task.labels else None
        if self.mixup is not None and cfg.data.batch_size % 2:
            raise ConfigError(f"mixup/cutmix needs an even data.batch_size, got {cfg.data.batch_size}")
        self.criterion = build_train_criterion(cfg.aug, mixup_active=self.mixup is not None)
        self.state = TrainState()
        self.pending = PendingSteps()  # steps whose numbers are not in `state` yet (`flush_steps`)
        # rank 0 writes; on a GPU in the background, so that nobody waits for the disk (checkpoint.py)
        self.writer = ckpt.CheckpointWriter(background=env.device.type == "cuda")
        self.best = self.task.initial_best(t.best_on)
        self.last_saved_step = 0
        self.train_model: nn.Module = wrap_for_training(
            self.model, compile=t.compile, distributed=env.distributed, device=env.device
        )
        # after DDP, which gives every rank rank 0's weights: each rank's EMA starts from those, as the model does
        self.ema = (
            ModelEma(self.model, t.ema_decay, warmup=t.ema_warmup, every=t.ema_every) if t.ema else None
        )
        threads = torch.get_num_threads()
        parts, self.cpu_split_text = choose_parts(
            t.cpu_split,
            device_type=env.device.type,
            distributed=env.distributed,
            compiled=t.compile,
            grad_checkpointing=cfg.model.grad_checkpointing,
            dropout=cfg.model.drop_rate > 0 or cfg.model.attn_drop_rate > 0,
            batch_size=cfg.data.batch_size,
            threads=threads,
        )
        self.cpu_split = CpuSplit(parts, threads) if parts > 1 else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.eval_split = evaluation_split(
            t.cpu_split,
            device_type=env.device.type,
            distributed=env.distributed,
            batch_size=cfg.eval_batch_size,
            reuse=self.cpu_split,
        )

    def close(self) -> None:
        """Stop the threads and data workers the run started (after a stop's checkpoint too: the workers
        leave stop signals to this process, so it ends them); a checkpoint still being written is finished
        first (a failed one is logged: an error is on its way)."""
        for split in {self.cpu_split, self.eval_split} - {None}:
            split.close()
        try:
            self.writer.wait()
        except Exception as exc:
            log.error("%s", exc)
        self.data.train_loader.close()
        self.data.val_loader.close()

    def wait_for_saves(self) -> None:
        """Return once every checkpoint asked for is on disk; raises the error of one that failed."""
        self.writer.wait()

    # ------------------------------------------------------------------ checkpoints
    def flush_steps(self) -> None:
        """Read the pending steps' numbers into `state` (one host wait): at log lines, saves and epoch ends.
        Raises TrainingError when train.max_nonfinite_steps steps in a row were not finite."""
        self.pending.flush(self.state, self.cfg.train.max_nonfinite_steps)

    def save(self, name: str, then: Callable[[], object] | None = None) -> Path:
        """Write a checkpoint atomically (rank 0 writes, then calls `then`; every rank contributes its RNG
        state). The others go on once rank 0 has its snapshot; `wait_for_saves` waits for the disk."""
        self.flush_steps()
        rng = all_gather_objects(ckpt.capture_rng_state())
        path = self.out / name
        if self.env.is_main:
            state = ckpt.training_checkpoint(
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                schedule=self.schedule.state_dict(),
                scaler=self.amp.scaler.state_dict() if self.amp.scaler else None,
                ema=self.ema.state_dict() if self.ema else None,
                train_state=asdict(self.state),
                best=dict(self.best),
                config=config_to_dict(self.cfg),
                rng=rng,
                world_size=self.env.world_size,
                class_names=self.data.class_names,
                shard_streams_per_rank=getattr(self.data.train_sampler, "streams_per_rank", None),
                preprocess=Preprocess.from_config(self.cfg).to_dict(),
            )
            self.writer.save(state, path, then)
        barrier()
        self.last_saved_step = self.state.global_step
        return path

    def load(self, state: dict, path: Path) -> None:
        if not ckpt.is_training_checkpoint(state):
            raise CheckpointError(
                f"{path} is not a swin-train training checkpoint; use model.pretrained for weights"
            )
        self._check_same_task(state, path)
        self._check_same_classes(state, path)
        load_exact_weights(self.model, state["model"], str(path))  # names a tensor of another shape
        self._check_same_architecture(state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.amp.scaler and state.get("scaler"):
            self.amp.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.state = TrainState(**state["train_state"])
        self.best = dict(state["best"])
        self.task.resumed(self, config_from_dict(state["config"]), path)  # may start a new best
        self.last_saved_step = self.state.global_step
        rng = state["rng"]
        streams = getattr(
            self.data.train_sampler, "streams_per_rank", None
        )  # shards: the order depends on it
        if state.get("shard_streams_per_rank", streams) != streams:
            log.warning(
                "data layout changed since %s (%s -> %s shard readers per process): this epoch resumes in a "
                "different order; bitwise equality holds for the same processes and workers",
                path,
                state.get("shard_streams_per_rank"),
                streams,
            )
        if state.get("world_size") == self.env.world_size and len(rng) == self.env.world_size:
            ckpt.restore_rng_state(rng[self.env.rank])
        else:
            log.warning(
                "world size changed since %s (%s -> %d processes): random streams are re-seeded and the data "
                "order differs (resume is not bitwise)",
                path,
                state.get("world_size"),
                self.env.world_size,
            )
            seed_everything(self.cfg.seed + self.env.rank + 1000 * self.state.global_step)
        changed = config_diff(config_to_dict(config_from_dict(state["config"])), config_to_dict(self.cfg))
        if changed:
            log.warning(
                "the config differs from the one in %s (%s); continuing with the current config",
                path,
                "; ".join(changed),
            )

    @property
    def finished(self) -> bool:
        """Every epoch of train.epochs is trained (a resumed run may have nothing left to do)."""
        return self.state.epoch >= self.cfg.train.epochs

    def _check_same_task(self, state: dict, path: Path) -> None:
        """CheckpointError when the checkpoint's run trained for another task (a classifier resumed as
        pre-training, or the reverse): its weights, optimizer and best.pth mean something else here."""
        theirs = ckpt.stored_task(state)
        if theirs == self.cfg.task:
            return
        fix = (
            f"fine-tune from it in a new output folder (model.pretrained={path})"
            if theirs == "simmim"
            else "resume it with task=classification, or pre-train in a new output folder"
        )
        raise CheckpointError(
            f"{path} is a {theirs} checkpoint, this run is task={self.cfg.task}; resume it with its own task, "
            f"or {fix}"
        )

    def _check_same_classes(self, state: dict, path: Path) -> None:
        """DataError when the data's classes are not the checkpoint's: resuming would relabel every class whose
        index now names another (the head's row 0 learned 'cat'; the data's class 0 is 'ant')."""
        theirs, ours = [str(c) for c in state.get("class_names", ())], self.data.class_names
        if theirs == ours:
            return
        differ = next(
            (f"class {i} is '{a}' there, '{b}' here" for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
            f"{len(theirs)} classes there, {len(ours)} here",
        )
        raise DataError(
            f"{path} was trained on other classes than the data's ({differ}); resume it on its own data, or "
            f"fine-tune from it in a new output folder (model.pretrained={path})"
        )

    def _check_same_architecture(self, state: dict, path: Path) -> None:
        """ConfigError when the config builds another architecture than the checkpoint's run: weights that
        fit are not enough (a Swin V2's window, pre-training windows and image size change no shape)."""
        theirs = config_from_dict(state["config"]).model_kwargs()
        ours = self.cfg.model_kwargs()
        changed = [f"{k} {theirs[k]} -> {ours[k]}" for k in ARCH_KEYS if theirs.get(k) != ours.get(k)]
        if changed:
            raise ConfigError(
                f"{path} was trained as another model ({'; '.join(changed[:3])}); resume it with its own "
                f"config, or fine-tune from it in a new output folder (model.pretrained={path})"
            )


@dataclass
class Resume:
    """The checkpoint a run continues from, and the newer ones that did not load (to move aside)."""

    path: Path
    damaged: list[Path]


def load_resume_checkpoint(run: Run, resume: str | None) -> Resume | None:
    """Restore `run` from `resume`, or from the newest loadable checkpoint in the output folder (None: there is
    none). Reads only: a resume that is refused (another model, other classes) leaves the folder as it was."""
    damaged: list[Path] = []
    if resume:
        found = (Path(resume), ckpt.load_checkpoint(resume))
    else:
        found = ckpt.find_resume_checkpoint(run.out, logger=log, damaged=damaged)
    if found is None:
        return None
    path, state = found
    run.load(state, path)
    return Resume(path, damaged)


def needs_tidying(run: Run, resume: Resume) -> bool:
    """Whether continuing from `resume` has files to put right (continue_run): newer checkpoints that did not
    load, or step checkpoints beyond train.keep_checkpoints that a kill left between a save and its pruning."""
    steps = [p for p in ckpt.checkpoint_candidates(run.out) if p.name not in (ckpt.LAST, ckpt.BEST)]
    return bool(resume.damaged) or len(steps) > run.cfg.train.keep_checkpoints


def continue_run(run: Run, resume: Resume) -> None:
    """Once the output folder is the run's: the newer checkpoints that failed to load are moved aside, so
    that nothing damaged stays where the next step (`swin-eval OUT/best.pth`, a later resume) would pick it up,
    and step checkpoints beyond train.keep_checkpoints pruned."""
    barrier()  # every rank has read its checkpoint before the damaged ones move
    for bad in resume.damaged:
        if run.env.is_main:
            log.warning("moved %s aside to %s: it does not load", bad, ckpt.set_aside(bad).name)
        if bad.name == ckpt.BEST:  # its weights are gone: the next validation writes a new best.pth
            run.best = run.task.initial_best(run.cfg.train.best_on)
    if run.env.is_main:  # a run killed between a step checkpoint and its pruning left one too many
        for extra in ckpt.prune_step_checkpoints(run.out, run.cfg.train.keep_checkpoints):
            log.info("removed %s: train.keep_checkpoints=%d", extra, run.cfg.train.keep_checkpoints)
    s = run.state
    log.info(
        "resuming from %s: epoch %d, step %d of %d (global step %d)",
        resume.path,
        s.epoch + 1,  # counted from 1, as the log's epoch and step lines count it
        s.step_in_epoch,
        run.steps_per_epoch,
        s.global_step,
    )


def checkpoint_bytes(model: nn.Module) -> int:
    """Rough size of a checkpoint: weights + two AdamW moments (+ an EMA copy), fp32."""
    return 4 * 4 * sum(p.numel() for p in model.parameters()) + (1 << 20)
