"""`swin-data pack`: deterministic, resumable shards from an ImageFolder or the official zip layout;
bad images reported or skipped, never dropped silently."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from helpers import env_for_subprocess
from PIL import Image

from swin_train.data.pack import PackOptions, pack, shard_contents
from swin_train.errors import DataError


def _folder(root: Path, per_class: int = 6, size=(40, 30)) -> Path:
    """train/ and val/ with 3 classes of small PNGs whose pixels differ."""
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (40 * c, 10 * i, 200)).save(folder / f"img_{i}.png")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_pack_is_deterministic_and_copies_the_bytes(tmp_path):
    src = _folder(tmp_path / "src")
    pack(src, tmp_path / "a", PackOptions(shard_size=4), progress=False)
    pack(src, tmp_path / "b", PackOptions(shard_size=4), progress=False, workers=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    info = json.loads((tmp_path / "a" / "_info.json").read_text())
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 4, 2]
    assert info["splits"]["validation"]["num_samples"] == 6
    import webdataset as wds

    urls = [str(tmp_path / "a" / f) for f in info["splits"]["train"]["filenames"]]
    copied = {json.loads(s["json"])["path"]: s["png"] for s in wds.WebDataset(urls, shardshuffle=False)}
    assert len(copied) == 18 and all((src / p).read_bytes() == b for p, b in copied.items())


def test_a_killed_pack_rerun_ends_with_identical_shards(tmp_path):
    src = _folder(tmp_path / "src", per_class=40)
    pack(src, tmp_path / "whole", PackOptions(shard_size=2), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "swin_train.cli.data", "pack", str(src), str(out), "--shard-size", "2"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_for_subprocess()
    )
    deadline = time.time() + 120
    while len(list(out.glob("data-train-*.tar"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "pack ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "_info.json").exists()  # killed midway: the index comes last
    (out / ".data-train-0059.tar.tmp-nohost-1-0badf00d").write_bytes(
        b"partial"
    )  # a temp file of another host
    done = subprocess.run([*cmd, "--no-progress"], capture_output=True, text=True, env=env_for_subprocess())
    assert done.returncode == 0, done.stderr
    assert "shards already written" in done.stdout
    assert _files(out) == _files(tmp_path / "whole")


def test_bad_images_fail_the_pack_or_are_skipped_and_listed(tmp_path):
    src = _folder(tmp_path / "src")
    bad = src / "train" / "class_1" / "img_2.png"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError, match=r"cannot decode image .*img_2.png.*--skip-bad"):
        pack(src, tmp_path / "strict", PackOptions(shard_size=4), progress=False)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "swin_train.cli.data",
            "pack",
            str(src),
            str(tmp_path / "x"),
            "--shard-size",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env_for_subprocess(),
    )
    assert (
        done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    )
    info = json.loads(
        pack(src, tmp_path / "lenient", PackOptions(shard_size=4, skip_bad=True), progress=False).read_text()
    )
    assert info["skipped_images"] == [str(bad)]
    assert info["splits"]["train"]["num_samples"] == 17


def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(DataError, match="--seed must be >= 0, got -1"):
        pack(_folder(tmp_path / "src"), tmp_path / "out", PackOptions(seed=-1), progress=False)
    assert not (tmp_path / "out").exists()


def test_max_size_stores_resized_images(tmp_path):
    src = _folder(tmp_path / "src", size=(64, 48))
    pack(src, tmp_path / "small", PackOptions(shard_size=100, max_size=32), progress=False)
    import webdataset as wds

    sizes = {
        s[0].size
        for s in wds.WebDataset(str(tmp_path / "small" / "data-train-0000.tar"), shardshuffle=False)
        .decode("pil")
        .to_tuple("png")
    }
    assert sizes == {(32, 24)}


def test_the_official_zip_layout_packs_with_class_names_from_its_paths(tmp_path):
    folder = _folder(tmp_path / "folder")
    zroot = tmp_path / "zips"
    zroot.mkdir()
    for split in ("train", "val"):
        lines = []
        with zipfile.ZipFile(zroot / f"{split}.zip", "w") as z:
            for path in sorted((folder / split).rglob("*.png")):
                rel = path.relative_to(folder / split).as_posix()
                z.write(path, rel)
                lines.append(f"{rel}\t{int(path.parent.name[-1])}")
        (zroot / f"{split}_map.txt").write_text("\n".join(lines) + "\n")
    info = json.loads(pack(zroot, tmp_path / "out", PackOptions(shard_size=5), progress=False).read_text())
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["splits"]["train"]["num_samples"] == 18 and info["splits"]["validation"]["num_samples"] == 6
    keys = shard_contents(tmp_path / "out" / "data-validation-0000.tar")
    assert keys == [f"validation_{i:08d}" for i in range(5)]


def test_a_rerun_with_other_options_is_refused(tmp_path):
    src = _folder(tmp_path / "src")
    pack(src, tmp_path / "out", PackOptions(shard_size=4), progress=False)
    with pytest.raises(DataError, match="another source or other options"):
        pack(src, tmp_path / "out", PackOptions(shard_size=5), progress=False)


def test_a_failed_pack_reruns_with_its_own_advice_and_ends_as_a_fresh_pack_would(tmp_path):
    src = _folder(tmp_path / "src")
    bad = src / "train" / "class_1" / "img_2.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:30])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"cannot decode image .*img_2.png.*--skip-bad"):
        pack(src, out, PackOptions(shard_size=4), progress=False)
    assert not (out / "_info.json").exists()  # nothing that reads as a finished pack
    # the advice: --skip-bad (the shards the failed run finished are kept)
    lenient = PackOptions(shard_size=4, skip_bad=True)
    info = json.loads(pack(src, out, lenient, progress=False).read_text())
    assert info["skipped_images"] == [str(bad)] and info["splits"]["train"]["num_samples"] == 17
    pack(src, tmp_path / "fresh", lenient, progress=False)
    everything_but_the_plan = lambda folder: {k: v for k, v in _files(folder).items() if k != "_pack.json"}
    assert everything_but_the_plan(out) == everything_but_the_plan(tmp_path / "fresh")
    # or the image fixed, without --skip-bad: the shard that left it out is written again
    bad.write_bytes(good)
    (out / "_info.json").unlink()  # an unfinished pack (a finished one refuses any change, see below)
    pack(src, out, PackOptions(shard_size=4), progress=False)
    pack(src, tmp_path / "strict", PackOptions(shard_size=4), progress=False)
    assert _files(out) == _files(tmp_path / "strict")


def test_a_shard_that_left_an_image_out_is_not_reused_by_a_run_without_skip_bad(tmp_path):
    src = _folder(tmp_path / "src")
    bad = src / "val" / "class_0" / "img_1.png"
    bad.write_bytes(bad.read_bytes()[:30])
    out = tmp_path / "out"
    pack(src, out, PackOptions(shard_size=4, skip_bad=True), progress=False)
    (out / "_info.json").unlink()  # as if killed before the index
    with pytest.raises(DataError, match=r"cannot decode image .*img_1.png"):
        pack(src, out, PackOptions(shard_size=4), progress=False)


def test_shard_files_no_pack_here_wrote_are_never_taken_for_finished_shards(tmp_path):
    src = _folder(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data-train-0000.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match="holds data-train-0000.tar, which no pack here wrote"):
        pack(src, tmp_path / "out", PackOptions(shard_size=4), progress=False)


@pytest.mark.parametrize(
    "labels, expected",
    [
        (
            {"class_1/img_0.png": "-1"},
            r"train_map.txt:\d+: label -1 is negative; labels number the classes from 0",
        ),
        (
            {"class_1/img_0.png": "1000000000"},
            r"train_map.txt has no image of label 3 but labels up to 1000000000",
        ),
    ],
)
def test_a_zip_map_label_out_of_range_is_a_one_line_error(tmp_path, labels, expected):
    folder = _folder(tmp_path / "folder")
    zroot = tmp_path / "zips"
    zroot.mkdir()
    lines = []
    with zipfile.ZipFile(zroot / "train.zip", "w") as z:
        for path in sorted((folder / "train").rglob("*.png")):
            rel = path.relative_to(folder / "train").as_posix()
            z.write(path, rel)
            lines.append(f"{rel}\t{labels.get(rel, rel[6])}")
    (zroot / "train_map.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=expected) as error:
        pack(zroot, tmp_path / "out", PackOptions(shard_size=5), progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
