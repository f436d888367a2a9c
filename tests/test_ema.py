"""ModelEma: exact averaging arithmetic, warmup, every-k, integer buffers, bitwise state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swin_train.ema import ModelEma
from swin_train.errors import CheckpointError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _perturb(model: nn.Module, seed: int) -> None:
    """Change every float tensor (weights and BN running stats) and the integer BN counter."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(8, 3, generator=g))  # updates running_mean/var and num_batches_tracked
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_copy_is_frozen_eval_and_independent():
    model = _model()
    ema = ModelEma(model, decay=0.9)
    assert not ema.module.training and model.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.module.parameters(), model.parameters()))
    for k, v in _state(model).items():
        assert torch.equal(ema.module.state_dict()[k], v)


def test_decay_zero_copies_weights_exactly():
    model = _model()
    ema = ModelEma(model, decay=0.0)
    _perturb(model, 1)
    assert ema.update(model)
    for k, v in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[k], v), k


def test_one_update_is_weighted_average_and_int_buffer_copied():
    model = _model()
    d = 0.9
    ema = ModelEma(model, decay=d)
    old = _state(model)
    _perturb(model, 2)
    new = _state(model)
    ema.update(model)
    got = ema.module.state_dict()
    for k in old:
        if old[k].is_floating_point():
            assert not torch.equal(old[k], new[k]), k  # the check below is not vacuous
            torch.testing.assert_close(got[k], d * old[k] + (1 - d) * new[k], rtol=1e-6, atol=1e-7)
        else:
            assert got[k].dtype == torch.long and int(got[k]) == int(new[k]) == 1, k  # copied, not 0.1
    assert ema.num_updates == 1 and ema.calls == 1


def test_warmup_decay_formula_and_first_update():
    ema = ModelEma(_model(), decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.999  # capped at decay (8991/9000 > 0.999 from n=8991)
    assert ModelEma(_model(), decay=0.999).decay_at(0) == 0.999
    model = _model()
    ema = ModelEma(model, decay=0.999, warmup=True)
    old = _state(model)
    _perturb(model, 3)
    ema.update(model)  # first update: decay 0.1, not 0.999
    w = ema.module[0].weight
    torch.testing.assert_close(
        w, 0.1 * old["0.weight"] + 0.9 * model[0].weight.detach(), rtol=1e-6, atol=1e-7
    )


def test_every_k_updates_only_on_kth_call():
    model = _model()
    ema = ModelEma(model, decay=0.0, every=3)
    start = _state(model)
    done = []
    for call in range(1, 8):
        _perturb(model, 10 + call)
        done.append(ema.update(model))
        if call < 3:
            assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in start.items())
        if call == 3:
            assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in model.state_dict().items())
    assert done == [False, False, True, False, False, True, False]
    assert ema.calls == 7 and ema.num_updates == 2


def test_state_round_trip_is_bitwise_and_resumes_identically():
    model = _model()
    ema = ModelEma(model, decay=0.7, warmup=True, every=2)
    for i in range(5):
        _perturb(model, 20 + i)
        ema.update(model)
    state = ema.state_dict()
    assert state["num_updates"] == 2 and state["calls"] == 5
    saved = {k: v.clone() for k, v in state["module"].items()}

    other = ModelEma(_model(seed=99), decay=0.7, warmup=True, every=2)
    other.load_state_dict({"module": saved, "num_updates": 2, "calls": 5})
    for k, v in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k
    assert (other.num_updates, other.calls) == (2, 5)
    for i in range(3):  # same future: same counters, same weights
        _perturb(model, 40 + i)
        assert ema.update(model) == other.update(model)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k

    with pytest.raises(CheckpointError, match="must hold"):
        other.load_state_dict({"module": saved})
    bad = dict(saved)
    bad.pop("0.weight")
    with pytest.raises(CheckpointError, match="do not fit"):
        other.load_state_dict({"module": bad, "num_updates": 0, "calls": 0})


def test_unwraps_compiled_model():
    model = _model()
    compiled = torch.compile(model)  # lazy: nothing compiles unless called
    ema = ModelEma(compiled, decay=0.0)
    assert set(ema.module.state_dict()) == set(model.state_dict())
    _perturb(model, 5)
    ema.update(compiled)
    assert torch.equal(ema.module[3].weight, model[3].weight)


def test_unwraps_ddp(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = ModelEma(ddp, decay=0.0)
        assert set(ema.module.state_dict()) == set(model.state_dict())  # no "module." prefix
        _perturb(model, 6)
        ema.update(ddp)
        assert torch.equal(ema.module[0].weight, model[0].weight)
    finally:
        dist.destroy_process_group()
