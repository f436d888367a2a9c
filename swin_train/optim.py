"""Learning rates, parameter groups, the optimizers (AdamW, SGD) and the warmup schedules (cosine, linear,
step, multistep) of the official Swin code.

Everything that decides a number is a pure function of plain arguments (`scaled_lrs`, `layer_id`,
`WarmupSchedule.lr_at`), so it is tested without a model or an optimizer step.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from swin_train.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig
from swin_train.device import unwrap_model
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.swin import BLOCK_KEY, DOWNSAMPLE_KEY

# the official no_weight_decay (+ V2's no_weight_decay_keywords: its position bias MLP and logit scales)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "cpb_mlp", "logit_scale")
# the official SimMIM pre-training's: its SimMIM prefixes the encoder's no-decay keywords with "encoder.", which no
# parameter name contains, so only the exact names (and biases, norms) skip decay; the bias tables, V2's cpb_mlp
# and logit scales decay
PRETRAINING_NO_DECAY_NAMES = ("encoder.absolute_pos_embed", "encoder.mask_token")


def _fmt(x: float) -> str:
    """5e-4 -> '5e-4', 1.25e-4 -> '1.25e-4', 0 -> '0' (short, exact to 6 significant digits)."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.5e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def scaled_lrs(
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
    *,
    global_batch: int,
    accumulation_steps: int,
    base_batch: int = 512,
    world_size: int | None = None,
) -> tuple[dict[str, float], str]:
    """Official linear scaling: every lr x (global_batch x accumulation_steps / base_batch).

    `global_batch` is the per-process batch times the number of processes (one optimizer step sees
    global_batch x accumulation_steps images). Returns ({"lr", "warmup_lr", "min_lr"}, a one-line
    explanation); pass `world_size` to show the per-process batch in the text.
    """
    if global_batch < 1 or accumulation_steps < 1 or base_batch < 1:
        raise ConfigError(
            f"lr scaling needs positive batch sizes and accumulation steps, got global batch {global_batch}, "
            f"accumulation {accumulation_steps}, base batch {base_batch}"
        )
    factor = global_batch * accumulation_steps / base_batch
    lrs = {"lr": base_lr * factor, "warmup_lr": warmup_lr * factor, "min_lr": min_lr * factor}
    if world_size is not None and world_size >= 1 and global_batch % world_size == 0:
        batch = f"{global_batch // world_size} x {world_size} procs"
    else:
        batch = f"{global_batch} global"
    text = (
        f"lr {_fmt(base_lr)} x ({batch} x {accumulation_steps} accum / {base_batch}) = {_fmt(lrs['lr'])}"
        f"; warmup {_fmt(warmup_lr)} -> {_fmt(lrs['warmup_lr'])}; min {_fmt(min_lr)} -> {_fmt(lrs['min_lr'])}"
    )
    return lrs, text


