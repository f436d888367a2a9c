"""Webdataset shards (`{key}.jpg` + `{key}.cls` in .tar files): the shard index, which shards each
(rank, worker) reads, the order of every epoch, and the train/eval datasets.

Sources: a folder with `_info.json`/`_info.yaml` (timm's `imagenet-1k-wds` layout and what
`swin-data pack` writes), a brace pattern (`imagenet1k-train-{0000..1023}.tar`) or `pipe:COMMAND`
URLs. The `webdataset` package opens shards (`gopen`: files, `pipe:`) and groups tar members into samples;
the members are read by `tar_stream.py` (faster than `tarfile`, which webdataset uses). What webdataset
does not guarantee is written here: its `split_by_node`/`split_by_worker` and `shuffle` give neither
exact evaluation (every sample once) nor a mid-epoch resume, because the order depends on how far
each worker got, not on the position in the epoch. Here the order is a pure function:

- evaluation: shard i goes to stream i mod (processes x workers), read whole and in order;
- training: the shards of epoch e are permuted by (seed, e) and dealt to (rank, worker) streams; each
  stream shuffles its samples with a buffer whose draws depend only on (seed, epoch, rank, worker),
  so the sample at each position (and which raw samples sit in the buffer there) is known without
  reading the data: a resume skips tar members without decoding them;
- every stream yields the same number of samples, the fewest any stream can get in any epoch
  (`samples_per_stream`); each rank therefore takes the same number of optimizer steps every epoch,
  and the few samples beyond that bound (shards left over when the shard count is not a multiple of
  the stream count, short shards, partial batches) sit out that epoch, a different few each epoch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from swin_train.data.decode import Encoded, UndecodableImage, open_encoded, rgb_image, takes_encoded
from swin_train.data.folder import DECODE_ERRORS, decode_error_reason
from swin_train.data.labels import shard_label
from swin_train.data.loader import SignalSafeLoader, worker_options
from swin_train.data.seeding import derive_seed, transform_sample
from swin_train.data.tar_stream import iter_tar_files
from swin_train.errors import DataError

log = logging.getLogger("swin_train")

INFO_NAMES = ("_info.json", "_info.yaml", "_info.yml")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
LABEL_EXTENSION = "cls"
DEFAULT_SHUFFLE_BUFFER = 2000

# First elements of the seed keys: keep shard orders, buffer draws and augmentations apart.
_ORDER_KEY, _BUFFER_KEY, _AUGMENT_KEY = 0x5348524F, 0x53485242, 0x53485241


# ---------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class Shard:
    url: str  # a local path or a `pipe:` URL, as webdataset's gopen opens it
    name: str  # its file name: the key of its count in the index
    num_samples: int


@dataclass(frozen=True)
class ShardSplit:
    """The shards of one split, in index order, with their sample counts and (when the index has them)
    the class names."""

    name: str
    shards: tuple[Shard, ...]
    class_names: tuple[str, ...] | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s.num_samples for s in self.shards]


def is_shard_source(path: str) -> bool:
    """Whether `path` names shards rather than an ImageFolder: a `pipe:` URL, a brace pattern, a .tar,
    or a folder that holds an index or .tar files."""
    if path.startswith("pipe:") or ("{" in path and ".." in path) or path.endswith(".tar"):
        return True
    folder = Path(path).expanduser()
    return folder.is_dir() and (
        any((folder / name).is_file() for name in INFO_NAMES) or any(folder.glob("*.tar"))
    )


def shard_name(url: str) -> str:
    """The file name of a shard URL: `pipe:aws s3 cp s3://b/x-0001.tar -` -> `x-0001.tar`."""
    if url.startswith("pipe:"):
        tars = [tok for tok in url[5:].split() if ".tar" in tok]
        if tars:
            url = tars[-1]
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def expand_urls(pattern: str) -> list[str]:
    """`a-{0000..0002}.tar` -> three URLs (webdataset's brace expansion); several patterns may be joined
    by `::`, as webdataset accepts."""
    import braceexpand

    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def load_info(path: str | os.PathLike) -> dict:
    """The index file (`_info.json` or YAML): `{"splits": {name: {"filenames": [...], "shard_lengths":
    [...]}}}` as timm writes it, optionally `"classes": [...]` (swin-data pack writes them)."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".json":
            info = json.loads(text)
        else:
            import yaml

            info = yaml.safe_load(text)
    except FileNotFoundError:
        raise DataError(
            f"shard index {path} does not exist; set data.shard_info to the _info.json of the shards"
        ) from None
    except (OSError, ValueError, Exception) as e:  # yaml.YAMLError, json.JSONDecodeError, unreadable file
        raise DataError(
            f"cannot read shard index {path} ({' '.join(str(e).split())}); fix or re-create it"
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), dict):
        raise DataError(f"shard index {path} has no 'splits' mapping; expected timm's _info.json layout")
    for name, entry in info["splits"].items():
        files, lengths = entry.get("filenames"), entry.get("shard_lengths")
        if not isinstance(files, list) or not isinstance(lengths, list) or len(files) != len(lengths):
            raise DataError(
                f"shard index {path}: split '{name}' needs equally long 'filenames' and 'shard_lengths' lists"
            )
    return info


