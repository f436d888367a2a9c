"""Parameter groups, lr scaling, AdamW and the warmup-cosine schedule (checked against timm)."""

from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from swin_train.config import TrainConfig
from swin_train.errors import CheckpointError, ConfigError
from swin_train.optim import (
    WarmupCosineSchedule,
    build_optimizer,
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