def discover_depths(names: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage from parameter names `layers.{i}.blocks.{j}.*` (stages must be 0..S-1)."""
    depths: dict[int, int] = {}
    for name in names:
        m = BLOCK_KEY.match(name)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
    if sorted(depths) != list(range(len(depths))):
        raise ConfigError(
            f"model stages are not numbered 0..N-1 (found layers {sorted(depths)}); cannot assign lr layers"
        )
    return tuple(depths[i] for i in range(len(depths)))


def layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer index for layer-wise lr decay, as the official Swin fine-tuning (`get_swin_layer`).

    0: patch_embed.* and absolute_pos_embed; 1 + sum(depths[:i]) + j: layers.{i}.blocks.{j}.*;
    layers.{i}.downsample.* belongs to the last block of stage i (sum(depths[:i+1]));
    sum(depths) + 1: everything else (final norm, head).
    """
    if name.startswith("patch_embed.") or name == "absolute_pos_embed":
        return 0
    m = BLOCK_KEY.match(name)
    if m:
        i, j = int(m.group(1)), int(m.group(2))
        return 1 + sum(depths[:i]) + j
    m = DOWNSAMPLE_KEY.match(name)
    if m:
        return sum(depths[: int(m.group(1)) + 1])
    return sum(depths) + 1


def _grouped(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int | None,
    skip_names: Sequence[str],
) -> list[tuple[dict, list[str], list[nn.Parameter]]]:
    """(group options, names, params) per (decay, lr_scale) group, in order of first appearance."""
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    named = list(unwrap_model(model).named_parameters())
    depths: tuple[int, ...] = ()
    if layer_decay < 1.0:
        depths = discover_depths(n for n, _ in named)
        if num_layers is not None and num_layers != sum(depths):
            raise ConfigError(
                f"num_layers={num_layers} does not match the model's {sum(depths)} blocks (depths {depths})"
            )
    max_id = sum(depths) + 1
    groups: dict[tuple[bool, float], tuple[dict, list[str], list[nn.Parameter]]] = {}
    for name, p in named:
        if not p.requires_grad:  # frozen parameters are not optimized at all
            continue
        decay = p.ndim > 1 and not any(s in name for s in skip_names)
        scale = layer_decay ** (max_id - layer_id(name, depths)) if layer_decay < 1.0 else 1.0
        key = (decay, scale)
        if key not in groups:
            groups[key] = ({"weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}, [], [])
        groups[key][1].append(name)
        groups[key][2].append(p)
    return list(groups.values())


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    layer_decay: float = 1.0,
    num_layers: int | None = None,
    skip_names: Sequence[str] = NO_DECAY_NAMES,
) -> list[dict]:
    """AdamW parameter groups: {"params", "weight_decay", "lr_scale"} per (decay, lr scale).

    No weight decay for parameters with ndim <= 1 (norms, biases) and names containing `skip_names`.
    With layer_decay < 1 each parameter gets lr_scale = layer_decay ** (max_id - layer_id(name)),
    max_id = sum(depths) + 1; depths are read from the parameter names (`num_layers`, if given, must
    equal sum(depths)). Frozen parameters are left out. Names: `param_group_names`.
    """
    return [
        {"params": params, **opts}
        for opts, _, params in _grouped(model, weight_decay, layer_decay, num_layers, skip_names)
    ]


def param_group_names(
    model: nn.Module,
    *,
    weight_decay: float,
    layer_decay: float = 1.0,
    num_layers: int | None = None,
    skip_names: Sequence[str] = NO_DECAY_NAMES,
) -> list[dict]:
    """The groups of `param_groups` with parameter names ("names") instead of tensors, for logs and tests."""
    return [
        {"names": names, **opts}
        for opts, names, _ in _grouped(model, weight_decay, layer_decay, num_layers, skip_names)
    ]


def build_optimizer(
    model: nn.Module,
    train: TrainConfig,
    *,
    lr: float,
    device_type: str = "cpu",
    skip_names: Sequence[str] = NO_DECAY_NAMES,
) -> torch.optim.Optimizer:
    """train.optimizer over `param_groups` (train.weight_decay, train.layer_decay), each group starting at
    lr x lr_scale (`lr`: the scaled lr, see `scaled_lrs`), with the official build_optimizer's arguments:
    "adamw" (train.betas, train.eps) or "sgd" (train.momentum, train.nesterov). The fused kernel on CUDA and
    CPU, one pass over each tensor where foreach and the per-tensor default take several
    (`scripts/benchmark.py` times each trainer's own). `skip_names`: see param_groups."""
    groups = param_groups(
        model, weight_decay=train.weight_decay, layer_decay=train.layer_decay, skip_names=skip_names
    )
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    impl = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=train.momentum,
            nesterov=train.nesterov,
            weight_decay=train.weight_decay,
            **impl,
        )
    if train.optimizer != "adamw":
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}")
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay, **impl
    )


