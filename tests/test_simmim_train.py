"""SimMIM pre-training end to end (task: simmim): photographs without labels, a falling masked loss, the
pictures, bitwise resume after kill -9, two processes, and a checkpoint of one task refused by the other."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    assert_bitwise_equal,
    env_for_subprocess,
    photo_folder,
    photo_jpegs,
    run_cli,
    torchrun,
    weights,
)
from PIL import Image
from test_train import _kill_when, _records

from swin_train import create_simmim
from swin_train.data.simmim import MaskGenerator

# A micro SimMIM at 64 px: patches of 8, three stages (stride 32, the official decoder's): maps 8, 4, 2
PRETRAIN = [
    "task=simmim",
    "model.patch_size=8",
    "model.embed_dim=24",
    "model.depths=[2,2,2]",
    "model.num_heads=[2,2,4]",
    "model.window_size=4",
    "model.drop_path_rate=0",
    "data.img_size=64",
    "simmim.mask_patch_size=16",
    "simmim.pictures=3",
    "data.batch_size=4",
    "train.epochs=4",
    "train.warmup_epochs=0",
    "train.base_lr=2e-3",
    "train.lr_base_batch=4",
    "amp=none",
    "print_freq=2",
]


@pytest.fixture(scope="module")
def pile(tmp_path_factory):
    """16 photographs (300-500 px JPEGs) in one flat folder: no classes, no splits."""
    root = tmp_path_factory.mktemp("pile") / "photos"
    root.mkdir()
    for i, data in enumerate(photo_jpegs(16, seed=3)):
        (root / f"{i:02d}.jpg").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def pretrained(pile, tmp_path_factory):
    """An uninterrupted micro pre-training: 4 epochs of 4 steps, a step checkpoint every 3."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_cli(
        "train",
        "--data-path",
        pile,
        "--output",
        out,
        *PRETRAIN,
        "train.checkpoint_every_steps=3",
        "data.num_workers=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_pretraining_on_unlabelled_photos_learns_and_draws_its_reconstructions(pretrained):
    out, logged = pretrained
    assert "16 train / 16 val images, no labels (task simmim); 4 steps per epoch" in logged
    assert "validating on 16 of its own images" in logged and "done: masked reconstruction loss" in logged
    records = _records(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.05
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.03
    assert all(r["val_num_samples"] == 16 and r["val_num_skipped"] == 0 for r in records)
    assert records[-1]["best_loss"] == min(r["val_loss"] for r in records)
    for epoch in range(1, 5):  # 3 rows of original | masked | reconstruction, 64 px with 2 px borders
        picture = Image.open(out / "reconstructions" / f"epoch_{epoch:04d}.png")
        assert picture.size == (3 * 66 + 2, 3 * 66 + 2) and picture.mode == "RGB"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert len(events.Images("val/reconstruction")) == 4 and "val/loss" in events.Tags()["scalars"]


def test_a_pretraining_checkpoint_is_a_simmim_state_dict_that_create_simmim_loads(pretrained):
    out, _ = pretrained
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["config"]["task"] == "simmim" and state["class_names"] == []
    keys = set(state["model"])
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias"} <= keys
    assert all(k.startswith(("encoder.", "decoder.0.")) for k in keys) and not any(
        ".head." in k for k in keys
    )
    assert state["model"]["decoder.0.weight"].shape == (32 * 32 * 3, 96, 1, 1)
    model = create_simmim(checkpoint=out / "last.pth").eval()  # its own architecture from the checkpoint
    assert_bitwise_equal(model.state_dict(), state["model"])
    images = torch.randn(2, 3, 64, 64)
    masks = torch.stack([MaskGenerator(64, 16, 8, 0.6)() for _ in range(2)])
    assert torch.isfinite(model(images, masks))


def test_pretraining_resumes_bitwise_after_kill_9_mid_epoch(pile, pretrained, tmp_path):
    out, _ = pretrained
    run = tmp_path / "run"
    args = ["--data-path", str(pile), "--output", str(run), *PRETRAIN, "train.checkpoint_every_steps=3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "swin_train.cli.train", *args, "data.num_workers=2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env_for_subprocess(),
    )
    _kill_when(proc, run / "step-000000003.pth")  # mid-epoch 0: the masks of steps 4.. drawn again
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli("train", *args, "data.num_workers=1")  # another worker count: the same masks
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    assert_bitwise_equal(weights(out / "last.pth"), weights(run / "last.pth"))
    timing = ("train_img_s", "train_epoch_time")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(_records(out)) == strip(_records(run))
    assert (run / "reconstructions" / "epoch_0004.png").read_bytes() == (
        out / "reconstructions" / "epoch_0004.png"
    ).read_bytes()


def test_pretraining_runs_on_two_processes_with_train_and_val_splits(tmp_path):
    data = photo_folder(tmp_path / "photos", photo_jpegs(16, seed=5))  # train/ and val/ of class folders
    out = tmp_path / "run"
    done = torchrun(
        2, "train", "--data-path", data, "--output", out, *PRETRAIN, "train.epochs=2", "data.num_workers=1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16 train / 16 val images, no labels (task simmim); 2 steps per epoch" in done.stdout + done.stderr
    records = _records(out)
    assert len(records) == 2 and all(r["val_num_samples"] == 16 for r in records)  # every val image once
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]


def test_a_checkpoint_of_one_task_is_refused_by_the_other_in_one_line(pretrained, tmp_path):
    out, _ = pretrained
    data = photo_folder(tmp_path / "photos", photo_jpegs(4, seed=1))
    classify = [a for a in PRETRAIN if not a.startswith(("task=", "simmim."))] + ["model.num_classes=2"]
    done = run_cli(
        "train", "--data-path", data, "--output", tmp_path / "cls", "--resume", out / "last.pth", *classify
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "is a simmim checkpoint, this run is task=classification" in line and "model.pretrained=" in line
    first = run_cli("train", "--data-path", data, "--output", tmp_path / "cls", *classify, "train.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    done = run_cli("train", "--data-path", data, "--output", tmp_path / "cls", *PRETRAIN)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "is a classification checkpoint, this run is task=simmim" in line


def test_pretraining_reads_shards_and_a_flat_folder_with_its_own_val_folder_in_bf16_with_ema(pile, tmp_path):
    from swin_train.data.pack import PackOptions, pack

    labelled = photo_folder(tmp_path / "photos", photo_jpegs(8, seed=2))
    pack(labelled, tmp_path / "wds", PackOptions(shard_size=2), progress=False)
    short = [*PRETRAIN, "train.epochs=1", "data.num_workers=2"]
    done = run_cli("train", "--data-path", tmp_path / "wds", "--output", tmp_path / "wds_run", *short)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 train / 8 val images, no labels (task simmim)" in done.stdout  # the shards' labels ignored
    assert _records(tmp_path / "wds_run")[0]["val_num_samples"] == 8
    ema = ["amp=bf16", "train.ema=true", "train.best_on=ema", f"data.val_path={labelled / 'val'}"]
    done = run_cli("train", "--data-path", pile, "--output", tmp_path / "flat", *short, *ema)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = _records(tmp_path / "flat")
    assert record["val_num_samples"] == record["ema_num_samples"] == 8
    assert record["best_loss"] == record["ema_loss"] and torch.isfinite(torch.tensor(record["val_loss"]))


def test_pretraining_reads_a_hugging_face_dataset_ignoring_its_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    from swin_train.data.folder import scan_image_folder

    folder = photo_folder(tmp_path / "photos", photo_jpegs(8, seed=4))
    splits = {}
    for split, name in (("train", "train"), ("validation", "val")):
        _, samples = scan_image_folder(folder / name)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [p for p, _ in samples], "label": [y for _, y in samples]},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
            ),
        )
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "run"
    done = run_cli("train", "--data-path", tmp_path / "hf", "--output", out, *PRETRAIN, "train.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 train / 8 val images, no labels (task simmim)" in done.stdout
    assert _records(out)[0]["val_num_samples"] == 8 and (out / "reconstructions" / "epoch_0001.png").exists()


def test_bad_pretraining_settings_stop_the_command_in_one_line_before_anything_is_written(pile, tmp_path):
    for bad, message in [
        ("simmim.mask_patch_size=24", "simmim.mask_patch_size=24 must divide data.img_size=64"),
        ("simmim.mask_ratio=1.5", "simmim.mask_ratio must be in (0, 1), got 1.5"),
        ("data.synthetic=true", "task simmim reads images"),
    ]:
        done = run_cli("train", "--data-path", pile, "--output", tmp_path / "run", *PRETRAIN, bad)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = done.stderr.strip().splitlines()
        assert message in line
        assert not (tmp_path / "run").exists()
