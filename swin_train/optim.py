"""Learning rates, parameter groups, AdamW and the warmup-cosine schedule.

Everything that decides a number is a pure function of plain arguments (`scaled_lrs`, `layer_id`,
`WarmupCosineSchedule.lr_at`), so it is tested without a model or an optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from swin_train.config import TrainConfig
from swin_train.device import unwrap_model
from swin_train.errors import CheckpointError, ConfigError
from swin_train.models.swin import BLOCK_KEY, DOWNSAMPLE_KEY

# the official no_weight_decay (+ V2's no_weight_decay_keywords: its position bias MLP and logit scales)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "cpb_mlp", "logit_scale")


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
    model: nn.Module, train: TrainConfig, *, lr: float, device_type: str = "cpu"
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (train.weight_decay, train.layer_decay), each group starting at lr x lr_scale
    (`lr`: the scaled lr, see `scaled_lrs`); the fused kernel on CUDA and CPU, one pass over each tensor
    where foreach and the per-tensor default take several (`scripts/benchmark.py` times each trainer's own)."""
    groups = param_groups(model, weight_decay=train.weight_decay, layer_decay=train.layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    impl = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay, **impl
    )


class WarmupCosineSchedule:
    """Per-optimizer-step linear warmup then cosine decay, written into every param group x its lr_scale.

    Follows timm's `CosineLRScheduler(t_initial=total_steps - warmup_steps, lr_min=min_lr,
    warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True, cycle_limit=1,
    t_in_epochs=False)` `_get_lr` (timm 1.0.31, scheduler/cosine_lr.py), which is what the official Swin
    `build_scheduler` builds:
      t < W:       warmup_lr + t * (base_lr - warmup_lr) / W           (t=0 -> warmup_lr)
      W <= t < T:  min_lr + 0.5 (base_lr - min_lr) (1 + cos(pi (t - W) / (T - W)))   (t=W -> base_lr)
      t >= T:      min_lr                                               (t=T -> min_lr, then constant)
    Optimizer step t (0-based) runs at lr_at(t): the constructor writes lr_at(0) and `step()`, called
    after each optimizer step, advances t and writes lr_at(t) (timm's documented `step_update` use).
    The official train loop calls `step_update(t)` after step t, so its steps 0 and 1 both run at
    warmup_lr and every later step one step behind; that off-by-one is deliberately not reproduced.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_lr: float,
        min_lr: float,
        total_steps: int,
        warmup_steps: int,
    ) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ConfigError(
                f"schedule needs 0 <= warmup_steps < total_steps, got warmup {warmup_steps}, "
                f"total {total_steps}; use fewer warmup epochs or more epochs/data"
            )
        self.optimizer = optimizer
        self.base_lr, self.warmup_lr, self.min_lr = float(base_lr), float(warmup_lr), float(min_lr)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.t = 0
        self._write()

    def lr_at(self, step: int) -> float:
        """The unscaled lr of optimizer step `step` (pure; see the class docstring)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:  # same expression order as timm, so the values agree bitwise
            return self.warmup_lr + step * ((self.base_lr - self.warmup_lr) / self.warmup_steps)
        t, span = step - self.warmup_steps, self.total_steps - self.warmup_steps
        if t >= span:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / span))

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