class WarmupSchedule(ABC):
    """A per-optimizer-step lr: linear warmup from warmup_lr to base_lr, then `decayed(step)`, written into
    every param group x its lr_scale.

    The official `build_scheduler` (lr_scheduler.py) builds timm's schedulers (or its own LinearLRScheduler
    and MultiStepLRScheduler, written on timm's) with t_in_epochs=False; each subclass says which and with
    what arguments, and computes its `_get_lr` in the same expression order, so the values agree bitwise:
      t < W:  warmup_lr + t * (base_lr - warmup_lr) / W       (t=0 -> warmup_lr; none when W = 0)
    Optimizer step t (0-based) runs at lr_at(t): the constructor writes lr_at(0) and `step()`, called after
    each optimizer step, advances t and writes lr_at(t) (timm's documented `step_update` use). The official
    train loop calls `step_update(t)` after step t, so its steps 0 and 1 both run at warmup_lr and every later
    step one step behind; that off-by-one is deliberately not reproduced. Its steps are optimizer steps as
    the official main.py counts them (main_simmim_*.py count micro-batches under gradient accumulation).
    The state is the step alone: the lr is a pure function of it, so a resumed run continues bitwise.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_lr: float,
        total_steps: int,
        warmup_steps: int,
    ) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ConfigError(
                f"schedule needs 0 <= warmup_steps < total_steps, got warmup {warmup_steps}, "
                f"total {total_steps}; use fewer warmup epochs or more epochs/data"
            )
        self.optimizer = optimizer
        self.base_lr, self.warmup_lr = float(base_lr), float(warmup_lr)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.t = 0
        self._write()

    def lr_at(self, step: int) -> float:
        """The unscaled lr of optimizer step `step` (pure; see the class docstring)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:  # same expression order as timm, so the values agree bitwise
            return self.warmup_lr + step * ((self.base_lr - self.warmup_lr) / self.warmup_steps)
        return self.decayed(step)

    @abstractmethod
    def decayed(self, step: int) -> float:
        """The unscaled lr of a step past the warmup (step >= warmup_steps)."""

    @property
    def lr(self) -> float:
        """The unscaled lr of the next optimizer step."""
        return self.lr_at(self.t)

    @property
    def last_lr(self) -> float:
        """The unscaled lr of the optimizer step taken last (of the first, before any)."""
        return self.lr_at(max(self.t - 1, 0))

    def _write(self) -> None:
        lr = self.lr_at(self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Call once after every optimizer step."""
        self.t += 1
        self._write()

    def state_dict(self) -> dict[str, int]:
        return {"step": self.t}

    def load_state_dict(self, state: dict) -> None:
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(
                f"lr schedule state must be {{'step': int >= 0}}, got {state!r}; the checkpoint is not ours"
            )
        self.t = step
        self._write()


class WarmupCosineSchedule(WarmupSchedule):
    """Warmup, then cosine decay to min_lr: timm's `CosineLRScheduler(t_initial=T - W if warmup_prefix else T,
    lr_min=min_lr, warmup_t=W, warmup_lr_init=warmup_lr, warmup_prefix=warmup_prefix, cycle_limit=1)`
    (timm 1.0.31, scheduler/cosine_lr.py), as the official build_scheduler builds it ("cosine"):
      W <= t < T:  min_lr + 0.5 (base_lr - min_lr) (1 + cos(pi (t - W) / (T - W)))   (t=W -> base_lr)
      t >= T:      min_lr                                               (t=T -> min_lr, then constant)
    `warmup_prefix=False` (the official WARMUP_PREFIX): the cosine counts from step 0 over all T steps, so it
    starts below base_lr after the warmup: min_lr + 0.5 (base_lr - min_lr) (1 + cos(pi t / T)).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_lr: float,
        min_lr: float,
        total_steps: int,
        warmup_steps: int,
        *,
        warmup_prefix: bool = True,
    ) -> None:
        self.min_lr, self.warmup_prefix = float(min_lr), bool(warmup_prefix)
        super().__init__(optimizer, base_lr, warmup_lr, total_steps, warmup_steps)

    def decayed(self, step: int) -> float:
        t, span = step, self.total_steps
        if self.warmup_prefix:
            t, span = step - self.warmup_steps, self.total_steps - self.warmup_steps
        if t >= span:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / span))


class WarmupLinearSchedule(WarmupSchedule):
    """Warmup, then linear decay to base_lr / 100 at step T: the official `LinearLRScheduler(t_initial=T,
    lr_min_rate=0.01, warmup_t=W, warmup_lr_init=warmup_lr)` ("linear"; min_lr is not used):
      W <= t:  base_lr - (base_lr - 0.01 base_lr) (t - W) / (T - W)      (held at t=T from there on)
    """

    END_FRACTION = 0.01  # the official lr_min_rate

    def decayed(self, step: int) -> float:
        t, span = min(step, self.total_steps) - self.warmup_steps, self.total_steps - self.warmup_steps
        v = self.base_lr
        return v - ((v - v * self.END_FRACTION) * (t / span))


class WarmupStepSchedule(WarmupSchedule):
    """Warmup, then base_lr x decay_rate ** (t // decay_steps), t counted from step 0 (warmup included):
    timm's `StepLRScheduler(decay_t=decay_steps, decay_rate, warmup_t=W, warmup_lr_init=warmup_lr)` as the
    official build_scheduler builds it ("step") with the timm it pins (0.4.12). Later timm (1.0.31 here) adds
    `warmup_prefix`, default True, which counts from the end of the warmup instead: the official code run on
    a current timm decays W steps later than it was written to."""

    def __init__(self, optimizer, base_lr, warmup_lr, total_steps, warmup_steps, *, decay_steps, decay_rate):
        if decay_steps < 1:
            raise ConfigError(f"a step schedule needs decay_steps >= 1, got {decay_steps}")
        self.decay_steps, self.decay_rate = int(decay_steps), float(decay_rate)
        super().__init__(optimizer, base_lr, warmup_lr, total_steps, warmup_steps)

    def decayed(self, step: int) -> float:
        return self.base_lr * (self.decay_rate ** (step // self.decay_steps))


class WarmupMultiStepSchedule(WarmupSchedule):
    """Warmup, then base_lr x gamma ** (number of milestones <= t), t counted from step 0: the official
    `MultiStepLRScheduler(milestones, gamma, warmup_t=W, warmup_lr_init=warmup_lr)` ("multistep"; the
    SimMIM pre-training recipes: x0.1 at epoch 700 of 800). Unlike timm's own MultiStepLRScheduler, a
    milestone m applies from step m itself. The official scheduler asserts W <= min(milestones)."""

    def __init__(self, optimizer, base_lr, warmup_lr, total_steps, warmup_steps, *, milestones, gamma):
        milestones = [int(m) for m in milestones]
        if not milestones or milestones != sorted(set(milestones)) or milestones[0] < warmup_steps:
            raise ConfigError(
                f"a multistep schedule needs increasing milestones from the end of the warmup "
                f"(step {warmup_steps}) on, got {milestones}"
            )
        self.milestones, self.gamma = milestones, float(gamma)
        super().__init__(optimizer, base_lr, warmup_lr, total_steps, warmup_steps)

    def decayed(self, step: int) -> float:
        return self.base_lr * (self.gamma ** bisect.bisect_right(self.milestones, step))


def build_schedule(
    optimizer: torch.optim.Optimizer, train: TrainConfig, lrs: dict[str, float], *, steps_per_epoch: int
) -> tuple[WarmupSchedule, str]:
    """(train.lr_schedule over train.epochs x steps_per_epoch optimizer steps with the scaled `lrs` of
    `scaled_lrs`, a one-line description for the log). Epoch settings become steps as the official
    build_scheduler converts them (epochs x steps per epoch)."""
    name, rate = train.lr_schedule, f"{train.lr_decay_rate:g}"
    lr, warmup_lr = lrs["lr"], lrs["warmup_lr"]
    total, warmup = train.epochs * steps_per_epoch, train.warmup_epochs * steps_per_epoch
    if name == "cosine":
        schedule = WarmupCosineSchedule(
            optimizer, lr, warmup_lr, lrs["min_lr"], total, warmup, warmup_prefix=train.warmup_prefix
        )
        text = "cosine to min" + ("" if train.warmup_prefix else " (from step 0: warmup_prefix=false)")
    elif name == "linear":
        schedule = WarmupLinearSchedule(optimizer, lr, warmup_lr, total, warmup)
        text = "linear to lr/100 (min_lr unused)"
    elif name == "step":
        decay = train.lr_decay_epochs * steps_per_epoch
        schedule = WarmupStepSchedule(
            optimizer, lr, warmup_lr, total, warmup, decay_steps=decay, decay_rate=train.lr_decay_rate
        )
        text = f"x{rate} every {train.lr_decay_epochs} epochs"
    elif name == "multistep":
        milestones = [e * steps_per_epoch for e in train.lr_milestones]
        schedule = WarmupMultiStepSchedule(
            optimizer, lr, warmup_lr, total, warmup, milestones=milestones, gamma=train.lr_decay_rate
        )
        text = f"x{rate} at epoch {', '.join(str(e) for e in train.lr_milestones)}"
    else:
        raise ConfigError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {name!r}")
    return schedule, f"schedule: {train.warmup_epochs} warmup epochs, then {text}"
