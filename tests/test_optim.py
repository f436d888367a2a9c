"""Parameter groups, lr scaling, the optimizers and the warmup schedules (checked against timm and the
official code)."""

from __future__ import annotations

import copy
import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from official import official_module
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from torch import nn

from swin_train.config import TrainConfig
from swin_train.errors import CheckpointError, ConfigError
from swin_train.optim import (
    WarmupCosineSchedule,
    WarmupLinearSchedule,
    WarmupMultiStepSchedule,
    WarmupStepSchedule,
    build_optimizer,
    build_schedule,
    discover_depths,
    layer_id,
    param_group_names,
    param_groups,
    scaled_lrs,
)

C = 4


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))  # 2-D, still no decay
        self.proj = nn.Linear(C, C)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(C)
        self.attn = _Attn()
        self.mlp = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, C))


class _Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * C)
        self.reduction = nn.Linear(4 * C, C, bias=False)


class _Stage(nn.Module):
    def __init__(self, depth: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(depth))
        self.downsample = _Merge() if downsample else None


class _Patch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, C, 4, 4)
        self.norm = nn.LayerNorm(C)


class ToySwin(nn.Module):
    """Official key layout: patch_embed, absolute_pos_embed, layers.{i}.blocks.{j}, downsample, norm, head."""

    def __init__(self, depths: tuple[int, ...] = (2, 3)) -> None:
        super().__init__()
        self.patch_embed = _Patch()
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 16, C))  # 3-D, no decay by name
        self.layers = nn.ModuleList(_Stage(d, i < len(depths) - 1) for i, d in enumerate(depths))
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, 10)


def _names(groups: list[dict]) -> list[str]:
    return [n for g in groups for n in g["names"]]


# ---------------------------------------------------------------- lr scaling


