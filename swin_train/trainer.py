"""`swin-train` end to end: the output folder, the run, and the loop that reads as what happens.

for each epoch:    for each optimizer step: train_step, maybe log, maybe stop, maybe checkpoint
                   then: evaluate, record metrics, checkpoint last/best
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from swin_train import checkpoint as ckpt
from swin_train.allocator import keep_freed_memory
from swin_train.config import Config, dump_config
from swin_train.data.build import check_data_path, check_output_outside_data
from swin_train.data.prefetch import prefetch
from swin_train.device import check_attention_backend, resolve_amp, resolve_device
from swin_train.distributed import (
    DistEnv,
    StopVote,
    announce_failure,
    barrier,
    init_distributed,
    shutdown,
)
from swin_train.errors import CheckpointError
from swin_train.metrics import Metrics, StepMeter, step_line
from swin_train.models.arch import largest_activation_bytes
from swin_train.run import (
    Run,
    check_pretrained_given,
    checkpoint_bytes,
    continue_run,
    load_resume_checkpoint,
    needs_tidying,
)
from swin_train.stopping import Stopper, TrainingStopped

log = logging.getLogger("swin_train")


def train(
    cfg: Config, *, resume: str | None = None, device: str | None = None, device_pipeline: bool = True
) -> dict:
    """Train as `cfg` says; returns the last epoch's record ({} when there was nothing left to train). Raises
    TrainingStopped after SIGTERM/SIGINT/SIGUSR1. `device_pipeline`: see `Run`.

    Everything that can be checked is checked before the output folder is touched (data, device, model,
    pretrained weights, the checkpoint to resume and whether it fits): a run that cannot start writes nothing,
    and an existing run's files stay as they were."""
    resolve_device(device)  # a missing GPU is a one-line error, before any process group or file
    check_data_path(cfg)  # nothing is written for a run that cannot start
    check_output_outside_data(cfg)
    check_pretrained_given(cfg, resume)
    env = init_distributed(device)
    # what this machine cannot run is a one-line error before the output folder is touched (Run resolves
    # the same Amp again for itself)
    resolve_amp(cfg.amp, env.device)
    check_attention_backend(cfg.model.attention, cfg.model.attn_drop_rate, env.device)
    if env.device.type == "cpu":  # CPU steps page-fault their large activations otherwise (see allocator.py)
        keep_freed_memory(largest_activation_bytes(batch_size=cfg.data.batch_size, **cfg.model_kwargs()))
    if not env.is_main:
        log.setLevel(logging.WARNING)
    if env.distributed:
        log.info(
            "launched by %s: rank %d of %d (rendezvous %s)",
            env.source,
            env.rank,
            env.world_size,
            env.rendezvous,
        )
    try:
        with held_log_records(env.is_main) as held:
            if env.is_main:
                check_output_usable(Path(cfg.output))
            log.info(
                "effective config (also in %s):\n%s",
                Path(cfg.output) / "config.yaml",
                dump_config(cfg).rstrip(),
            )
            run = Run(cfg, env, device_pipeline=device_pipeline)
            try:
                if env.is_main:
                    check_output_space(run.out, checkpoint_bytes(run.model))
                resumed = load_resume_checkpoint(run, resume)
                if resumed is not None and run.finished and not needs_tidying(run, resumed):
                    log_finished(run, resumed.path)
                    return {}
                with output_folder(cfg, env, held):
                    if resumed is not None:
                        continue_run(run, resumed)
                    log_run_summary(run)
                    return train_epochs(run)
            finally:
                run.close()
    except TrainingStopped:
        raise
    except Exception as err:  # the other ranks end now, not at the group's timeout (distributed.py)
        announce_failure(err)
        raise
    finally:
        shutdown()


def check_output_usable(out: Path) -> None:
    """Before a run builds anything: --output is not a file, can be created, and no other run is using it."""
    from swin_train.runlock import check_not_locked

    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise CheckpointError(
            f"output folder {out} is not writable: {existing} is a file; choose another --output"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"output folder {out} is not writable: permission denied on {existing}; choose another --output"
        )
    check_not_locked(out)