def find_info(folder: Path) -> Path:
    for name in INFO_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"no shard index (_info.json or _info.yaml) in {folder}: exact evaluation and resume need each shard's "
        f"sample count; create it with `swin-data index {folder}` (or pack with `swin-data pack`)"
    )


def class_names_from(info: dict) -> tuple[str, ...] | None:
    if isinstance(info.get("classes"), list):
        return tuple(str(c) for c in info["classes"])
    if isinstance(info.get("num_classes"), int):
        return tuple(str(i) for i in range(info["num_classes"]))
    return None


def require_webdataset() -> None:
    """Import the webdataset parts we use in this process, so that loader workers forked from it do not
    import them again every epoch; or say how to install the package."""
    try:
        import webdataset.gopen  # noqa: F401
        import webdataset.tariterators  # noqa: F401
    except ImportError:
        raise DataError(
            "webdataset shards need the `webdataset` package: pip install 'swin-train[wds]'"
        ) from None


def resolve_split(source: str, split: str, *, info_path: str | None = None) -> ShardSplit:
    """The shards of `split`: from a folder's index (its `split` entry), or the shards a pattern / `pipe:`
    URL expands to, counted by file name in the index (`info_path`, or the `_info` beside local shards)."""
    require_webdataset()
    folder = Path(source).expanduser()
    is_pattern = source.startswith("pipe:") or not folder.is_dir()
    if not is_pattern:
        info_file = Path(info_path) if info_path else find_info(folder)
        info = load_info(info_file)
        if split not in info["splits"]:
            raise DataError(
                f"shard index {info_file} has no split '{split}' (it has: {', '.join(info['splits'])}); "
                "set data.train_split / data.val_split"
            )
        entry = info["splits"][split]
        shards = []
        for name, count in zip(entry["filenames"], entry["shard_lengths"]):
            path = folder / name
            if not path.is_file():
                raise DataError(
                    f"shard {path} is listed in {info_file} but missing; re-download or re-pack it"
                )
            shards.append(Shard(str(path), Path(name).name, int(count)))
        return ShardSplit(split, tuple(shards), class_names_from(info))
    urls = expand_urls(source)
    if info_path:
        info_file = Path(info_path).expanduser()
    elif source.startswith("pipe:"):
        raise DataError(
            f"{source}: a pipe: source needs data.shard_info, the path of a local _info.json with the shard counts"
        )
    else:
        info_file = find_info(Path(urls[0]).expanduser().parent)
    info = load_info(info_file)
    counts = {
        Path(name).name: int(n)
        for entry in info["splits"].values()
        for name, n in zip(entry["filenames"], entry["shard_lengths"])
    }
    shards = []
    for url in urls:
        name = shard_name(url)
        if name not in counts:
            raise DataError(
                f"shard {name} ({url}) is not in the shard index {info_file}; re-create the index"
            )
        if not url.startswith("pipe:") and not Path(url).expanduser().is_file():
            raise DataError(f"shard {url} does not exist; check data.data_path / data.val_path")
        shards.append(Shard(url, name, counts[name]))
    return ShardSplit(split, tuple(shards), class_names_from(info))


