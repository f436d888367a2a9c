"""`swin-data pack SRC OUT`: webdataset shards from an ImageFolder root (`train/`, `val/`) or the official
Swin repo's zip layout (`train.zip` + `train_map.txt`, `val.zip` + `val_map.txt`, lines `path<TAB>label`).

The output is the Hub's layout (`NAME-train-0000.tar`, `NAME-validation-0000.tar`, `{key}.jpg` +
`{key}.cls` + `{key}.json`, `_info.json` with per-shard counts and the class names). Image bytes are
copied as they are unless `max_size` asks for a resize. Everything is a function of the source and
the options (train samples permuted by `seed`, shard i = source samples [i x size, (i+1) x size), tar
headers without times or owners), and every shard is written atomically: a pack killed midway and run
again skips the finished shards and ends with byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from swin_train.data.folder import DECODE_ERRORS, decode_error_reason, scan_image_folder
from swin_train.data.shards import require_webdataset
from swin_train.errors import DataError

log = logging.getLogger("swin_train")

SPLITS = {"train": "train", "val": "validation"}  # source split -> split name in the shards (the Hub's)
PLAN_NAME = "_pack.json"


@dataclass(frozen=True)
class Item:
    """One source image: a file, or a member of a zip (`archive` set)."""

    path: str
    label: int
    archive: str | None = None


@dataclass(frozen=True)
class PackOptions:
    shard_size: int = 1000
    max_size: int | None = None
    skip_bad: bool = False
    seed: int = 0
    name: str = "data"


# ------------------------------------------------------------------------------------------ sources
def read_map(map_file: Path) -> list[tuple[str, int]]:
    """(path, label) lines of an official `*_map.txt` (`path<TAB>label`)."""
    entries = []
    for number, line in enumerate(map_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit("\t", 1)
        label = parts[1].strip() if len(parts) == 2 else ""
        if not label.lstrip("-").isdigit():
            raise DataError(f"{map_file}:{number}: expected 'path<TAB>label', got {line[:80]!r}")
        if int(label) < 0:
            raise DataError(
                f"{map_file}:{number}: label {label} is negative; labels number the classes from 0"
            )
        entries.append((parts[0].strip().lstrip("/"), int(label)))
    if not entries:
        raise DataError(f"{map_file} lists no images")
    return entries


def zip_split(root: Path, split: str) -> tuple[list[str], list[Item]]:
    """Class names and items of `split.zip` + `split_map.txt`. Class names are the first folder of the
    paths where each label has one (the official layout `n01440764/x.JPEG`), else the label numbers."""
    archive, map_file = root / f"{split}.zip", root / f"{split}_map.txt"
    if not map_file.is_file():
        raise DataError(f"{archive} has no {map_file.name} beside it; the zip layout needs both")
    entries = read_map(map_file)
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    missing = [p for p, _ in entries if p not in names]
    if missing:
        raise DataError(f"{map_file} lists {len(missing)} path(s) not in {archive}, e.g. {missing[0]}")
    labels = {label for _, label in entries}
    num_classes = max(labels) + 1
    if len(labels) < num_classes:  # the first missing label is at most len(labels): a short search
        missing = next(i for i in range(num_classes) if i not in labels)
        raise DataError(
            f"{map_file} has no image of label {missing} but labels up to {num_classes - 1}; labels number the "
            "classes 0..N-1 and every class needs images"
        )
    folders: dict[int, set[str]] = {}
    for path, label in entries:
        folders.setdefault(label, set()).add(path.split("/", 1)[0] if "/" in path else "")
    if all(len(folders.get(i, ())) == 1 and "" not in folders[i] for i in range(num_classes)):
        classes = [next(iter(folders[i])) for i in range(num_classes)]
    else:
        classes = [str(i) for i in range(num_classes)]
    return classes, [Item(path, label, str(archive)) for path, label in entries]


def scan_source(src: str | os.PathLike) -> dict[str, tuple[list[str], list[Item]]]:
    """{source split: (class names, items)} of an ImageFolder root or a zip layout; train and val share classes."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder; pack reads a folder with train/ and val/ or train.zip + train_map.txt"
        )
    found = {}
    for split in SPLITS:
        if (root / split).is_dir():
            classes, samples = scan_image_folder(root / split)
            found[split] = (classes, [Item(path, label) for path, label in samples])
        elif (root / f"{split}.zip").is_file():
            found[split] = zip_split(root, split)
    if "train" not in found:
        raise DataError(f"{root} has neither train/ nor train.zip + train_map.txt")
    if "val" in found and found["val"][0] != found["train"][0]:
        raise DataError(
            f"the classes of train and val differ under {root}; both splits need the same classes"
        )
    return found


# --------------------------------------------------------------------------------------- one shard
@lru_cache(maxsize=4)
def _zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)  # one open per archive and process