def check_output_space(out: Path, min_free_bytes: int) -> None:
    """A checkpoint of `min_free_bytes` fits where the output folder is or will be (checked once more, with
    a written probe, when the folder is created)."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise CheckpointError(
            f"only {free // 10**6} MB free in {existing}, a checkpoint needs about "
            f"{-(-min_free_bytes // 10**6)} MB; free space or change --output"
        )


@contextmanager
def held_log_records(hold: bool):
    """Log records held in memory until log.txt exists (`output_folder` hands them over): a start that fails
    leaves no log.txt, one that starts has every line from the first."""
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1, target=None)
    if hold:
        log.addHandler(held)
    try:
        yield held
    finally:
        log.removeHandler(held)
        held.close()


def log_finished(run: Run, path: Path) -> None:
    """A run resumed with nothing left to train: say so and what to do, write nothing."""
    s, epochs = run.state, run.cfg.train.epochs
    log.info(
        "%s has finished its run (%d of train.epochs=%d epochs trained): nothing to train, nothing written. "
        "To train it longer, run it again with train.epochs=N (N > %d); to start a new run, choose another "
        "--output",
        path,
        s.epoch,
        epochs,
        s.epoch,
    )


@contextmanager
def output_folder(cfg: Config, env: DistEnv, held: logging.handlers.MemoryHandler | None = None):
    """Rank 0 owns the output folder for the run: created and checked writable, locked against a second run,
    log.txt started (with the `held` records of the start), leftovers of killed saves removed, config.yaml
    written. Released on the way out."""
    from swin_train.runlock import acquire_output_lock

    out = Path(cfg.output)
    handler = lock = None
    try:
        if env.is_main:
            ckpt.check_output_writable(out, min_free_bytes=0)
            lock = acquire_output_lock(out)
            handler = logging.FileHandler(out / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            if held is not None:
                held.setTarget(handler)
                held.flush()
                log.removeHandler(held)
            log.addHandler(handler)
            for path in ckpt.remove_stale_temp_files(out):
                log.warning("removed %s, left behind by a save that was killed before it finished", path)
            (out / "config.yaml").write_text(dump_config(cfg))
        barrier()
        yield out
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def log_run_summary(run: Run) -> None:
    env, data = run.env, run.data
    where = (
        "on the device" + (" (flipped and augmented there too)" if data.device_transform.augment else "")
        if data.device_transform
        else "nowhere (synthetic tensors)"
        if run.cfg.data.synthetic
        else "in the data workers"
    )
    log.info(
        "device %s x %d processes, amp %s; %d train / %d val images, %s; %d steps per epoch; "
        "images normalised %s",
        env.device,
        env.world_size,
        run.amp.name,
        data.num_train,
        data.num_val,
        f"{data.num_classes} classes" if run.task.labels else f"no labels (task {run.task.name})",
        run.steps_per_epoch,
        where,
    )
    log.info("effective lr: %s", run.lr_text)
    if env.device.type == "cpu":
        evaluation = f"{run.eval_split.parts} parts" if run.eval_split else "off"
        log.info(
            "CPU threads: train step %s; evaluation %s (train.cpu_split)", run.cpu_split_text, evaluation
        )
    if run.task.labels and data.num_classes < 5:
        log.info("only %d classes: 'top5' is reported as top-%d", data.num_classes, data.num_classes)


def train_epochs(run: Run) -> dict:
    """Epochs from where `run.state` stands to `train.epochs`; returns the last epoch's record."""
    cfg, env, t = run.cfg, run.env, run.cfg.train
    stopper = Stopper(
        steps_unsaved=lambda: run.state.global_step - run.last_saved_step,
        global_step=lambda: run.state.global_step,
        announce=env.is_main,
    )
    vote = StopVote()  # every rank stops after the same step, without a per-step wait (distributed.py)
    record: dict = {}
    with (
        stopper,
        Metrics(run.out, env.is_main, epoch=run.state.epoch, global_step=run.state.global_step) as metrics,
    ):
        while run.state.epoch < t.epochs:
            s = run.state
            batches = epoch_batches(run)
            run.train_model.train()
            meter = StepMeter()
            split_share = run.cpu_split.main_thread_share() if run.cpu_split else nullcontext()
            with progress_bar(run) as bar, split_share:  # evaluation below takes its own split's share
                while s.step_in_epoch < run.steps_per_epoch:
                    loss, grad_norm, images = train_step(run, batches)
                    meter.add(images)
                    bar.update(1)
                    if s.step_in_epoch % cfg.print_freq == 0 or s.step_in_epoch == run.steps_per_epoch:
                        log_step(run, bar, loss, grad_norm, meter.window_rate())
                        run.flush_steps()  # the host waits here; train.max_nonfinite_steps is checked here
                    if vote.after_step(stopper.requested):
                        stop(run, stopper)
                    if t.checkpoint_every_steps and s.global_step % t.checkpoint_every_steps == 0:
                        save_step_checkpoint(run)
            if vote.now(stopper.requested):  # a signal during the epoch's last step: no validation first
                stop(run, stopper)
            record = epoch_record(run, meter)
            record.update(run.task.evaluate(run))
            if vote.now(stopper.requested):  # a signal during validation: redo only validation
                stop(run, stopper)
            finish_epoch(run, record, metrics)
    if not record and run.state.epoch >= t.epochs:
        run.save(
            ckpt.LAST
        )  # resumed a finished run (e.g. from best.pth after last.pth was damaged): rewrite it
    run.wait_for_saves()
    if record:
        log.info(run.task.done_line(record, run.out))
    return record


