"""Webdataset shards: the exact assignment and order (pure), resume without decoding, training and
evaluation from shards (1 and 2 processes), the Hub layout, and one-line errors for bad shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MICRO_OVERRIDES, assert_bitwise_equal, env_for_subprocess, run_cli, torchrun, weights

from swin_train.data import shards as S
from swin_train.data.pack import PackOptions, pack
from swin_train.errors import DataError

TRAIN_ARGS = [*MICRO_OVERRIDES, "data.batch_size=16", "train.epochs=1"]


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """256 train / 64 val images of the shapes set (8 classes, 32 px)."""
    from swin_train.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(
        tmp_path_factory.mktemp("small") / "shapes", img_size=32, train_per_class=32, val_per_class=8
    )


@pytest.fixture(scope="module")
def packed(small_shapes, tmp_path_factory):
    """The small set packed 8 images per shard: 32 train shards, 8 val shards."""
    out = tmp_path_factory.mktemp("packed") / "wds"
    pack(small_shapes, out, PackOptions(shard_size=8), progress=False)
    return out


# ------------------------------------------------------------------------------------------- pure
@pytest.mark.parametrize("world, workers", [(1, 1), (1, 2), (2, 2), (3, 4), (2, 8)])
def test_eval_streams_read_every_shard_exactly_once(world, workers):
    split = S.ShardSplit("validation", tuple(S.Shard(f"s{i}.tar", f"s{i}.tar", 5 + i % 3) for i in range(11)))
    seen = []
    for rank in range(world):
        ds = S.ShardEvalDataset(split, None, rank=rank, world_size=world, num_workers=workers)
        seen += ds.rank_shards()
    assert sorted(seen) == list(range(11))
    total = sum(
        len(S.ShardEvalDataset(split, None, rank=r, world_size=world, num_workers=workers))
        for r in range(world)
    )
    assert total == split.num_samples


def test_shard_order_is_a_function_of_seed_and_epoch():
    assert S.epoch_shard_order(50, seed=3, epoch=1) == S.epoch_shard_order(50, seed=3, epoch=1)
    assert S.epoch_shard_order(50, seed=3, epoch=1) != S.epoch_shard_order(50, seed=3, epoch=2)
    assert S.epoch_shard_order(50, seed=3, epoch=1) != S.epoch_shard_order(50, seed=4, epoch=1)
    assert sorted(S.epoch_shard_order(50, seed=3, epoch=1)) == list(range(50))


def test_every_stream_gets_the_same_count_in_every_epoch():
    counts = [10, 10, 9, 10, 7, 10, 10, 10, 10, 10, 10]
    per_stream = S.samples_per_stream(counts, num_streams=4, batch_size=4)
    assert per_stream == (7 + 9) // 4 * 4  # 2 shards per stream at least, the two smallest
    for epoch in range(20):
        order = S.epoch_shard_order(len(counts), 0, epoch)
        streams = [S.stream_shards(order, s, 4) for s in range(4)]
        assert sorted(i for st in streams for i in st) == list(range(len(counts)))
        assert all(sum(counts[i] for i in st) >= per_stream for st in streams)


def test_buffer_shuffle_is_a_permutation_that_mixes_beyond_the_buffer():
    order = S.buffer_shuffle_order(1000, 50, (1, 2, 3))
    assert sorted(order.tolist()) == list(range(1000))
    assert not np.array_equal(order, np.arange(1000))
    np.testing.assert_array_equal(order[:100], S.buffer_shuffle_order(1000, 50, (1, 2, 3), limit=100))
    assert max(p - i for p, i in enumerate(order)) < 1000  # noqa: C416 - emitted after its arrival
    assert all(i <= p + 49 for p, i in enumerate(order))  # never emitted before it entered the buffer


@pytest.mark.parametrize("k, workers", [(0, 2), (1, 2), (5, 2), (7, 3), (4, 1)])
def test_batches_before_matches_a_round_robin_over_workers(k, workers):
    turn = [i % workers for i in range(k)]
    assert [S.batches_before(k, w, workers) for w in range(workers)] == [
        turn.count(w) for w in range(workers)
    ]


# ----------------------------------------------------------------------------- reading and resuming
def test_a_stream_started_mid_epoch_is_the_tail_of_the_full_stream_and_skips_early_shards(
    packed, monkeypatch
):
    split = S.resolve_split(str(packed), "train")
    ds = S.ShardTrainDataset(split, None, batch_size=4, seed=7, world_size=2, num_workers=2, shuffle_buffer=4)
    ds.set_epoch(3)
    full = [(sid, m, s["__key__"]) for sid, m, s in ds.stream_samples(stream=1)]
    assert len(full) == ds.samples_per_stream == 64
    opened = []
    real_read = S.read_shard
    monkeypatch.setattr(
        S, "read_shard", lambda shard, **kw: (opened.append(shard.name), real_read(shard, **kw))[1]
    )
    tail = [(sid, m, s["__key__"]) for sid, m, s in ds.stream_samples(stream=1, start=48)]
    assert tail == full[48:]
    shard_ids = S.stream_shards(S.epoch_shard_order(len(split.shards), 7, 3), 1, 4)
    first_needed = int(S.buffer_shuffle_order(64, 4, (S._BUFFER_KEY, 7, 3, 1))[48:].min())
    # the shards whose samples were all trained before position 48 are not opened
    assert opened == [split.shards[i].name for i in shard_ids[first_needed // 8 :]] and len(opened) < len(
        shard_ids
    )


def test_loader_from_a_start_batch_yields_the_rest_of_the_epoch_bitwise(packed):
    from torchvision.transforms import v2

    from swin_train.data.shards import build_shard_loader

    split = S.resolve_split(str(packed), "train")
    transform = v2.Compose(
        [v2.PILToTensor(), v2.RandomResizedCrop(16, antialias=True), v2.ToDtype(torch.float32)]
    )
    ds = S.ShardTrainDataset(split, transform, batch_size=8, seed=0, num_workers=2, shuffle_buffer=16)
    loader = build_shard_loader(ds, batch_size=8, num_workers=2, pin_memory=False, drop_last=True)
    assert len(loader) == 256 // 8  # 16 shards a worker, all full
    ds.set_epoch(1)
    full = list(loader)
    ds.set_epoch(1)
    ds.set_start(5, 8)
    resumed = list(loader)
    assert len(resumed) == len(full) - 5
    for (a, ya), (b, yb) in zip(full[5:], resumed):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    ds.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], full[0][0])  # a new epoch, a new order


def test_pack_output_opens_with_webdataset(packed, small_shapes):
    import webdataset as wds

    info = json.loads((packed / "_info.json").read_text())
    urls = [str(packed / f) for f in info["splits"]["validation"]["filenames"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "cls", "json"))
    assert len(samples) == 64 == info["splits"]["validation"]["num_samples"]
    for image, label, meta in samples:
        assert info["classes"][label] == meta["class"] == Path(meta["path"]).parent.name
        assert image.size == (32, 32)
        assert (Path(small_shapes) / meta["path"]).read_bytes()  # the source image it was copied from


# ----------------------------------------------------------------------------------- end to end
def _hub_layout(src: Path, out: Path) -> None:
    """Shards as timm's imagenet-1k-wds has them, written by webdataset's ShardWriter: JPEGs, .cls, .json,
    `imagenet1k-{split}-NNNN.tar`, `_info.json` without class names."""
    import webdataset as wds
    from PIL import Image

    from swin_train.data.folder import scan_image_folder

    out.mkdir()
    info = {"name": "imagenet-1k", "splits": {}}
    for split, folder in (("train", "train"), ("validation", "val")):
        _, samples = scan_image_folder(src / folder)
        with wds.ShardWriter(str(out / f"imagenet1k-{split}-%04d.tar"), maxcount=20, verbose=0) as sink:
            for i, (path, label) in enumerate(samples[:: 2 if split == "train" else 1]):
                jpeg = io.BytesIO()
                Image.open(path).convert("RGB").save(jpeg, format="JPEG")
                sink.write(
                    {
                        "__key__": f"{split}_{i:06d}",
                        "jpg": jpeg.getvalue(),
                        "cls": label,
                        "json": {"label": label},
                    }
                )
        files = sorted(p.name for p in out.glob(f"imagenet1k-{split}-*.tar"))
        lengths = [S.count_samples(str(out / f)) for f in files]
        info["splits"][split] = {
            "name": split,
            "num_samples": sum(lengths),
            "filenames": files,
            "shard_lengths": lengths,
        }
    (out / "_info.json").write_text(json.dumps(info))


def test_hub_layout_shards_written_by_webdataset_train_by_brace_pattern(small_shapes, tmp_path):
    hub = tmp_path / "hub"
    _hub_layout(Path(small_shapes), hub)
    split = S.resolve_split(str(hub / "imagenet1k-train-{0000..0006}.tar"), "train")
    assert [s.name for s in split.shards] == [f"imagenet1k-train-{i:04d}.tar" for i in range(7)]
    assert split.num_samples == 128 and split.class_names is None
    done = run_cli(
        "train",
        "--data-path",
        hub / "imagenet1k-train-{0000..0006}.tar",
        "--output",
        tmp_path / "run",
        *TRAIN_ARGS,
        f"data.val_path={hub}/imagenet1k-validation-{{0000..0003}}.tar",
        "data.num_workers=2",
        "data.val_split=validation",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "128 train / 64 val images, 8 classes" in done.stdout
    assert "on 64 val images" in done.stdout


def test_shards_train_the_same_samples_per_epoch_and_evaluate_as_the_folder(small_shapes, packed, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--data-path", packed, "--output", out, *TRAIN_ARGS, "data.num_workers=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "256 train / 64 val images, 8 classes; 16 steps per epoch" in done.stdout
    )  # as the folder: 256 // 16
    assert "sit out" not in done.stdout
    results = {}
    # the folder on 2 processes is test_train's business: its exactness is proven there
    for name, path, procs in (("folder", small_shapes, 1), ("shards", packed, 1), ("shards", packed, 2)):
        args = (
            "--checkpoint",
            out / "last.pth",
            "--data-path",
            path,
            "--num-workers",
            "2",
            "--metrics-json",
            tmp_path / f"{name}{procs}.json",
        )
        if procs == 1:  # in this process: one interpreter start fewer
            from swin_train.cli.eval import cli as eval_cli

            assert eval_cli(list(map(str, args))) == 0
        else:
            ran = torchrun(2, "eval", *args)
            assert ran.returncode == 0, ran.stderr[-2000:]
        results[name, procs] = json.loads((tmp_path / f"{name}{procs}.json").read_text())
    assert all(r["num_samples"] == 64 for r in results.values())
    top1 = {r["top1"] for r in results.values()}
    assert len(top1) == 1, results


def test_kill_9_mid_epoch_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(packed, tmp_path):
    args = [*TRAIN_ARGS, "data.num_workers=2", "train.checkpoint_every_steps=5", "data.shuffle_buffer=24"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli("train", "--data-path", packed, "--output", ref, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = [
        sys.executable,
        "-m",
        "swin_train.cli.train",
        "--data-path",
        str(packed),
        "--output",
        str(run),
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_for_subprocess())
    _kill_when(proc, run / "step-000000005.pth")
    resumed = run_cli("train", "--data-path", packed, "--output", run, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "data layout changed" not in resumed.stdout
    assert_bitwise_equal(weights(ref / "last.pth"), weights(run / "last.pth"))
    # another worker count reads the shards in other streams: the resume says its order differs
    other = run_cli(
        "train",
        "--data-path",
        packed,
        "--output",
        tmp_path / "other",
        *args,
        "data.num_workers=1",
        "--resume",
        ref / "step-000000015.pth",
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert "data layout changed since" in other.stdout
    assert "(2 -> 1 shard readers per process)" in other.stdout


def _kill_when(proc, path, timeout=240):
    import signal
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared"
        assert time.time() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------------------------ bad input
def _copy_packed(packed: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(packed, to)
    return to


def _eval_error(tmp_path, data_path, *extra):
    """swin-eval in-process on shards: (exit code, stderr)."""
    from swin_train.cli.eval import cli
    from swin_train.models.swin import SwinTransformer

    ckpt = tmp_path / "weights.pth"
    if not ckpt.exists():
        model = SwinTransformer(
            img_size=32,
            patch_size=4,
            embed_dim=32,
            depths=(2, 2),
            num_heads=(2, 4),
            window_size=4,
            num_classes=8,
        )
        torch.save({"model": model.state_dict()}, ckpt)
        (tmp_path / "config.yaml").write_text("seed: 0\n")
    return cli(
        [
            "--checkpoint",
            str(ckpt),
            "--config",
            str(tmp_path / "config.yaml"),
            "--data-path",
            str(data_path),
            *MICRO_OVERRIDES,
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_index", "no shard index (_info.json or _info.yaml)"),
        ("truncated", "is truncated"),
        ("corrupt_image", "cannot decode image"),
    ],
)
def test_bad_shards_are_one_line_errors(packed, tmp_path, capsys, damage, message):
    bad = _copy_packed(packed, tmp_path / "bad")
    shard = bad / "data-validation-0003.tar"
    if damage == "missing_index":
        (bad / "_info.json").unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for m, data in members:
                data = (
                    data[:40]
                    if m.name.endswith(".png") and m.name.startswith("validation_00000025")
                    else data
                )
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
    assert _eval_error(tmp_path, bad, "data.num_workers=0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("label", [-1, 8])
def test_a_shard_label_outside_the_classes_is_a_one_line_error(packed, tmp_path, capsys, label):
    bad = _copy_packed(packed, tmp_path / "bad")
    shard = bad / "data-validation-0003.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = str(label).encode() if m.name == "validation_00000025.cls" else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    assert _eval_error(tmp_path, bad, "data.num_workers=0") == 2  # the index names 8 classes
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (
        f"sample validation_00000025 in shard {shard}: label {label} is not one of the 8 classes 0..7" in err
    )
    png = next(data for m, data in members if m.name.endswith(".png"))
    sample = {"__key__": "k", "png": png, "cls": b"-1"}  # no class list: a negative label is still wrong
    with pytest.raises(DataError, match="label -1 is not a class index"):
        S.decode_sample(sample, S.Shard(str(shard), shard.name, 8))


def test_skip_bad_images_says_that_shards_have_no_fallback(packed, tmp_path, capsys):
    bad = _copy_packed(packed, tmp_path / "bad")
    shard = bad / "data-validation-0003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert _eval_error(tmp_path, bad, "data.num_workers=0", "data.skip_bad_images=true") == 2
    out = capsys.readouterr().out
    assert "data.skip_bad_images applies to image folders only" in out and "swin-data pack --skip-bad" in out


def test_a_failing_pipe_command_is_a_one_line_error(packed, tmp_path, capsys):
    pattern = f"pipe:cat {packed}/missing/data-validation-{{0000..0007}}.tar"
    bad = _eval_error(
        tmp_path,
        f"pipe:cat {packed}/data-train-{{0000..0031}}.tar",
        f"data.val_path={pattern}",
        f"data.shard_info={packed}/_info.json",
        "data.num_workers=0",
    )
    err = capsys.readouterr().err.strip()
    assert bad == 2 and len(err.splitlines()) == 1 and "the command of pipe:cat" in err and "failed" in err, (
        err
    )


def test_pipe_urls_evaluate_like_local_files(packed, tmp_path, capsys):
    pattern = f"pipe:cat {packed}/data-validation-{{0000..0007}}.tar"
    split = S.resolve_split(pattern, "validation", info_path=str(packed / "_info.json"))
    ds = S.ShardEvalDataset(split, None, world_size=1, num_workers=0)
    labels = [label for _, label in ds]
    local = S.ShardEvalDataset(S.resolve_split(str(packed), "validation"), None)
    assert labels == [label for _, label in local] and len(labels) == 64


def test_swin_data_index_counts_the_shards_of_every_split(packed, tmp_path):
    copy = _copy_packed(packed, tmp_path / "noindex")
    (copy / "_info.json").unlink()
    written = json.loads(S.write_index(copy).read_text())
    original = json.loads((packed / "_info.json").read_text())
    for split in ("train", "validation"):
        for key in ("filenames", "shard_lengths", "num_samples"):
            assert written["splits"][split][key] == original["splits"][split][key]


def test_without_the_webdataset_package_shards_and_pack_say_how_to_install_it(
    packed, small_shapes, tmp_path, capsys, monkeypatch
):
    from swin_train.cli.data import cli as data_cli

    for module in ("webdataset", "webdataset.gopen", "webdataset.tariterators"):
        monkeypatch.setitem(sys.modules, module, None)  # `import webdataset...` now raises ImportError
    assert _eval_error(tmp_path, packed, "data.num_workers=0") == 2
    assert data_cli(["pack", str(small_shapes), str(tmp_path / "out")]) == 2
    assert data_cli(["index", str(packed)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("pip install 'swin-train[wds]'" in e for e in errors), errors
    assert not (tmp_path / "out").exists()  # nothing written before the error