def test_scaled_lrs_official_recipe_text_and_values():
    lrs, text = scaled_lrs(5e-4, 5e-7, 5e-6, global_batch=1024, accumulation_steps=1, world_size=8)
    assert lrs == pytest.approx({"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-5}, rel=1e-15)
    assert text == "lr 5e-4 x (128 x 8 procs x 1 accum / 512) = 1e-3; warmup 5e-7 -> 1e-6; min 5e-6 -> 1e-5"


def test_scaled_lrs_accumulation_multiplies_and_text_without_world_size():
    lrs, text = scaled_lrs(1.25e-4, 1.25e-7, 1.25e-6, global_batch=64, accumulation_steps=4, base_batch=512)
    assert lrs["lr"] == pytest.approx(1.25e-4 * 64 * 4 / 512, rel=1e-15)
    assert lrs["warmup_lr"] == pytest.approx(1.25e-7 / 2, rel=1e-15)
    assert lrs["min_lr"] == pytest.approx(1.25e-6 / 2, rel=1e-15)
    assert text.startswith("lr 1.25e-4 x (64 global x 4 accum / 512) = 6.25e-5;")


def test_scaled_lrs_rejects_bad_batch():
    with pytest.raises(ConfigError, match="positive batch"):
        scaled_lrs(5e-4, 5e-7, 5e-6, global_batch=0, accumulation_steps=1)


# ---------------------------------------------------------------- parameter groups


def test_no_decay_is_exactly_1d_params_and_skip_names():
    model = ToySwin()
    groups = param_group_names(model, weight_decay=0.05)
    assert len(groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    params = dict(model.named_parameters())
    expect_no = {n for n, p in params.items() if p.ndim <= 1 or "relative_position_bias_table" in n}
    expect_no.add("absolute_pos_embed")
    by_wd = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_wd[0.0] == expect_no
    assert by_wd[0.05] == set(params) - expect_no
    assert sorted(_names(groups)) == sorted(params)  # every parameter exactly once
    # decay: patch conv, per block qkv/proj/fc1/fc2 (4 x 5 blocks), one reduction, head
    assert len(by_wd[0.05]) == 1 + 4 * 5 + 1 + 1
    # tensors in param_groups follow the same split
    tensor_groups = param_groups(model, weight_decay=0.05)
    assert [len(g["params"]) for g in tensor_groups] == [len(g["names"]) for g in groups]
    assert all("names" not in g for g in tensor_groups)
    assert {id(p) for g in tensor_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_frozen_params_left_out():
    model = ToySwin()
    model.patch_embed.requires_grad_(False)
    names = _names(param_group_names(model, weight_decay=0.05))
    assert not any(n.startswith("patch_embed") for n in names)
    assert len(names) == sum(1 for p in model.parameters() if p.requires_grad)


def test_layer_ids_two_stages():
    depths = discover_depths(n for n, _ in ToySwin((2, 3)).named_parameters())
    assert depths == (2, 3)
    assert layer_id("patch_embed.proj.weight", depths) == 0
    assert layer_id("absolute_pos_embed", depths) == 0
    assert layer_id("layers.0.blocks.0.attn.qkv.weight", depths) == 1
    assert layer_id("layers.0.blocks.1.norm1.bias", depths) == 2
    assert layer_id("layers.0.downsample.reduction.weight", depths) == 2  # last block of stage 0
    assert layer_id("layers.1.blocks.0.mlp.0.weight", depths) == 3
    assert layer_id("layers.1.blocks.2.attn.relative_position_bias_table", depths) == 5
    assert layer_id("norm.weight", depths) == 6
    assert layer_id("head.bias", depths) == 6
    assert discover_depths(n for n, _ in ToySwin((2, 2, 6, 2)).named_parameters()) == (2, 2, 6, 2)


def test_layer_decay_scales_and_grouping():
    model = ToySwin((2, 3))
    d = 0.5
    groups = param_group_names(model, weight_decay=0.05, layer_decay=d)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale_of["patch_embed.proj.weight"] == d**6
    assert scale_of["absolute_pos_embed"] == d**6
    assert scale_of["layers.0.blocks.0.mlp.0.weight"] == d**5
    assert scale_of["layers.0.downsample.norm.weight"] == d**4
    assert scale_of["layers.1.blocks.2.attn.qkv.bias"] == d**1
    assert scale_of["head.weight"] == 1.0
    # ids 0..6 each have decay and no-decay params -> 14 groups, unique (weight_decay, lr_scale)
    keys = [(g["weight_decay"], g["lr_scale"]) for g in groups]
    assert len(keys) == len(set(keys)) == 14
    assert sorted(_names(groups)) == sorted(n for n, _ in model.named_parameters())
    assert param_group_names(model, weight_decay=0.05, layer_decay=d, num_layers=5) == groups
    with pytest.raises(ConfigError, match="num_layers=12"):
        param_groups(model, weight_decay=0.05, layer_decay=d, num_layers=12)
    with pytest.raises(ConfigError, match="layer_decay"):
        param_groups(model, weight_decay=0.05, layer_decay=1.5)


def test_groups_see_through_torch_compile_wrapper():
    model = ToySwin()
    compiled = torch.compile(model)  # compilation is lazy: nothing is compiled here
    assert param_group_names(compiled, weight_decay=0.05, layer_decay=0.8) == param_group_names(
        model, weight_decay=0.05, layer_decay=0.8
    )


def test_build_optimizer_applies_decay_and_lr_scale():
    torch.manual_seed(0)
    model = ToySwin((2, 3))
    lr, wd, d = 0.1, 0.5, 0.5
    opt = build_optimizer(
        model, TrainConfig(weight_decay=wd, betas=[0.9, 0.999], eps=1e-8, layer_decay=d), lr=lr
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["fused"] is True for g in opt.param_groups)  # one pass per tensor, also on CPU
    assert all(g["lr"] == lr * g["lr_scale"] for g in opt.param_groups)
    # zero gradients: AdamW's update is 0, only decoupled weight decay moves p by -lr*scale*wd*p
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    scale_of = {
        n: (g["lr_scale"], g["weight_decay"])
        for g in param_group_names(model, weight_decay=wd, layer_decay=d)
        for n in g["names"]
    }
    for n, p in model.named_parameters():
        s, w = scale_of[n]
        torch.testing.assert_close(p.detach(), before[n] * (1 - lr * s * w), rtol=1e-6, atol=0)
    assert scale_of["head.weight"] == (1.0, wd) and scale_of["norm.weight"] == (1.0, 0.0)


# ---------------------------------------------------------------- schedule


def _sched(total=100, warmup=10, base=1e-3, warm=1e-6, low=1e-5, opt=None):
    opt = opt or torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    return WarmupCosineSchedule(opt, base, warm, low, total_steps=total, warmup_steps=warmup)


def test_schedule_known_points():
    s = _sched(total=110, warmup=10, base=1e-3, warm=1e-6, low=1e-5)
    assert s.lr_at(0) == 1e-6
    assert s.lr_at(5) == pytest.approx(1e-6 + 5 * (1e-3 - 1e-6) / 10, rel=1e-15)
    assert s.lr_at(10) == 1e-3
    assert s.lr_at(60) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)  # cosine midpoint
    assert 0 < s.lr_at(109) - 1e-5 < 1e-3 * (1e-3 - 1e-5)  # last step: just above min_lr
    assert s.lr_at(110) == 1e-5 and s.lr_at(500) == 1e-5
    lrs = [s.lr_at(t) for t in range(10, 111)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing cosine
    no_warm = _sched(total=50, warmup=0, base=2e-5, warm=2e-8, low=2e-7)
    assert no_warm.lr_at(0) == 2e-5 and no_warm.lr_at(50) == 2e-7


@pytest.mark.parametrize(
    "total,warmup,base,warm,low",
    [
        (100, 10, 1e-3, 1e-6, 1e-5),
        (37, 0, 5e-4, 5e-7, 5e-6),
        (300, 299, 2e-5, 2e-8, 2e-7),
        (64, 7, 1.0, 0.0, 0.0),
    ],
)
def test_schedule_matches_timm(total, warmup, base, warm, low):
    ours = _sched(total, warmup, base, warm, low)
    timm_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    timm = CosineLRScheduler(
        timm_opt,
        t_initial=total - warmup,
        lr_min=low,
        warmup_t=warmup,
        warmup_lr_init=warm,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
    assert ours.optimizer.param_groups[0]["lr"] == timm_opt.param_groups[0]["lr"]  # both start at t=0
    for t in range(1, total + 5):
        ours.step()
        timm.step_update(t)
        assert ours.optimizer.param_groups[0]["lr"] == timm_opt.param_groups[0]["lr"], t
        assert ours.lr_at(t) == timm_opt.param_groups[0]["lr"], t


def test_schedule_writes_lr_scale_like_timm():
    def groups():  # timm reads the base lr from each group's lr, so its groups start at the unscaled lr
        return [{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in (0.25, 1.0)]

    ours = _sched(opt=torch.optim.AdamW(groups(), lr=1e-3))
    timm_opt = torch.optim.AdamW(groups(), lr=1e-3)
    timm = CosineLRScheduler(
        timm_opt,
        t_initial=90,
        lr_min=1e-5,
        warmup_t=10,
        warmup_lr_init=1e-6,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    for t in range(1, 101):
        ours.step()
        timm.step_update(t)
        assert [g["lr"] for g in ours.optimizer.param_groups] == [g["lr"] for g in timm_opt.param_groups]
    assert ours.optimizer.param_groups[0]["lr"] == 0.25 * 1e-5


def test_schedule_state_round_trip_mid_run():
    a = _sched(total=100, warmup=10)
    for _ in range(37):
        a.step()
    state = a.state_dict()
    assert state == {"step": 37} and all(type(v) is int for v in state.values())
    b = _sched(total=100, warmup=10)
    b.load_state_dict(state)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"] == a.lr_at(37)
    for _ in range(80):
        a.step()
        b.step()
        assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    with pytest.raises(CheckpointError, match="lr schedule state"):
        b.load_state_dict({"step": 1.5})
    with pytest.raises(CheckpointError):
        b.load_state_dict({"last_epoch": 3})


def test_schedule_rejects_warmup_not_below_total():
    with pytest.raises(ConfigError, match="warmup_steps < total_steps"):
        _sched(total=10, warmup=10)
    with pytest.raises(ValueError):
        _sched().lr_at(-1)
    assert not math.isnan(_sched(total=1, warmup=0).lr_at(0))


# ---------------------------------------------------------------- the official schedule and optimizer choices


def _opt(base: float = 1e-3, scales=(1.0,)) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in scales], lr=base
    )


def _official_train(name: str, **settings) -> SimpleNamespace:
    """The official config's TRAIN section (yacs) as build_scheduler reads it."""
    sched = dict(NAME=name, WARMUP_PREFIX=True, DECAY_EPOCHS=30, DECAY_RATE=0.1, GAMMA=0.1, MULTISTEPS=[])
    sched.update({k: settings.pop(k) for k in list(settings) if k in sched})
    train = {"EPOCHS": 12, "WARMUP_EPOCHS": 2, "MIN_LR": 1e-5, "WARMUP_LR": 1e-6, **settings}
    return SimpleNamespace(TRAIN=SimpleNamespace(**train, LR_SCHEDULER=SimpleNamespace(**sched)))


def _ours(official: SimpleNamespace, steps_per_epoch: int, base: float = 1e-3):
    t, s = official.TRAIN, official.TRAIN.LR_SCHEDULER
    train = TrainConfig(
        epochs=t.EPOCHS,
        warmup_epochs=t.WARMUP_EPOCHS,
        lr_schedule=s.NAME,
        warmup_prefix=s.WARMUP_PREFIX,
        lr_decay_epochs=s.DECAY_EPOCHS,
        lr_decay_rate=s.DECAY_RATE if s.NAME == "step" else s.GAMMA,
        lr_milestones=list(s.MULTISTEPS),
    )
    lrs = {"lr": base, "warmup_lr": t.WARMUP_LR, "min_lr": t.MIN_LR}
    return build_schedule(_opt(base), train, lrs, steps_per_epoch=steps_per_epoch)[0]


OFFICIAL_SCHEDULES = [
    ("cosine", {}),
    ("cosine", {"WARMUP_PREFIX": False}),
    ("cosine", {"WARMUP_EPOCHS": 0}),
    ("linear", {}),
    ("linear", {"WARMUP_EPOCHS": 0}),
    ("step", {"DECAY_EPOCHS": 3, "DECAY_RATE": 0.5}),
    ("step", {"DECAY_EPOCHS": 1, "WARMUP_EPOCHS": 3}),  # decays during the warmup count from step 0
    ("multistep", {"MULTISTEPS": [2, 7, 10], "GAMMA": 0.25}),
    ("multistep", {"MULTISTEPS": [8], "WARMUP_EPOCHS": 0}),
]


@pytest.mark.parametrize("name, settings", OFFICIAL_SCHEDULES)
def test_every_schedule_equals_the_official_build_scheduler_bitwise(name, settings, tmp_path, monkeypatch):
    """The official lr_scheduler.py from the snapshot (tests/official.py) on timm as it was when pinned
    (0.4.12): cosine's t_mul is now cycle_mul, and StepLRScheduler had no warmup_prefix (now default True)."""
    official = official_module("official_lr_scheduler", "lr_scheduler.py", tmp_path)

    def cosine(*args, t_mul, **kwargs):
        return CosineLRScheduler(*args, cycle_mul=t_mul, **kwargs)

    monkeypatch.setattr(official, "CosineLRScheduler", cosine)
    monkeypatch.setattr(official, "StepLRScheduler", functools.partial(StepLRScheduler, warmup_prefix=False))
    config, steps_per_epoch = _official_train(name, **settings), 5
    ours = _ours(config, steps_per_epoch)
    theirs_opt = _opt()
    theirs = official.build_scheduler(config, theirs_opt, steps_per_epoch)
    assert ours.optimizer.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"]  # step 0
    for t in range(1, config.TRAIN.EPOCHS * steps_per_epoch):
        ours.step()
        theirs.step_update(t)  # what the official loop calls after step t - 1 with the step count t
        assert ours.optimizer.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"], t


def _timm_twin(opt, name, total, warmup, base=1e-3, warm=1e-6, low=1e-5, **kw):
    """timm's scheduler with the same numbers as ours (see each schedule's docstring)."""
    common = dict(warmup_t=warmup, warmup_lr_init=warm, t_in_epochs=False)
    if name == "cosine-from-0":
        return CosineLRScheduler(
            opt, t_initial=total, lr_min=low, warmup_prefix=False, cycle_limit=1, **common
        )
    if name == "step":
        return StepLRScheduler(
            opt, decay_t=kw["decay_steps"], decay_rate=kw["rate"], warmup_prefix=False, **common
        )
    # timm's milestone m applies from step m - 1 (its t + 1 convention), the official one from step m
    decay_t = [m + 1 for m in kw["milestones"]]
    return MultiStepLRScheduler(opt, decay_t=decay_t, decay_rate=kw["rate"], warmup_prefix=False, **common)


@pytest.mark.parametrize(
    "name, total, warmup, kw",
    [
        ("cosine-from-0", 60, 10, {}),
        ("cosine-from-0", 37, 0, {}),
        ("step", 60, 10, {"decay_steps": 7, "rate": 0.5}),
        ("step", 60, 0, {"decay_steps": 20, "rate": 0.1}),
        ("multistep", 60, 10, {"milestones": [10, 25, 40], "rate": 0.1}),
        ("multistep", 60, 0, {"milestones": [30], "rate": 0.3}),
    ],
)
def test_schedules_match_timm_bitwise(name, total, warmup, kw):
    if name == "cosine-from-0":
        ours = WarmupCosineSchedule(_opt(), 1e-3, 1e-6, 1e-5, total, warmup, warmup_prefix=False)
    elif name == "step":
        ours = WarmupStepSchedule(
            _opt(), 1e-3, 1e-6, total, warmup, decay_steps=kw["decay_steps"], decay_rate=kw["rate"]
        )
    else:
        ours = WarmupMultiStepSchedule(
            _opt(), 1e-3, 1e-6, total, warmup, milestones=kw["milestones"], gamma=kw["rate"]
        )
    timm_opt = _opt()
    timm = _timm_twin(timm_opt, name, total, warmup, **kw)
    assert ours.optimizer.param_groups[0]["lr"] == timm_opt.param_groups[0]["lr"]
    for t in range(1, total + 3):
        ours.step()
        timm.step_update(t)
        assert ours.optimizer.param_groups[0]["lr"] == timm_opt.param_groups[0]["lr"], t


def test_new_schedules_known_points():
    linear = WarmupLinearSchedule(_opt(), 1e-3, 1e-6, 110, 10)
    assert linear.lr_at(0) == 1e-6 and linear.lr_at(10) == 1e-3
    assert linear.lr_at(60) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)  # halfway to base / 100
    assert linear.lr_at(110) == pytest.approx(1e-5, rel=1e-12) and linear.lr_at(500) == linear.lr_at(110)
    step = WarmupStepSchedule(_opt(), 1.0, 0.0, 100, 5, decay_steps=30, decay_rate=0.5)
    assert [step.lr_at(t) for t in (0, 4, 5, 29, 30, 59, 60, 99)] == [
        0.0,
        0.8,
        1.0,
        1.0,
        0.5,
        0.5,
        0.25,
        0.125,
    ]
    multi = WarmupMultiStepSchedule(_opt(), 1.0, 0.0, 100, 10, milestones=[10, 70], gamma=0.5)
    assert [multi.lr_at(t) for t in (0, 5, 9, 10, 69, 70, 99)] == [0.0, 0.5, 0.9, 0.5, 0.5, 0.25, 0.25]
    cos = WarmupCosineSchedule(_opt(), 1.0, 0.0, 0.0, 100, 10, warmup_prefix=False)
    assert cos.lr_at(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 100)), rel=1e-15)
    assert cos.lr_at(50) == pytest.approx(0.5, rel=1e-12) and cos.lr_at(100) == 0.0


@pytest.mark.parametrize("name", ["cosine", "linear", "step", "multistep"])
def test_every_schedule_resumes_bitwise_and_scales_groups(name):
    train = TrainConfig(epochs=20, warmup_epochs=2, lr_schedule=name, lr_decay_epochs=3, lr_milestones=[5, 9])
    lrs = {"lr": 2e-3, "warmup_lr": 2e-6, "min_lr": 2e-5}

    def build():
        return build_schedule(_opt(scales=(0.25, 1.0)), train, lrs, steps_per_epoch=4)[0]

    a = build()
    for _ in range(29):
        a.step()
    b = build()
    b.load_state_dict(a.state_dict())
    assert a.state_dict() == {"step": 29}
    for _ in range(60):
        assert [g["lr"] for g in b.optimizer.param_groups] == [g["lr"] for g in a.optimizer.param_groups]
        assert [g["lr"] for g in a.optimizer.param_groups] == [0.25 * a.lr, a.lr]
        a.step()
        b.step()


def test_build_schedule_converts_epochs_to_steps_and_says_what_it_built():
    lrs = {"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-5}

    def build(**fields):
        return build_schedule(
            _opt(), TrainConfig(epochs=800, warmup_epochs=10, **fields), lrs, steps_per_epoch=3
        )

    multi, text = build(lr_schedule="multistep", lr_milestones=[700])
    assert isinstance(multi, WarmupMultiStepSchedule) and multi.milestones == [2100]
    assert (multi.total_steps, multi.warmup_steps) == (2400, 30)
    assert text == "schedule: 10 warmup epochs, then x0.1 at epoch 700"
    step, text = build(lr_schedule="step", lr_decay_epochs=30, lr_decay_rate=0.5)
    assert isinstance(step, WarmupStepSchedule) and step.decay_steps == 90
    assert text == "schedule: 10 warmup epochs, then x0.5 every 30 epochs"
    assert (
        build(lr_schedule="linear")[1] == "schedule: 10 warmup epochs, then linear to lr/100 (min_lr unused)"
    )
    cosine, text = build()
    assert (
        isinstance(cosine, WarmupCosineSchedule) and cosine.warmup_prefix and text.endswith("cosine to min")
    )
    assert build(warmup_prefix=False)[1].endswith("cosine to min (from step 0: warmup_prefix=false)")
    with pytest.raises(ConfigError, match="increasing milestones"):
        build(
            lr_schedule="multistep", lr_milestones=[5]
        )  # before the end of the warmup, as the official asserts


def test_sgd_is_the_official_nesterov_sgd_over_our_groups():
    torch.manual_seed(0)
    model = ToySwin((2, 3))
    twin = copy.deepcopy(model)
    train = TrainConfig(optimizer="sgd", momentum=0.8, weight_decay=0.05, layer_decay=0.5)
    opt = build_optimizer(model, train, lr=0.1)
    assert isinstance(opt, torch.optim.SGD) and all(g["fused"] for g in opt.param_groups)
    assert all(
        (g["momentum"], g["nesterov"], g["lr"]) == (0.8, True, 0.1 * g["lr_scale"]) for g in opt.param_groups
    )
    groups = param_groups(twin, weight_decay=0.05, layer_decay=0.5)
    for g in groups:
        g["lr"] = 0.1 * g["lr_scale"]
    # the official build_optimizer: optim.SGD(parameters, momentum=MOMENTUM, nesterov=True, lr, weight_decay)
    reference = torch.optim.SGD(groups, momentum=0.8, nesterov=True, lr=0.1, weight_decay=0.05)
    for step in range(3):  # the same made-up gradients for both
        for m, o in ((model, opt), (twin, reference)):
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    plain = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.0, nesterov=False), lr=0.1)
    assert (plain.param_groups[0]["momentum"], plain.param_groups[0]["nesterov"]) == (0.0, False)


def test_a_run_trains_with_sgd_and_a_multistep_schedule(tmp_path, capsys):
    from helpers import image_folder, two_class_train_args

    from swin_train.cli.train import cli as train_cli

    out = tmp_path / "run"
    recipe = [
        "train.epochs=3",
        "train.lr_schedule=multistep",
        "train.lr_milestones=[1,2]",
        "train.lr_decay_rate=0.5",
    ]
    args = two_class_train_args(image_folder(tmp_path / "data"), out, *recipe, "train.optimizer=sgd")
    assert train_cli(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = 2e-3 * 4 / 32  # base_lr x batch 4 / lr_base_batch 32; no warmup
    assert [r["train_lr"] for r in records] == [lr, lr * 0.5, lr * 0.25]
    logged = capsys.readouterr().out
    assert "effective lr: lr 2e-3 x (4 x 1 procs x 1 accum / 32) = 2.5e-4" in logged
    assert "; schedule: 0 warmup epochs, then x0.5 at epoch 1, 2" in logged
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["schedule"] == {"step": 3 * 4}  # 16 images, batch 4
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())  # SGD's, not AdamW's