# ------------------------------------------------------------------------------------ the exact order
def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of a training epoch: a permutation that depends only on (seed, epoch)."""
    rng = np.random.default_rng(derive_seed(_ORDER_KEY, seed, epoch)[1])
    return rng.permutation(num_shards).tolist()


def stream_shards(order: Sequence[int], stream: int, num_streams: int) -> list[int]:
    """The shards stream `stream` (= rank x workers + worker) reads, in order: every num_streams-th."""
    return list(order[stream::num_streams])


def samples_per_stream(counts: Sequence[int], num_streams: int, batch_size: int) -> int:
    """Samples every training stream yields per epoch: the fewest any stream holds under any shard order
    (its floor(S / streams) shards being the smallest ones), down to whole batches."""
    per_stream = len(counts) // num_streams
    fewest = sum(sorted(counts)[:per_stream])
    return fewest // batch_size * batch_size


def buffer_shuffle_order(
    num_samples: int, buffer_size: int, key: Sequence[int], limit: int | None = None
) -> np.ndarray:
    """Which input position a shuffle buffer of `buffer_size` emits at each output position: fill the
    buffer, then repeatedly emit a random slot and refill it with the next input. The draws come from
    `key` alone, never from the data, so the buffer at any position is known without reading."""
    limit = num_samples if limit is None else min(limit, num_samples)
    rng = np.random.default_rng(derive_seed(*key)[1])
    draws = rng.random(num_samples)
    buffer = list(range(min(max(1, buffer_size), num_samples)))  # a buffer of 1 (or 0) keeps the input order
    next_input = len(buffer)
    out = np.empty(limit, dtype=np.int64)
    for position in range(limit):
        slot = int(draws[position] * len(buffer))
        out[position] = buffer[slot]
        if next_input < num_samples:
            buffer[slot] = next_input
            next_input += 1
        else:
            buffer[slot] = buffer[-1]
            buffer.pop()
    return out


def batches_before(batch_index: int, worker: int, num_workers: int) -> int:
    """How many of the first `batch_index` batches of a rank came from `worker`: a DataLoader takes
    batches from its workers in turn, and every worker here has the same number of batches."""
    return max(0, (batch_index - worker + num_workers - 1) // num_workers)


# ------------------------------------------------------------------------------------------- reading
def _shard_error(shard: Shard, e: BaseException) -> DataError:
    reason = " ".join(str(e.args[0] if e.args else e).split())
    if shard.url.startswith("pipe:"):
        return DataError(f"the command of {shard.url} failed ({reason}); run it by hand to see why")
    return DataError(
        f"cannot read shard {shard.url} ({reason}): it is truncated or damaged; re-download or re-pack it"
    )


def tar_samples(stream, url: str) -> Iterator[dict]:
    """webdataset's samples (files grouped by key) of a tar stream, read by our tar reader (tar_stream.py
    says why it is ours)."""
    from webdataset.tariterators import group_by_keys

    return group_by_keys(
        {"fname": name, "data": data, "__url__": url} for name, data in iter_tar_files(stream)
    )


def read_shard(shard: Shard, *, stop_after: int | None = None) -> Iterator[dict]:
    """The samples of a shard as webdataset dicts (`__key__`, extensions -> raw bytes), in tar order,
    checked against the index count. `stop_after`: stop (and close the stream) after that many samples."""
    from webdataset.gopen import gopen

    wanted = shard.num_samples if stop_after is None else min(stop_after, shard.num_samples)
    count = 0
    try:
        stream = gopen(shard.url, "rb")
    except (OSError, ValueError) as e:
        raise _shard_error(shard, e) from None
    finished = False
    try:
        if wanted > 0:
            for sample in tar_samples(stream, shard.url):
                count += 1
                if count > shard.num_samples:
                    raise DataError(
                        f"shard {shard.url} has more samples than the {shard.num_samples} its index says; "
                        "re-create the index"
                    )
                yield sample
                if stop_after is not None and count >= wanted:
                    break
        if count < wanted:
            # a failed command ends its output early: its exit status, read on close, says so
            if shard.url.startswith("pipe:"):
                stream.close()
            raise DataError(
                f"shard {shard.url} ended after {count} samples but its index says {shard.num_samples}: "
                "the shard is truncated or the index is stale; re-download or re-pack it"
            )
        finished = True
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise _shard_error(shard, e) from None
    finally:
        try:
            stream.close()
        except (OSError, ValueError) as e:
            # A pipe closed early dies of SIGPIPE: only a pipe read to its end must have exited 0.
            if finished and (stop_after is None or count >= shard.num_samples):
                raise _shard_error(shard, e) from None


def _undecodable(where: str, e: BaseException) -> DataError:
    reason = decode_error_reason(e)
    return DataError(f"cannot decode image {where} ({reason}); re-pack with `swin-data pack --skip-bad`")


def decode_sample(
    sample: dict, shard: Shard, *, encoded: bool = False, classes: tuple[str, ...] | None = None
) -> tuple[Image.Image | Encoded, int]:
    """(RGB image, label) from a webdataset sample's raw bytes; `encoded`: the image undecoded (Encoded)."""
    where = f"{sample.get('__key__')} in shard {shard.url}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None or LABEL_EXTENSION not in sample:
        found = ", ".join(k for k in sample if not k.startswith("__"))
        raise DataError(f"sample {where} has no image (.jpg/.png/...) or no .cls label (it has: {found})")
    label = shard_label(sample[LABEL_EXTENSION], f"sample {where}", classes)
    try:
        if encoded:
            return open_encoded(bytes(sample[ext]), where), label
        return rgb_image(Image.open(io.BytesIO(sample[ext]))), label
    except DECODE_ERRORS as e:
        raise _undecodable(where, e) from None


