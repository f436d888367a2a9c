"""What a run trains the model for (`task`): the trainer's loop is one for every task, and asks the task for
what differs: its data and model, a step's loss, the epoch's validation, which validation number decides
best.pth, and the lines it logs.

- classification: labelled images, the classifier, cross-entropy (with mixup/cutmix), top-1/top-k.
- simmim: images without labels and their masks (data/pretraining.py), SimMIM (models/simmim.py), its masked
  L1 loss, the masked reconstruction loss over the val images and a picture per epoch (reconstruction.py).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from swin_train.checkpoint import stored_class_names
from swin_train.config import Config
from swin_train.data.build import Data, build_data
from swin_train.data.folder import few
from swin_train.data.pretraining import build_pretraining_data
from swin_train.errors import DataError
from swin_train.evaluation import evaluate
from swin_train.loading import load_pretrained
from swin_train.metrics import epoch_line, reconstruction_epoch_line
from swin_train.models.simmim import MaskedSwinEncoder, SimMIM
from swin_train.models.swin import SwinTransformer
from swin_train.optim import NO_DECAY_NAMES, PRETRAINING_NO_DECAY_NAMES
from swin_train.reconstruction import reconstruction_loss, reconstruction_picture, save_picture
from swin_train.v2_windows import fit_pretrained_windows

log = logging.getLogger("swin_train")


def build_classifier(cfg: Config, num_classes: int, class_names: list[str] | None = None) -> SwinTransformer:
    if cfg.model.num_classes != num_classes:
        raise DataError(
            f"the data has {num_classes} classes but model.num_classes is {cfg.model.num_classes}; "
            f"set model.num_classes={num_classes}"
        )
    fit_pretrained_windows(cfg)  # a V2 fine-tune at another window: the windows its weights learned with
    model = SwinTransformer(**cfg.model_kwargs())
    if cfg.model.pretrained:
        report = load_pretrained(model, cfg.model.pretrained, head_map=cfg.model.head_map)
        if class_names is not None and "head.weight" in report.loaded and not report.head_mapped:
            warn_if_head_classes_differ(cfg.model.pretrained, class_names)
    return model


def warn_if_head_classes_differ(pretrained: str, class_names: list[str]) -> None:
    """A head of the same size is reused by position: right for the same classes in the same order (a
    resumed fine-tune, another split of one set), silently wrong for other or reordered ones."""
    stored = stored_class_names(pretrained)
    if stored is None or stored == list(class_names):
        return
    i = next(i for i, (a, b) in enumerate(zip(stored, class_names)) if a != b)
    log.warning(
        f"{pretrained}'s head was trained on other classes ('{stored[i]}' where this data has "
        f"'{class_names[i]}', class {i}); it is reused by position: give model.head_map (one source "
        "index per class) if the classes match in another order"
    )


class Classification:
    name = "classification"
    labels = True  # batches carry labels (mixup/cutmix apply)
    best_key = "top1"  # best.pth: the highest val (or EMA) top-1
    no_decay_names = NO_DECAY_NAMES  # parameters without weight decay (besides biases and norms)

    @staticmethod
    def better(value: float, best: float) -> bool:
        return value > best

    def initial_best(self, best_on: str) -> dict:
        return {"top1": -1.0, "epoch": -1, "on": best_on}

    def build_data(self, cfg: Config, env, *, device_pipeline: bool) -> Data:
        return build_data(cfg, env, device_pipeline=device_pipeline)

    def build_model(self, cfg: Config, data: Data) -> nn.Module:
        return build_classifier(cfg, data.num_classes, data.class_names)

    def loss(self, run, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return run.criterion(model(images), targets)

    def evaluate(self, run) -> dict:
        """Validation of the model (`val_*`) and of its EMA (`ema_*`) on the whole val set."""
        kw = dict(
            device=run.env.device,
            amp=run.amp,
            num_classes=run.data.num_classes,
            device_transform=run.data.device_transform,
            cpu_split=run.eval_split,
        )
        result = {f"val_{k}": v for k, v in evaluate(run.model, run.data.val_loader, **kw).items()}
        if result["val_num_skipped"]:
            log.warning(
                "validation left out %d unreadable images (data.skip_bad_images; top-1 is over the other %d): %s",
                result["val_num_skipped"],
                result["val_num_samples"],
                few(result["val_skipped_files"]),
            )
        if run.ema is not None:
            ema = evaluate(run.ema.module, run.data.val_loader, **kw)
            result.update({f"ema_{k}": v for k, v in ema.items() if k != "skipped_files"})  # the same files
        return result

    def resumed(self, run, theirs: Config, path) -> None:
        """Nothing to put right: top-1 means the same under any setting a resume may change."""

    def epoch_line(self, r: dict, epochs: int) -> str:
        return epoch_line(r, epochs)

    def after_epoch(self, run, metrics) -> None:
        """Nothing more to record: the epoch's numbers are in its record."""

    def done_line(self, r: dict, out) -> str:
        return (
            f"done: top-1 {100 * r['val_top1']:.2f}%, top-{r['val_topk']} {100 * r['val_top5']:.2f}% on "
            f"{r['val_num_samples']} val images; checkpoints in {out}"
        )


