"""A CPU micro-batch split into parts that run at once on their own threads (swin_train/cpu_split.py)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from swin_train.cpu_split import CpuSplit, choose_parts, eval_parts, evaluation_split
from swin_train.device import resolve_amp
from swin_train.errors import ConfigError
from swin_train.evaluation import evaluate
from swin_train.models.swin import SwinTransformer, stochastic_depth_generator

MICRO = dict(
    img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5
)
FREE = dict(
    device_type="cpu",
    distributed=False,
    compiled=False,
    grad_checkpointing=False,
    dropout=False,
    batch_size=64,
)


def test_auto_takes_one_part_per_intra_op_thread_with_at_least_16_images_each():
    assert choose_parts(0, **FREE, threads=2)[0] == 2
    assert choose_parts(0, **FREE, threads=8)[0] == 4  # 64 images: 4 parts of 16
    assert choose_parts(0, **{**FREE, "batch_size": 31}, threads=2) == (
        1,
        "off: 2 intra-op thread(s) at batch 31",
    )
    assert choose_parts(0, **FREE, threads=1)[0] == 1
    assert choose_parts(1, **FREE, threads=2) == (1, "off (train.cpu_split: 1)")
    assert choose_parts(3, **FREE, threads=2)[0] == 3  # asked for: as many as the batch has images


@pytest.mark.parametrize(
    "blocker, reason",
    [
        ({"device_type": "cuda"}, "the device is cuda"),
        ({"distributed": True}, "DDP"),
        ({"compiled": True}, "train.compile"),
        ({"grad_checkpointing": True}, "model.grad_checkpointing"),
        ({"dropout": True}, "dropout"),
    ],
)
def test_what_the_threads_cannot_share_turns_auto_off_and_an_explicit_split_into_a_config_error(
    blocker, reason
):
    parts, why = choose_parts(0, **{**FREE, **blocker}, threads=2)
    assert parts == 1 and why.startswith("off: ") and reason in why
    with pytest.raises(
        ConfigError, match=f"train.cpu_split=2 cannot apply: .*{reason}.*set train.cpu_split: 0"
    ):
        choose_parts(2, **{**FREE, **blocker}, threads=2)
    assert choose_parts(1, **{**FREE, **blocker}, threads=2)[0] == 1


def test_more_parts_than_images_is_a_config_error():
    with pytest.raises(ConfigError, match="train.cpu_split=65 is more parts than data.batch_size=64"):
        choose_parts(65, **FREE, threads=2)


def test_each_part_thread_has_its_share_of_intra_op_threads_and_the_main_thread_keeps_its_own():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        split = CpuSplit(2, threads=4)
        seen = []
        w = torch.zeros(1, requires_grad=True)
        together = threading.Barrier(2)  # a thread that finished one part could otherwise take the other too

        def fn(x, y, share):
            seen.append((threading.current_thread().name, torch.get_num_threads(), len(x), share))
            together.wait(timeout=30)
            return x.sum(), (x * w).sum()

        split.run(fn, torch.zeros(6, 1), torch.zeros(6), [w])
        split.close()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    assert len({name for name, *_ in seen}) == 2  # two threads, one per part
    assert {s[1] for s in seen} == {2} and sorted(s[2] for s in seen) == [3, 3]
    assert all(name.startswith("cpu-split") for name, *_ in seen) and all(s[3] == 0.5 for s in seen)


def _step_grads(model, images, targets, split: CpuSplit | None):
    model.zero_grad(set_to_none=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(x, y, share=1.0):
        loss = loss_fn(model(x), y)
        return loss.detach(), loss * share

    if split is not None:
        loss = split.run(forward, images, targets, list(model.parameters()))
    else:
        loss, objective = forward(images, targets)
        objective.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_split_batch_has_the_whole_batch_loss_and_gradient():
    torch.manual_seed(0)
    model = SwinTransformer(**MICRO, drop_path_rate=0.0)  # both ways compute the same function
    images, targets = torch.randn(10, 3, 32, 32), torch.randint(0, 5, (10,))  # parts of 4, 3, 3
    whole_loss, whole = _step_grads(model, images, targets, None)
    split = CpuSplit(3, threads=3)
    try:
        split_loss, parts = _step_grads(model, images, targets, split)
    finally:
        split.close()
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-6, atol=1e-6)
    for name, grad in whole.items():
        torch.testing.assert_close(parts[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stochastic_depth_in_parts_repeats_exactly_from_the_same_seed_and_differs_from_another():
    torch.manual_seed(0)
    model = SwinTransformer(**MICRO, drop_path_rate=0.5)
    images, targets = torch.randn(32, 3, 32, 32), torch.randint(0, 5, (32,))
    split = CpuSplit(2, threads=2)
    results = []
    try:
        for seed in (1, 1, 2):
            torch.manual_seed(seed)  # the parts' generators are seeded from the default one
            trained = copy.deepcopy(model)
            optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
            for _ in range(3):
                _, grads = _step_grads(trained, images, targets, split)
                optimizer.step()
            results.append(grads)
    finally:
        split.close()
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert not all(torch.equal(results[0][n], results[2][n]) for n in results[0])


def test_a_threads_stochastic_depth_masks_come_from_its_own_generator():
    model = SwinTransformer(**MICRO, drop_path_rate=0.5).train()
    images = torch.randn(16, 3, 32, 32)

    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(123)  # the default generator is the same every time: only `seed` may matter
        with stochastic_depth_generator(torch.Generator().manual_seed(seed)):
            return model(images)

    assert torch.equal(logits(7), logits(7)) and not torch.equal(logits(7), logits(8))
    torch.manual_seed(123)
    default = model(images)  # outside the context: the default generator again
    torch.manual_seed(123)
    assert torch.equal(default, model(images))


def test_an_error_in_a_part_reaches_the_caller_after_every_part_has_finished():
    split = CpuSplit(2, threads=2)
    finished = []
    w = torch.ones(1, requires_grad=True)

    def fn(x, y, share):
        if x[0, 0] == 0:
            raise ValueError("bad part")
        threading.Event().wait(0.2)
        finished.append(True)
        return x.sum(), (x * w).sum()

    try:
        with pytest.raises(ValueError, match="bad part"):
            split.run(fn, torch.tensor([[0.0], [1.0]]), torch.zeros(2), [w])
        assert finished == [True] and w.grad is None  # nothing added from a batch that failed
    finally:
        split.close()


def test_evaluation_is_split_even_where_training_cannot_be_and_turned_off_only_by_the_setting():
    kw = dict(device_type="cpu", distributed=False, batch_size=64, threads=2)
    assert eval_parts(0, **kw) == 2  # dropout or checkpointing do not matter: nothing random runs
    assert eval_parts(1, **kw) == 1
    assert eval_parts(5, **{**kw, "batch_size": 3}) == 3  # no more parts than a batch has images
    assert eval_parts(0, **{**kw, "device_type": "cuda"}) == 1
    assert eval_parts(0, **{**kw, "distributed": True}) == 1


def test_a_checkpoint_trained_with_a_cpu_split_evaluates_on_a_gpu_and_under_torchrun_in_whole_batches():
    """swin-eval takes train.cpu_split from the training run's config: 2 parts there, none here."""
    kw = dict(device_type="cpu", distributed=False, batch_size=64, threads=2)
    assert eval_parts(2, **kw) == 2
    assert eval_parts(2, **{**kw, "distributed": True}) == 1
    assert eval_parts(2, **{**kw, "device_type": "cuda"}) == 1
    with pytest.raises(ConfigError, match="DDP runs one process per part"):  # training still refuses it
        choose_parts(
            2, **{**kw, "distributed": True}, compiled=False, grad_checkpointing=False, dropout=False
        )


