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
    only its lerp update (float tensors lerped, the rest copied) is what this class follows.

    The counters `calls` and `num_updates` are 0-dim int64 tensors on the model's device, and `update` takes
    the step's "applied" flag as a device tensor: a trainer that skips a non-finite step on the device never
    waits for the device to know whether the EMA moved. Buffers the model does not save (`persistent=False`:
    tables and masks derived from the architecture, which training never changes) are copied once, here.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every: int = 1) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.decay, self.warmup, self.every = float(decay), bool(warmup), int(every)
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        device = next((t.device for t in (*self.module.parameters(), *self.module.buffers())), None)
        self.num_updates = torch.zeros((), dtype=torch.int64, device=device)
        self.calls = torch.zeros((), dtype=torch.int64, device=device)

    def decay_at(self, num_updates: int) -> float:
        """Decay used by the update that follows `num_updates` earlier updates."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    def _weight(self) -> torch.Tensor:
        """1 - decay_at(num_updates) as a float64 tensor: the same double as the Python expression (integer
        counts, correctly rounded division), so the lerp weight rounds to the same float."""
        if not self.warmup:
            return torch.full((), 1.0 - self.decay, dtype=torch.float64, device=self.num_updates.device)
        n = self.num_updates.double()
        return 1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)

    @staticmethod
    def _tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(floating tensors, other tensors) the average follows: parameters then saved buffers, in
        registration order (`_non_persistent_buffers_set` is where torch records the unsaved ones)."""
        derived = {
            id(b)
            for m in module.modules()
            for n, b in m._buffers.items()
            if n in m._non_persistent_buffers_set
        }
        floats, others = [], []
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in derived:
                (floats if t.is_floating_point() else others).append(t)
        return floats, others

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> torch.Tensor:
        """Count a call (unless `applied`, a bool tensor, is false: a skipped optimizer step); on every
        `every`-th counted call move the average towards `model`. Returns whether it did, as a bool tensor
        on the device (reading it waits for the device)."""
        ema_f, ema_o = self._tensors(self.module)
        new_f, new_o = self._tensors(unwrap_model(model))
        if len(ema_f) != len(new_f) or len(ema_o) != len(new_o):
            raise ValueError("EMA update from a model with a different set of parameters/buffers")
        device = self.calls.device
        counted = torch.ones((), dtype=torch.bool, device=device) if applied is None else applied.to(device)
        self.calls += counted
        moves = counted & (self.calls % self.every == 0)
        for a, moved in zip(ema_f, self._moved(ema_f, new_f, self._weight())):
            torch.where(moves, moved, a, out=a)  # a step that does not move it leaves every bit as it was
        for a, b in zip(ema_o, new_o):  # few integer buffers (e.g. BatchNorm's num_batches_tracked)
            torch.where(moves, b.to(a.device), a, out=a)
        self.num_updates += moves
        return moves

    @staticmethod
    def _moved(ema: list[torch.Tensor], new: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
        """ema + weight * (new - ema) for each pair, as timm's ModelEmaV3 lerps (new tensors)."""
        if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(ema, new)):
            weights = {dtype: weight.to(dtype) for dtype in (torch.float32, torch.float64)}
            if all(a.dtype in weights for a in ema):  # a tensor weight lerps as the same float number does
                return [torch.lerp(a, b, weights[a.dtype]) for a, b in zip(ema, new)]
            return torch._foreach_lerp(ema, new, float(weight))  # fp16/bf16 copies: the weight read here
        # mixed dtypes/devices (e.g. a model cast after the EMA was made): promote in the add
        w = float(weight)
        moved = torch._foreach_mul(ema, 1.0 - w)
        torch._foreach_add_(moved, [b.to(a.device) for a, b in zip(ema, new)], alpha=w)
        return moved

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "num_updates": int(self.num_updates),
            "calls": int(self.calls),
        }

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
        self.num_updates.fill_(int(state["num_updates"]))
        self.calls.fill_(int(state["calls"]))