class PreTraining:
    """SimMIM pre-training (task: simmim). Holds the epoch's picture from its validation to its record."""

    name = "simmim"
    labels = False
    best_key = "loss"  # best.pth: the lowest val (or EMA) masked reconstruction loss
    no_decay_names = PRETRAINING_NO_DECAY_NAMES

    @staticmethod
    def better(value: float, best: float) -> bool:
        return value < best

    # the settings that decide what the masked loss measures (which pixels, against what)
    loss_settings = ("mask_patch_size", "mask_ratio", "norm_target")

    def __init__(self) -> None:
        self.picture: torch.Tensor | None = None  # the epoch's reconstructions (rank 0), until recorded

    def initial_best(self, best_on: str) -> dict:
        return {"loss": math.inf, "epoch": -1, "on": best_on}

    def build_data(self, cfg: Config, env, *, device_pipeline: bool) -> Data:
        return build_pretraining_data(cfg, env, device_pipeline=device_pipeline)

    def build_model(self, cfg: Config, data: Data) -> nn.Module:
        return SimMIM(MaskedSwinEncoder(**cfg.model_kwargs()), cfg.simmim.norm_target)

    def loss(self, run, model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return model(images, masks)

    def evaluate(self, run) -> dict:
        """The masked reconstruction loss of the model (`val_*`) and its EMA (`ema_*`) over the val images;
        on rank 0 a picture of the first simmim.pictures of them, to TensorBoard and OUT/reconstructions."""
        kw = dict(device=run.env.device, amp=run.amp, device_transform=run.data.device_transform)
        keep = run.cfg.simmim.pictures if run.env.is_main else 0
        numbers, kept = reconstruction_loss(run.model, run.data.val_loader, keep=keep, **kw)
        result = {f"val_{k}": v for k, v in numbers.items()}
        if result["val_num_skipped"]:
            log.warning(
                "validation left out %d unreadable images (data.skip_bad_images)", result["val_num_skipped"]
            )
        if run.ema is not None:
            ema, _ = reconstruction_loss(run.ema.module, run.data.val_loader, **kw)
            result.update({f"ema_{k}": v for k, v in ema.items()})
        if kept is not None:
            d = run.cfg.data
            self.picture = reconstruction_picture(run.model, *kept, d.mean, d.std, run.amp)
        return result

    def after_epoch(self, run, metrics) -> None:
        """The epoch's picture (made by `evaluate`) to TensorBoard and OUT/reconstructions/epoch_NNNN.png."""
        picture, self.picture = self.picture, None
        if picture is not None:
            save_picture(picture, run.out, run.state.epoch)
            metrics.image("val/reconstruction", picture, run.state.global_step)

    def resumed(self, run, theirs: Config, path) -> None:
        """A resume that changes a loss setting (`loss_settings`) measures another loss from here on: best.pth's
        number, measured before, is no longer compared with it, and the next validation writes best.pth."""
        old, new = theirs.simmim, run.cfg.simmim
        changed = [
            f"simmim.{k} {getattr(old, k)} -> {getattr(new, k)}"
            for k in self.loss_settings
            if getattr(old, k) != getattr(new, k)
        ]
        if changed and run.best["epoch"] >= 0:
            log.warning(
                "%s since %s: the masked loss measures something else now, so best.pth (loss %.4f, epoch %d) "
                "is not compared with it; the next validation writes a new best.pth",
                ", ".join(changed),
                path,
                run.best["loss"],
                run.best["epoch"] + 1,  # counted from 1, as the log counts epochs
            )
            run.best = self.initial_best(run.cfg.train.best_on)

    def epoch_line(self, r: dict, epochs: int) -> str:
        return reconstruction_epoch_line(r, epochs)

    def done_line(self, r: dict, out) -> str:
        return (
            f"done: masked reconstruction loss {r['val_loss']:.4f} on {r['val_num_samples']} val images; "
            f"checkpoints and pictures in {out}"
        )


TASKS = {"classification": Classification, "simmim": PreTraining}


def task_of(cfg: Config) -> Classification | PreTraining:
    """The task `cfg.task` names, for one run."""
    return TASKS[cfg.task]()