def test_split_evaluation_counts_every_image_once_with_the_same_hits_and_loss():
    torch.manual_seed(0)
    model = SwinTransformer(**MICRO)
    images, targets = torch.randn(37, 3, 32, 32), torch.randint(0, 5, (37,))
    loader = DataLoader(TensorDataset(images, targets), batch_size=16)  # the last batch has 5 images
    kw = dict(device=torch.device("cpu"), amp=resolve_amp("none", torch.device("cpu")), num_classes=5)
    whole = evaluate(model, loader, **kw)
    split = CpuSplit(2, threads=2)
    try:
        parts = evaluate(model, loader, **kw, cpu_split=split)
    finally:
        split.close()
    assert parts["num_samples"] == whole["num_samples"] == 37
    assert (parts["top1"], parts["top5"]) == (whole["top1"], whole["top5"])
    assert parts["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_gradients_are_added_in_part_order_whichever_part_finishes_first():
    """Float sums depend on their order: threads adding into .grad as they finish would not repeat."""
    torch.manual_seed(0)
    w = torch.randn(1000, requires_grad=True)
    x = torch.randn(3, 1000)
    w.grad = torch.randn(1000)  # an earlier micro-batch's gradient (accumulation)
    expected = w.grad.clone()

    def fn(xp, yp, share):
        if torch.equal(xp, x[:1]):
            threading.Event().wait(0.3)  # the first part finishes last
        objective = (xp * w).sin().sum() * share
        return objective.detach(), objective

    split = CpuSplit(3, threads=3)
    try:
        split.run(fn, x, torch.zeros(3), [w])
    finally:
        split.close()
    for i in range(3):
        expected = expected + torch.autograd.grad((x[i : i + 1] * w).sin().sum() * (1 / 3), [w])[0]
    assert torch.equal(w.grad, expected)


def test_evaluation_reuses_the_training_split_when_it_has_as_many_parts():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    train_split = CpuSplit(2, threads=2)
    try:
        kw = dict(device_type="cpu", distributed=False, batch_size=64)
        assert evaluation_split(0, **kw, reuse=train_split) is train_split
        assert evaluation_split(1, **kw, reuse=train_split) is None
        own = evaluation_split(0, **kw)
        assert own is not train_split and own.parts == 2
        own.close()
    finally:
        train_split.close()
        torch.set_num_threads(before)


def test_the_main_thread_runs_with_a_parts_share_of_threads_inside_and_its_own_after():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    split = CpuSplit(2, threads=4)
    try:
        with split.main_thread_share():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 4
        with pytest.raises(RuntimeError, match="boom"), split.main_thread_share():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 4
    finally:
        split.close()
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "split_args, eval_threads",
    [
        (["train.cpu_split=2"], 1),  # evaluation split too: its parts' share
        (["train.cpu_split=0", "eval.batch_size=16"], 2),  # 16 images: evaluation not split, every thread
    ],
)
def test_training_and_evaluation_between_the_parts_run_on_a_parts_share_of_threads(
    shapes_root, tmp_path, monkeypatch, split_args, eval_threads
):
    # what the main thread runs between the parts (optimizer, top-k) gets a part's threads, not the process's
    from helpers import MICRO_OVERRIDES

    import swin_train.evaluation
    import swin_train.trainer
    from swin_train.cli.train import cli as train_cli

    seen = {"step": set(), "eval": set()}
    step, prefetch = swin_train.trainer.train_step, swin_train.evaluation.prefetch

    def counting_step(*args, **kwargs):
        seen["step"].add(torch.get_num_threads())
        return step(*args, **kwargs)

    def counting_prefetch(*args, **kwargs):  # evaluation's batches, each taken inside its loop
        for batch in prefetch(*args, **kwargs):
            seen["eval"].add(torch.get_num_threads())
            yield batch

    monkeypatch.setattr(swin_train.trainer, "train_step", counting_step)
    monkeypatch.setattr(swin_train.evaluation, "prefetch", counting_prefetch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = ["--data-path", str(shapes_root), "--output", str(tmp_path / "run"), *MICRO_OVERRIDES]
        assert train_cli([*args, "data.batch_size=32", "train.epochs=1", *split_args]) == 0
        assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(before)
    assert seen == {"step": {1}, "eval": {eval_threads}}
