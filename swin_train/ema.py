"""Exponential moving average of a model's weights (parameters and buffers)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from swin_train.device import unwrap_model
from swin_train.errors import CheckpointError


class ModelEma:
    """A frozen eval-mode copy of a model whose floating tensors track ema = d * ema + (1 - d) * model.

    Integer/bool buffers are copied, not averaged. `update(model)` is called after each optimizer step;
    with `every=k` only every k-th call (calls k, 2k, ...) updates. With `warmup=True` the decay of the
    n-th update (n = updates done before it, 0 for the first) is min(decay, (1 + n) / (10 + n)).

    That warmup is TensorFlow's `ExponentialMovingAverage(num_updates=...)` rule. timm's ModelEmaV3
    (timm 1.0.31, utils/model_ema.py `get_decay`) does NOT use it: its warmup is
    1 - (1 + step / gamma) ** -power (gamma 1, power 2/3 by default) and decay 0 on the first step;
    only its foreach lerp update (float tensors lerped, the rest copied) is what this class follows.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every: int = 1) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.decay, self.warmup, self.every = float(decay), bool(warmup), int(every)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        self.num_updates = 0
        self.calls = 0

    def decay_at(self, num_updates: int) -> float:
        """Decay used by the update that follows `num_updates` earlier updates."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @staticmethod
    def _tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(floating tensors, other tensors): parameters then buffers, in registration order."""
        floats, others = [], []
        for t in (*module.parameters(), *module.buffers()):
            (floats if t.is_floating_point() else others).append(t)
        return floats, others

    @torch.no_grad()
    def update(self, model: nn.Module) -> bool:
        """Count a call; on every `every`-th call move the average towards `model`. Returns whether it did."""
        self.calls += 1
        if self.calls % self.every:
            return False
        weight = 1.0 - self.decay_at(self.num_updates)
        ema_f, ema_o = self._tensors(self.module)
        new_f, new_o = self._tensors(unwrap_model(model))
        if len(ema_f) != len(new_f) or len(ema_o) != len(new_o):
            raise ValueError("EMA update from a model with a different set of parameters/buffers")
        if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(ema_f, new_f)):
            torch._foreach_lerp_(ema_f, new_f, weight)  # ema += weight * (new - ema), one fused launch
        else:  # mixed dtypes/devices (e.g. a model cast after the EMA was made): promote in the add
            torch._foreach_mul_(ema_f, 1.0 - weight)
            torch._foreach_add_(ema_f, [b.to(a.device) for a, b in zip(ema_f, new_f)], alpha=weight)
        for a, b in zip(ema_o, new_o):  # few integer buffers (e.g. relative_position_index)
            a.copy_(b)
        self.num_updates += 1
        return True

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore bitwise what `state_dict` returned (weights and both counters)."""
        if not isinstance(state, dict) or not {"module", "num_updates", "calls"} <= state.keys():
            raise CheckpointError(
                "EMA state must hold 'module', 'num_updates' and 'calls'; the checkpoint is not ours"
            )
        try:
            self.module.load_state_dict(state["module"])
        except RuntimeError as e:  # torch lists missing/unexpected/mis-shaped keys over many lines
            detail = " ".join(str(e).split())[:300]
            raise CheckpointError(
                f"EMA weights do not fit the model ({detail}); resume with the same architecture"
            ) from None
        self.num_updates, self.calls = int(state["num_updates"]), int(state["calls"])