@lru_cache(maxsize=64)  # the shards a shuffle buffer draws from at once (more are recomputed: pure)
def shard_sample_seeds(seed: int, epoch: int, shard_index: int, count: int) -> np.ndarray:
    """The augmentation seeds of a shard's `count` members in an epoch: each a function of the sample and
    the epoch, like the folder path's; drawn for the whole shard at once (one seed derivation per shard
    instead of one per image, a measurable share of a worker's CPU for small images)."""
    rng = np.random.default_rng(derive_seed(_AUGMENT_KEY, seed, epoch, shard_index)[1])
    return rng.integers(0, 2**62, count, dtype=np.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _transformed(transform: Callable | None, image: Image.Image | Encoded, seed: int | None, sample, shard):
    if transform is None:
        return image
    try:
        return transform_sample(transform, image, seed)
    except UndecodableImage as e:  # an undecoded image's data failed in the transform
        raise _undecodable(f"{sample.get('__key__')} in shard {shard.url}", e.cause) from None


class ShardTrainDataset(IterableDataset):
    """The training split read from shards; also the loop's sampler (`set_epoch`, `set_start`).

    `num_workers` must be the DataLoader's: rank r's worker w reads stream r x max(1, workers) + w.
    Every stream yields `samples_per_stream` samples, so `len()` (per rank) is the same every epoch. The
    loader must not keep its workers between epochs: each epoch's workers get the epoch and start.
    """

    def __init__(
        self,
        split: ShardSplit,
        transform: Callable | None,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ) -> None:
        self.split, self.transform, self.batch_size, self.seed = split, transform, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.streams_per_rank = max(1, num_workers)
        self.num_streams = world_size * self.streams_per_rank
        if len(split.shards) < self.num_streams:
            raise DataError(
                f"split '{split.name}' has {len(split.shards)} shards, fewer than {world_size} processes x "
                f"{self.streams_per_rank} workers; use fewer workers or pack smaller shards (--shard-size)"
            )
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_stream = samples_per_stream(split.counts, self.num_streams, batch_size)
        if self.samples_per_stream == 0:
            raise DataError(
                f"split '{split.name}': a stream of {len(split.shards) // self.num_streams} shard(s) may hold fewer "
                f"than one batch of {batch_size}; lower the batch size or the number of workers"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def set_start(self, batch_index: int, batch_size: int) -> None:
        """Begin the current epoch at batch `batch_index` of this rank (call after set_epoch)."""
        if batch_size != self.batch_size or not 0 <= batch_index <= len(self) // batch_size:
            raise ValueError(f"batch {batch_index} x {batch_size} is outside this rank's {len(self)} samples")
        self.start_batch = batch_index

    def __len__(self) -> int:
        return self.samples_per_stream * self.streams_per_rank

    @property
    def dropped_per_epoch(self) -> int:
        """Samples (all ranks) that sit out each epoch to keep every stream equally long."""
        return self.split.num_samples - self.samples_per_stream * self.num_streams

    def __iter__(self) -> Iterator[tuple[object, int]]:
        loader_worker, workers = _worker()
        if workers != self.streams_per_rank and not (workers == 1 and self.num_workers == 0):
            raise RuntimeError(f"built for {self.num_workers} loader workers, run by {workers}")
        # The loader takes its first batch from worker 0: after k batches, the stream whose turn is next.
        worker = (loader_worker + self.start_batch) % self.streams_per_rank
        stream = self.rank * self.streams_per_rank + worker
        start = batches_before(self.start_batch, worker, self.streams_per_rank) * self.batch_size
        encoded = takes_encoded(self.transform)
        for shard_index, member, sample in self.stream_samples(stream, start):
            shard = self.split.shards[shard_index]
            image, label = decode_sample(sample, shard, encoded=encoded, classes=self.split.class_names)
            seed = int(shard_sample_seeds(self.seed, self.epoch, shard_index, shard.num_samples)[member])
            yield _transformed(self.transform, image, seed, sample, shard), label

    def stream_samples(self, stream: int, start: int = 0) -> Iterator[tuple[int, int, dict]]:
        """(shard index, member index, raw sample) of `stream` in this epoch's order from position `start`;
        shards before the first needed sample are not opened, members not needed are not decoded."""
        shard_ids = stream_shards(
            epoch_shard_order(len(self.split.shards), self.seed, self.epoch), stream, self.num_streams
        )
        counts = [self.split.shards[i].num_samples for i in shard_ids]
        total = sum(counts)
        key = (_BUFFER_KEY, self.seed, self.epoch, stream)
        order = buffer_shuffle_order(total, self.shuffle_buffer, key, limit=self.samples_per_stream)[start:]
        if len(order) == 0:
            return
        needed = set(order.tolist())
        first, last = int(order.min()), int(order.max())
        held: dict[int, tuple[int, int, dict]] = {}  # input position -> sample, until its output position
        position = 0
        offset = 0
        for shard_id, count in zip(shard_ids, counts):
            if offset + count <= first or offset > last:
                offset += count
                continue
            stop = min(count, last - offset + 1)
            for member, sample in enumerate(read_shard(self.split.shards[shard_id], stop_after=stop)):
                if offset + member in needed:
                    held[offset + member] = (shard_id, member, sample)
                while position < len(order) and int(order[position]) in held:
                    yield held.pop(int(order[position]))
                    position += 1
            offset += count
        if position != len(order):
            raise DataError(
                f"split '{self.split.name}': the shards ended before the stream did; re-create the index"
            )


class ShardEvalDataset(IterableDataset):
    """An evaluation split from shards: shard i is read, whole and in order, by stream i mod (processes x
    workers) only, so every sample is evaluated exactly once; counts are summed over ranks."""

    def __init__(
        self,
        split: ShardSplit,
        transform: Callable | None,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        self.split, self.transform = split, transform
        self.rank, self.streams_per_rank = rank, max(1, num_workers)
        self.num_streams = world_size * self.streams_per_rank

    def rank_shards(self) -> list[int]:
        first = self.rank * self.streams_per_rank
        return [
            i
            for w in range(self.streams_per_rank)
            for i in stream_shards(range(len(self.split.shards)), first + w, self.num_streams)
        ]

    def __len__(self) -> int:
        return sum(self.split.shards[i].num_samples for i in self.rank_shards())

    def __iter__(self) -> Iterator[tuple[object, int]]:
        worker, _ = _worker()
        stream = self.rank * self.streams_per_rank + worker
        encoded = takes_encoded(self.transform)
        for shard_id in stream_shards(range(len(self.split.shards)), stream, self.num_streams):
            shard = self.split.shards[shard_id]
            for sample in read_shard(shard):
                image, label = decode_sample(sample, shard, encoded=encoded, classes=self.split.class_names)
                yield _transformed(self.transform, image, None, sample, shard), label


def build_shard_loader(
    dataset: ShardTrainDataset | ShardEvalDataset,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool,
    seed: int = 0,
    rank: int = 0,
) -> SignalSafeLoader:
    """A DataLoader over a shard dataset. Workers are started per epoch (not persistent): each epoch's
    workers receive the dataset as the loop left it (epoch, start batch)."""
    return SignalSafeLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=False,
        **worker_options(num_workers, seed, rank),
    )


def count_samples(url: str) -> int:
    """Samples in one shard, by reading its tar headers and grouping member names (nothing decoded)."""
    from webdataset.gopen import gopen

    shard = Shard(url, shard_name(url), -1)
    try:
        with gopen(url, "rb") as stream:
            return sum(1 for _ in tar_samples(stream, url))
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise _shard_error(shard, e) from None


def write_index(folder: str | os.PathLike, *, classes: Sequence[str] | None = None) -> Path:
    """Count the samples of every `NAME-SPLIT-NNNN.tar` in `folder` and write `_info.json` (timm's layout):
    the one-time index that exact evaluation and resume need for shards that came without one."""
    import re

    require_webdataset()
    from swin_train.checkpoint import write_atomically

    folder = Path(folder).expanduser()
    splits: dict[str, dict] = {}
    for path in sorted(folder.glob("*.tar")):
        match = re.fullmatch(r".*-([A-Za-z0-9]+)-\d+\.tar", path.name)
        if match is None:
            raise DataError(f"{path.name}: cannot tell its split; shards are named NAME-SPLIT-NNNN.tar")
        entry = splits.setdefault(
            match.group(1), {"name": match.group(1), "filenames": [], "shard_lengths": []}
        )
        entry["filenames"].append(path.name)
        entry["shard_lengths"].append(count_samples(str(path)))
    if not splits:
        raise DataError(f"no .tar shards in {folder}")
    for entry in splits.values():
        entry["num_samples"] = sum(entry["shard_lengths"])
    info: dict = {"splits": splits}
    if classes:
        info["classes"] = list(classes)
    path = folder / "_info.json"
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(info, indent=1) + "\n"), what="shard index ")
    return path