def epoch_batches(run: Run):
    """This epoch's (images, targets) on the device from the current step on: the sampler skips what was
    trained before a resume without decoding it; uint8 batches are normalised and erased on the device,
    seeded by (epoch, micro-batch index)."""
    s, t, data = run.state, run.cfg.train, run.data
    data.train_sampler.set_epoch(s.epoch)
    first = s.step_in_epoch * t.accumulation_steps
    data.train_sampler.set_start(first, run.cfg.data.batch_size)
    transform = None
    if data.device_transform is not None:
        epoch = s.epoch
        transform = lambda images, i: data.device_transform(
            images, epoch, i
        )  # i: micro-batch index in the epoch
    return prefetch(
        data.train_loader,
        run.env.device,
        transform,
        start=first,
        limit=run.steps_per_epoch * t.accumulation_steps - first,
    )


def train_step(run: Run, batches) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step over `accumulation_steps` micro-batches; a step whose gradient norm is not finite
    is skipped (no optimizer/EMA update) and counted, on the device: nothing here waits for it. Returns
    (last micro-batch loss, grad norm, images); the step's numbers wait in `run.pending`."""
    model, t, amp = run.train_model, run.cfg.train, run.amp
    step_loss = torch.zeros((), device=run.env.device)
    images_seen = 0

    def forward(images, targets, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss, what to backpropagate: the loss scaled for accumulation, a part's share and AMP)"""
        with amp.autocast():
            loss = run.task.loss(run, model, images, targets)
        scaled = loss * share / t.accumulation_steps  # share 1: loss / accumulation_steps, bitwise as before
        return loss.detach().float(), amp.scaler.scale(scaled) if amp.scaler else scaled

    for micro in range(t.accumulation_steps):
        images, targets = next(batches)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        last = micro == t.accumulation_steps - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():  # DDP: sync once
            if run.cpu_split is not None:  # parts of the batch at once, one thread each (cpu_split.py)
                loss = run.cpu_split.run(forward, images, targets, run.trainable)
            else:
                loss, objective = forward(images, targets)
                objective.backward()
        step_loss += loss
        images_seen += images.shape[0]
    if amp.scaler:
        amp.scaler.unscale_(run.optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad or math.inf, foreach=True)
    finite = torch.isfinite(grad_norm)
    optimizer_step(run, finite)
    if amp.scaler:
        amp.scaler.update()  # from the inf checks of unscale_, as GradScaler.step would have left them
    run.optimizer.zero_grad(set_to_none=True)
    run.schedule.step()
    run.pending.add(step_loss, grad_norm, finite)
    run.state.step_in_epoch += 1
    run.state.global_step += 1
    return loss, grad_norm, images_seen


def optimizer_step(run: Run, finite: torch.Tensor) -> None:
    """The optimizer and EMA update when `finite` (a bool tensor) holds, else nothing. Fused optimizers
    (AdamW on CUDA and CPU) take it on the device as their `found_inf` (what GradScaler passes them): the
    kernel leaves the parameters and moments as they are and takes back its step count, bitwise what not
    calling `step()` leaves; the EMA masks its update with it. Others read it on the host."""
    optimizer = run.optimizer
    if getattr(optimizer, "_step_supports_amp_scaling", False):  # torch's mark of found_inf support
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        if run.ema is not None:
            run.ema.update(run.train_model, finite)
    elif finite:  # a host wait for the device
        run.amp.scaler.step(optimizer) if run.amp.scaler else optimizer.step()
        if run.ema is not None:
            run.ema.update(run.train_model)


@contextmanager
def progress_bar(run: Run):
    """A tqdm bar for terminals (rank 0); logs and CI get `log_step` lines instead."""
    show = run.env.is_main and sys.stderr.isatty()
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=run.state.step_in_epoch,
        desc=f"epoch {run.state.epoch + 1}",
        disable=not show,
        dynamic_ncols=True,
        mininterval=1.0,
        leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()


def log_step(run: Run, bar, loss: torch.Tensor, grad_norm: torch.Tensor, img_s: float) -> None:
    s = run.state
    lr = run.schedule.last_lr
    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
    log.info(
        step_line(s.epoch, s.step_in_epoch, run.steps_per_epoch, loss.item(), lr, grad_norm.item(), img_s)
    )


def stop(run: Run, stopper: Stopper) -> None:
    """Checkpoint where the run stands (a step checkpoint, resumable mid-epoch) and leave with its status."""
    save_step_checkpoint(run)
    run.wait_for_saves()
    log.info(
        "stop requested (%s): checkpoint written at global step %d; run the same command to continue",
        stopper.signal_name if stopper.requested else "by a signal to another rank",
        run.state.global_step,
    )
    raise TrainingStopped(stopper.exit_code)


def save_step_checkpoint(run: Run) -> None:
    """A step checkpoint, then (once it is on disk) the older ones beyond train.keep_checkpoints go."""
    run.save(
        ckpt.step_checkpoint_name(run.state.global_step),
        then=lambda: ckpt.prune_step_checkpoints(run.out, run.cfg.train.keep_checkpoints),
    )


def epoch_record(run: Run, meter: StepMeter) -> dict:
    """The epoch's training numbers; loss and grad norm from the counters that survive a resume."""
    run.flush_steps()
    s, t = run.state, run.cfg.train
    done = s.step_in_epoch
    finite = done - s.epoch_nonfinite
    return {
        "epoch": s.epoch,
        "train_loss": s.epoch_loss_sum / (done * t.accumulation_steps),
        "train_lr": run.schedule.last_lr,
        "train_grad_norm": s.epoch_grad_norm_sum / finite if finite else float("nan"),
        "train_img_s": meter.rate * run.env.world_size,
        "train_epoch_time": meter.seconds,
        "train_nonfinite_steps": s.epoch_nonfinite,
    }


def finish_epoch(run: Run, record: dict, metrics: Metrics) -> None:
    """Best so far (the task's number: top-1, or the masked loss), the epoch's record and line (and the
    task's picture), then last.pth / best.pth."""
    s, t, key = run.state, run.cfg.train, run.task.best_key
    s.next_epoch()
    value = record[f"{'val' if t.best_on == 'raw' else 'ema'}_{key}"]
    improved = run.task.better(value, run.best[key])
    if improved:
        run.best = {key: value, "epoch": s.epoch - 1, "on": t.best_on}
    record[f"best_{key}"] = run.best[key]
    # The record goes first: a kill before the checkpoint re-trains this epoch and rewrites it.
    metrics.epoch(record, s.global_step)
    run.task.after_epoch(run, metrics)
    log.info(run.task.epoch_line(record, t.epochs))
    if improved:  # before last.pth: a kill in between resumes before this validation and saves best again
        run.save(ckpt.BEST)
    if s.epoch % run.cfg.save_freq == 0 or s.epoch == t.epochs:
        run.save(ckpt.LAST)


__all__ = ["train", "train_step", "TrainingStopped"]