def read_bytes(item: Item) -> bytes:
    if item.archive is None:
        with open(item.path, "rb") as f:
            return f.read()
    return _zip(item.archive).read(item.path)


def extension(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def checked_image(data: bytes, ext: str, max_size: int | None) -> tuple[bytes, str]:
    """The bytes to store (as they are, or resized so the longer side is at most `max_size`), after a full
    decode: a shard never holds an image training cannot read. Raises one of DECODE_ERRORS."""
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB")  # decodes every pixel: truncated files fail here
        if max_size is None or max(im.size) <= max_size:
            return data, ext
        scale = max_size / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        fmt = im.format or "PNG"
        small = im.convert("RGB") if fmt == "JPEG" else im
        small = small.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    small.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue(), ext


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"  # no dot: webdataset splits the key from the extension at the first dot


def tar_bytes(samples: Sequence[dict]) -> bytes:
    """A tar of the samples through webdataset's TarWriter, with fixed times and owners (reproducible)."""
    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, user="", group="", mtime=0, encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardTask:
    path: str
    split: str  # the split's name in the shards
    first: int  # source index of items[0] in the split's (permuted) order
    items: tuple[Item, ...]
    class_names: tuple[str, ...]
    source_root: str
    options: PackOptions


def write_shard(task: ShardTask) -> tuple[str, int, list[str]]:
    """Write one shard atomically; returns (file name, samples written, bad images skipped)."""
    from swin_train.checkpoint import write_atomically

    samples, bad = [], []
    for offset, item in enumerate(task.items):
        where = item.path if item.archive is None else f"{item.archive}:{item.path}"
        try:
            data, ext = checked_image(read_bytes(item), extension(item.path), task.options.max_size)
        except (*DECODE_ERRORS, KeyError) as e:
            reason = decode_error_reason(e) if not isinstance(e, KeyError) else "missing from the archive"
            if not task.options.skip_bad:
                raise DataError(
                    f"cannot decode image {where} ({reason}); fix or delete it, or pass --skip-bad"
                ) from None
            bad.append(f"{where}: {reason}")
            continue
        rel = os.path.relpath(item.path, task.source_root) if item.archive is None else item.path
        meta = {"path": rel, "label": item.label, "class": task.class_names[item.label]}
        samples.append(
            {
                "__key__": sample_key(task.split, task.first + offset),
                ext: data,
                "cls": str(item.label).encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
    payload = tar_bytes(samples)
    write_atomically(Path(task.path), lambda tmp: tmp.write_bytes(payload), what="shard ")
    return Path(task.path).name, len(samples), bad


def shard_contents(path: Path) -> list[str]:
    """The sample keys of a finished shard (its tar headers; no image is decoded)."""
    keys = []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


# ------------------------------------------------------------------------------------------- a pack
def plan_tasks(src: Path, out: Path, found: dict, options: PackOptions) -> dict[str, list[ShardTask]]:
    """Every shard of every split, as a pure function of the source and the options."""
    tasks: dict[str, list[ShardTask]] = {}
    for source_split, (classes, items) in found.items():
        split = SPLITS[source_split]
        if source_split == "train":  # shards are read in order with a bounded buffer: mix the classes now
            items = [items[i] for i in np.random.default_rng(options.seed).permutation(len(items))]
        count = -(-len(items) // options.shard_size)
        width = max(4, len(str(count - 1)))
        tasks[split] = [
            ShardTask(
                str(out / f"{options.name}-{split}-{i:0{width}d}.tar"),
                split,
                i * options.shard_size,
                tuple(items[i * options.shard_size : (i + 1) * options.shard_size]),
                tuple(classes),
                str(src),
                options,
            )
            for i in range(count)
        ]
    return tasks


def shard_fingerprint(task: ShardTask) -> str:
    """What a shard's bytes are a function of: its images (paths, labels, order), class names, split, first
    key and --max-size. Not --skip-bad: a shard written without it holds every image, as with it."""
    items = [[item.path, item.label, item.archive] for item in task.items]
    what = [task.split, task.first, items, list(task.class_names), task.source_root, task.options.max_size]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def settle_plan(out: Path, src: Path, tasks: dict[str, list[ShardTask]], options: PackOptions) -> None:
    """Keep in `out` only the finished shards this pack can reuse, then write its plan (PLAN_NAME): each
    shard's fingerprint and whether it was written with --skip-bad. Written before any shard, so every shard
    on disk is one the plan describes.

    A re-run continues an unfinished pack of the same source whatever else changed (what a failed pack
    advises: --skip-bad, or an image fixed or deleted): a shard is reused when its fingerprint is unchanged
    and, without --skip-bad, it left no image out; any other is deleted and written again. Refused: another
    source's pack, a shard file no plan here describes, and any change to a finished pack (`_info.json`)."""
    from swin_train.checkpoint import write_atomically

    path, planned = out / PLAN_NAME, {Path(t.path).name: t for ts in tasks.values() for t in ts}
    old = json.loads(path.read_text()) if path.is_file() else {"source": str(src), "shards": {}}
    if not isinstance(old.get("shards"), dict):
        raise DataError(
            f"{out} holds a pack of an earlier swin-train ({PLAN_NAME} lists no shards); use an empty folder"
        )
    if old.get("source") != str(src):
        raise DataError(f"{out} holds a pack of another source, {old.get('source')}; use an empty folder")
    described = old["shards"]
    strange = [name for name in planned if (out / name).exists() and name not in described]
    if strange:
        raise DataError(f"{out} holds {strange[0]}, which no pack here wrote; use an empty folder")
    shards, stale = {}, []
    for name, task in planned.items():
        entry, fingerprint = described.get(name), shard_fingerprint(task)
        reusable = entry is not None and entry["fingerprint"] == fingerprint and (out / name).is_file()
        if reusable and entry["skip_bad"] and not options.skip_bad:  # kept only if it left nothing out
            reusable = len(shard_contents(out / name)) == len(task.items)
        if not reusable and (out / name).is_file():
            stale.append(out / name)
        # whether the shard on disk may lack images: written now, or reused (checked above without it)
        skip_bad = entry["skip_bad"] and options.skip_bad if reusable else options.skip_bad
        shards[name] = {"fingerprint": fingerprint, "skip_bad": skip_bad}
    stale += [out / name for name in described if name not in planned and (out / name).is_file()]
    if stale and (out / "_info.json").is_file():
        raise DataError(
            f"{out} holds a finished pack of another source or other options ({PLAN_NAME} differs); "
            "use an empty folder or the same command"
        )
    for file in stale:
        file.unlink()
    plan = {"source": str(src), "shards": shards}
    text = json.dumps(plan, indent=1, sort_keys=True) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text), what="pack plan ")


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: PackOptions = PackOptions(),
    *,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Pack `src` into shards under `out` (see the module doc); returns the `_info.json` written."""
    from tqdm import tqdm

    from swin_train.checkpoint import remove_stale_temp_files

    if options.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {options.shard_size}")
    if options.seed < 0:
        raise DataError(f"--seed must be >= 0, got {options.seed}")
    if options.max_size is not None and options.max_size < 1:
        raise DataError(f"--max-size must be >= 1, got {options.max_size}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", options.name):
        raise DataError(
            f"--name must be letters, digits or _ (it becomes NAME-SPLIT-NNNN.tar), got {options.name!r}"
        )
    require_webdataset()  # before anything is written
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser()
    found = scan_source(src)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out} ({e.strerror})") from None
    for path in remove_stale_temp_files(out):
        log.info("removed %s, left by a pack that was killed", path.name)
    tasks = plan_tasks(src, out, found, options)
    settle_plan(out, src, tasks, options)
    todo = [t for split_tasks in tasks.values() for t in split_tasks if not Path(t.path).is_file()]
    done = sum(len(t) for t in tasks.values()) - len(todo)
    if done:
        log.info("%s: %d of %d shards already written; packing the rest", out, done, done + len(todo))
    bar = tqdm(total=done + len(todo), initial=done, unit="shard", disable=not progress, desc="pack")
    try:
        if workers <= 1:
            for task in todo:
                write_shard(task)
                bar.update(1)
        else:
            import multiprocessing

            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(write_shard, todo):
                    bar.update(1)
    finally:
        bar.close()
    return write_pack_info(out, tasks, found)


def write_pack_info(out: Path, tasks: dict[str, list[ShardTask]], found: dict) -> Path:
    """`_info.json` from the finished shards: counts from their headers, and every skipped image named."""
    from swin_train.checkpoint import write_atomically

    splits, skipped = {}, []
    for split, split_tasks in tasks.items():
        lengths = []
        for task in split_tasks:
            keys = set(shard_contents(Path(task.path)))
            lengths.append(len(keys))
            for offset, item in enumerate(task.items):
                if sample_key(split, task.first + offset) not in keys:
                    skipped.append(item.path if item.archive is None else f"{item.archive}:{item.path}")
        splits[split] = {
            "name": split,
            "num_samples": sum(lengths),
            "shard_lengths": lengths,
            "filenames": [Path(t.path).name for t in split_tasks],
        }
    classes = found["train"][0]
    info = {
        "splits": splits,
        "classes": list(classes),
        "num_classes": len(classes),
        "skipped_images": skipped,
    }
    for path in skipped:
        log.warning("skipped undecodable image %s", path)
    path = out / "_info.json"
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(info, indent=1) + "\n"), what="shard index ")
    counts = ", ".join(
        f"{s['num_samples']} {name} samples in {len(s['filenames'])} shards" for name, s in splits.items()
    )
    log.info("packed %s: %s%s", out, counts, f"; {len(skipped)} bad images skipped" if skipped else "")
    return path
