"""Hugging Face datasets (save_to_disk folders and parquet files) as training data: columns named in the
config, class names from the features, exact resume after kill -9, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MICRO_OVERRIDES, assert_bitwise_equal, env_for_subprocess, run_cli, weights

from swin_train.data.hf_dataset import HFImageDataset, is_hf_source, load_split
from swin_train.errors import DataError

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    """The shapes set (32 px, 8 classes: 256 train, 64 val) as a DatasetDict with columns 'img' and 'y'."""
    from swin_train.data.folder import scan_image_folder
    from swin_train.data.shapes import ensure_shapes_dataset

    base = tmp_path_factory.mktemp("hf")
    shapes = Path(ensure_shapes_dataset(base / "shapes", img_size=32, train_per_class=32, val_per_class=8))
    classes, _ = scan_image_folder(shapes / "train")
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=classes)})
    splits = {}
    for split, folder in (("train", "train"), ("validation", "val")):
        _, samples = scan_image_folder(shapes / folder)
        splits[split] = datasets.Dataset.from_dict(
            {"img": [p for p, _ in samples], "y": [label for _, label in samples]}, features=features
        )
    root = base / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(root))
    parquet = base / "parquet" / "data"
    parquet.mkdir(parents=True)
    for split, ds in splits.items():
        ds.to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    return root, parquet.parent, classes


ARGS = [
    *MICRO_OVERRIDES,
    "data.batch_size=16",
    "train.epochs=1",
    "data.image_column=img",
    "data.label_column=y",
]


def test_saved_and_parquet_datasets_give_the_same_rows_and_class_names(hf_root):
    saved, parquet, classes = hf_root
    assert is_hf_source(str(saved)) and is_hf_source(str(parquet))
    a = HFImageDataset(load_split(str(saved), "validation"), None, image_column="img", label_column="y")
    b = HFImageDataset(load_split(str(parquet), "validation"), None, image_column="img", label_column="y")
    assert a.classes == b.classes == classes and len(a) == len(b) == 64
    for i in (0, 17, 63):
        (ia, la), (ib, lb) = a[i], b[i]
        assert la == lb and ia.tobytes() == ib.tobytes()


def test_a_dataset_without_the_named_columns_is_a_one_line_error(hf_root, tmp_path):
    saved, _, _ = hf_root
    with pytest.raises(DataError, match=r"has no column 'image' \(columns: img, y\); set data.image_column"):
        HFImageDataset(load_split(str(saved), "train"), None, image_column="image", label_column="y")
    done = run_cli("train", "--data-path", saved, "--output", tmp_path / "run", *MICRO_OVERRIDES)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no column 'image'" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(DataError, match="no split 'test'"):
        load_split(str(saved), "test")


def test_an_unlabelled_or_out_of_range_row_is_a_one_line_error(hf_root):
    saved, _, classes = hf_root
    rows = load_split(str(saved), "validation").select(range(3))
    image = rows[0]["img"]
    # -1: how the Hub's ClassLabel marks a row without a label; plain integer labels: any negative one
    class_label = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=classes)})
    for label, features in ((-1, class_label), (-2, None)):
        broken = datasets.Dataset.from_dict({"img": [image] * 3, "y": [0, label, 7]}, features=features)
        ds = HFImageDataset(broken, None, image_column="img", label_column="y")
        assert ds[0][1] == 0 and ds[2][1] == 7
        with pytest.raises(
            DataError, match=rf"row 1 of .*: label {label} is not one of the 8 classes 0\.\.7"
        ):
            ds[1]


def test_kill_9_mid_epoch_then_rerun_is_bitwise_equal_from_an_hf_dataset(hf_root, tmp_path):
    from test_shards import _kill_when

    saved, _, _ = hf_root
    args = [*ARGS, "data.num_workers=2", "train.checkpoint_every_steps=5"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli("train", "--data-path", saved, "--output", ref, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "256 train / 64 val images, 8 classes; 16 steps per epoch" in done.stdout
    cmd = [
        sys.executable,
        "-m",
        "swin_train.cli.train",
        "--data-path",
        str(saved),
        "--output",
        str(run),
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_for_subprocess())
    _kill_when(proc, run / "step-000000005.pth")
    resumed = run_cli("train", "--data-path", saved, "--output", run, *args)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    assert_bitwise_equal(weights(ref / "last.pth"), weights(run / "last.pth"))
