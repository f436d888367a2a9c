"""Validation's data (issue 30, items 3 and 5): training's validation and swin-eval feed the model the same
pixels whatever the decoded-image cache (the same loss to the last bit), and with data.skip_bad_images an
unreadable val file is left out of every count and named, on 1 and 2 processes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import png, torchrun, two_class_train_args
from PIL import Image

from swin_train.cli.eval import cli as eval_cli
from swin_train.cli.train import cli as train_cli

CLASSES = ("cat", "dog")


def _jpeg(size: int, seed: int) -> bytes:
    """A noisy JPEG of `size` px: five times the micro model's 32 px, so the fast eval path decodes it at a
    reduced DCT scale where a whole decode gives other pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(a clean data set, the same with 3 unreadable val files per class between the good ones, their paths)."""
    root = tmp_path_factory.mktemp("val_pipeline")
    clean, bad = root / "clean", root / "bad"
    for c, name in enumerate(CLASSES):
        for i in range(8):
            png(clean / "train" / name / f"{i}.png", 100 * c + i)
        (clean / "val" / name).mkdir(parents=True)
        for i in range(4):
            (clean / "val" / name / f"{i}.jpg").write_bytes(_jpeg(160, 1000 + 100 * c + i))
    shutil.copytree(clean, bad)
    skipped = []
    for name in CLASSES:
        cut = (clean / "val" / name / "0.jpg").read_bytes()[:2000]  # a header that reads, data that does not
        for file, data in (("0x.jpg", b""), ("1x.jpg", b"not an image"), ("2x.jpg", cut)):
            (bad / "val" / name / file).write_bytes(data)
            skipped.append(str(bad / "val" / name / file))
    return clean, bad, sorted(skipped)


def _logged(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def _eval(checkpoint: Path, data: Path, metrics: Path, *extra: str, procs: int = 1) -> dict:
    args = ["--checkpoint", str(checkpoint), "--data-path", str(data), "--device", "cpu"]
    args += ["--metrics-json", str(metrics), *extra]
    if procs == 1:
        assert eval_cli(args) == 0
    else:
        ran = torchrun(procs, "eval", *args)
        assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(metrics.read_text())


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory) -> Path:
    """One epoch on the clean set; its val images fit the decoded-image cache (256 MiB)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_cli(two_class_train_args(folders[0], out)) == 0
    return out


def test_swin_eval_gives_the_validation_loss_training_logged_to_the_last_bit(trained, folders, tmp_path):
    logged = _logged(trained)
    for cache in ("data.decoded_cache_mib=256", "data.decoded_cache_mib=0"):
        result = _eval(trained / "last.pth", folders[0], tmp_path / f"m-{cache}.json", cache)
        assert result["num_samples"] == logged["val_num_samples"] == 8
        assert (result["loss"], result["top1"]) == (logged["val_loss"], logged["val_top1"])


def test_unreadable_val_files_are_left_out_of_swin_eval_and_named(trained, folders, tmp_path, capsys):
    clean, bad, skipped = folders
    # batches of one: the sums run over the same numbers in the same order, so even the loss is bitwise
    one = ("--batch-size", "1")
    want = _eval(trained / "last.pth", clean, tmp_path / "clean.json", *one)
    capsys.readouterr()
    args = (*one, "--num-workers", "2", "data.skip_bad_images=true")  # the workers read the bad files
    got = _eval(trained / "last.pth", bad, tmp_path / "bad.json", *args)
    assert (got["num_samples"], got["top1"]) == (want["num_samples"], want["top1"]) == (8, want["top1"])
    assert want["num_skipped"] == 0 and want["skipped_files"] == []
    assert got == {**want, "num_skipped": 6, "skipped_files": skipped}
    assert f"8 images, 1 process(es); 6 unreadable left out: {skipped[0]}, " in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_training_validation_leaves_unreadable_files_out_and_swin_eval_agrees(folders, tmp_path, procs):
    clean, bad, skipped = folders
    args = two_class_train_args(bad, tmp_path / "run", "data.skip_bad_images=true", "data.num_workers=1")
    if procs == 1:
        assert train_cli(args) == 0
    else:
        ran = torchrun(2, "train", *args)
        assert ran.returncode == 0, ran.stderr[-2000:]
    logged = _logged(tmp_path / "run")
    assert logged["val_num_samples"] == 8  # 14 files, 6 of them unreadable
    assert logged["val_num_skipped"] == 6
    assert logged["val_skipped_files"] == skipped
    assert "validation left out 6 unreadable images" in (tmp_path / "run" / "log.txt").read_text()
    # swin-eval on as many processes: the numbers training logged, bitwise; on the clean set: the same top-1
    last = tmp_path / "run" / "last.pth"
    got = _eval(last, bad, tmp_path / "bad.json", "data.skip_bad_images=true", procs=procs)
    assert (got["loss"], got["top1"], got["num_samples"], got["num_skipped"]) == (
        logged["val_loss"],
        logged["val_top1"],
        8,
        6,
    )
    assert got["skipped_files"] == skipped
    assert _eval(last, clean, tmp_path / "clean.json")["top1"] == logged["val_top1"]
