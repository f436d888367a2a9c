"""The training loss: Mixup/CutMix targets and the criterion that matches them (official order)."""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from swin_train.config import AugConfig


def build_mixup(aug: AugConfig, num_classes: int) -> Mixup | None:
    """timm Mixup/CutMix, or None when both alphas are 0. It needs an even batch size; it draws from
    numpy's global RNG, whose state every checkpoint saves (so resume stays bitwise)."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        mode=aug.mixup_mode,
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )


def build_train_criterion(aug: AugConfig, *, mixup_active: bool) -> nn.Module:
    """SoftTargetCrossEntropy with mixup (its targets already carry the smoothing), else
    LabelSmoothingCrossEntropy when label_smoothing > 0, else nn.CrossEntropyLoss (official order)."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.label_smoothing)
    return nn.CrossEntropyLoss()
