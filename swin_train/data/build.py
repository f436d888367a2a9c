"""The data of a run, built from the config's `data`, `aug` and `eval` sections: data sets, samplers,
loaders and (on CUDA) the device half of the input pipeline."""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from swin_train.config import Config
from swin_train.config_types import shorten
from swin_train.data.augment_draws import UnsupportedOnDevice
from swin_train.data.device_augment import DeviceAugment
from swin_train.data.folder import build_datasets, build_eval_dataset, check_root
from swin_train.data.loader import build_loader, usable_workers
from swin_train.data.prefetch import DeviceTransform
from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
from swin_train.data.shards import ShardTrainDataset
from swin_train.data.synthetic import SyntheticDataset
from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
from swin_train.data.unlabeled import check_unlabeled_root
from swin_train.distributed import DistEnv, barrier
from swin_train.errors import ConfigError, DataError
from swin_train.models.swin import image_size

log = logging.getLogger("swin_train")


@dataclass
class Data:
    train_loader: DataLoader
    val_loader: DataLoader
    # the loop's handle on the order (set_epoch, set_start): a sampler, or the shard dataset itself
    train_sampler: ResumableTrainSampler | ShardTrainDataset
    class_names: list[str]
    num_train: int
    num_val: int
    # the uint8 pipeline's device half (normalise, erase); None: the workers return normalised floats
    device_transform: DeviceTransform | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def warn_if_skip_bad_images_unused(cfg: Config, source: str) -> None:
    """data.skip_bad_images replaces undecodable files of an image folder; shards and HF datasets have no
    such fallback (a replacement would break their exact counts), so say that it does nothing there."""
    if cfg.data.skip_bad_images and source in ("wds", "hf"):
        fix = "repack with `swin-data pack --skip-bad`" if source == "wds" else "filter the dataset"
        log.warning(
            "data.skip_bad_images applies to image folders only: a bad image in %s stops the run; "
            "%s to leave such images out",
            "a shard" if source == "wds" else "a Hugging Face dataset",
            fix,
        )


def data_source(cfg: Config) -> str:
    """What `data.data_path` holds: `data.dataset`, except that an "imagefolder" path holding webdataset
    shards (a folder with an index or .tar files, a brace pattern, a pipe: URL) is "wds" and one holding
    a saved or parquet Hugging Face dataset is "hf"."""
    d = cfg.data
    if d.dataset != "imagefolder" or not d.data_path:
        return d.dataset
    from swin_train.data.hf_dataset import is_hf_source
    from swin_train.data.shards import is_shard_source

    if is_shard_source(d.data_path):
        return "wds"
    if is_hf_source(d.data_path):
        return "hf"
    return "imagefolder"


# what each data.dataset reads, for the message when data.data_path holds another
DATASET_WORDS = {
    "imagefolder": "an ImageFolder root (train/ and val/)",
    "shapes": "the generated shapes set",
    "wds": "webdataset shards",
    "hf": "a Hugging Face dataset",
}


def found_dataset(path: str) -> str | None:
    """The data.dataset value that reads what `path` holds, by its layout; None when it holds nothing known
    (a folder that does not exist yet, a Hub name)."""
    from swin_train.data.hf_dataset import is_hf_source
    from swin_train.data.shapes import is_shapes_set
    from swin_train.data.shards import is_shard_source

    root = Path(path).expanduser()
    if is_shard_source(path):
        return "wds"
    if is_hf_source(path):
        return "hf"
    if is_shapes_set(root):
        return "shapes"
    return "imagefolder" if (root / "train").is_dir() and (root / "val").is_dir() else None


def check_dataset_matches(cfg: Config) -> None:
    """A data.dataset that contradicts what data.data_path holds is named, with the setting that reads it,
    before a check of the wrong format gives advice that points elsewhere (a shapes cache, a shard index)."""
    d = cfg.data
    if d.dataset == "imagefolder" or not d.data_path:  # "imagefolder" reads shards and HF datasets too
        return
    found = found_dataset(d.data_path)
    if found is None or found == d.dataset:
        return
    reads = DATASET_WORDS[d.dataset] + (", cached in data.data_path" if d.dataset == "shapes" else "")
    raise DataError(
        f"data path {d.data_path} holds {DATASET_WORDS[found]}, but data.dataset='{d.dataset}' reads {reads}; "
        "set data.dataset=imagefolder (it reads ImageFolders, shards and Hugging Face datasets by their layout)"
    )


# The config fields that say where data is read from, and those a run also reads (weights, a class map) or
# writes (its output folder): a config read from a file may give them only as plain local paths
DATA_SOURCE_KEYS = ("data.data_path", "data.val_path", "data.shard_info")
STORED_PATH_KEYS = (*DATA_SOURCE_KEYS, "model.pretrained", "model.head_map", "output")
_OPTIONS = {"data.data_path": "--data-path", "output": "--output"}
# What makes a string a URL that webdataset's gopen opens with a program (pipe:, http: -> curl, gs:, ...);
# urllib strips leading spaces and control characters before reading the scheme
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_STRIPPED = "".join(map(chr, range(33)))


def command_or_url(value: str) -> str | None:
    """The part of a data source that is a command or URL (`pipe:...`, `https://...`), also after webdataset's
    brace expansion and `::` joining (shards.expand_urls); None for plain local paths."""
    try:
        from braceexpand import braceexpand  # webdataset's; without it no shard is read at all
    except ImportError:
        braceexpand = lambda part: [part]
    for part in value.split("::"):
        for url in braceexpand(part):  # lazily: a stored pattern may expand to very many names
            if _SCHEME.match(url.lstrip(_STRIPPED)):
                return url
    return None


def typed_keys(overrides) -> set[str]:
    """The dotted keys that command-line overrides set (a whole section counts as each of its keys)."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    return keys | {k for k in STORED_PATH_KEYS if k.split(".")[0] in keys}


def check_stored_paths(cfg: Config, where: str, typed: set[str], keys=STORED_PATH_KEYS) -> None:
    """The paths of a config read from a file (a checkpoint's or an export's config, a run folder's
    config.yaml) are used only as plain local paths: a `pipe:` command or URL there would run a program or open
    a stream the user never typed, so it is a DataError unless this command line gives that key (`typed`).
    The log says which of `keys` came from the file."""
    for key in keys:
        value = functools.reduce(getattr, key.split("."), cfg)
        if value is None or key in typed:
            continue
        found = command_or_url(value)
        option = _OPTIONS.get(key, f"{key}=...")
        if found is not None:
            raise DataError(
                f"{key} in {where} is {shorten(repr(found), 60)}, a command or URL, which swin-train runs only "
                f"when typed on the command line; pass {option} to use it"
            )
        log.info("%s %s: from %s (pass %s to change it)", key, value, where, option)


def check_data_path(cfg: Config) -> None:
    """Fail before anything is written when the data cannot exist (the shapes set is generated later)."""
    if cfg.data.synthetic:
        return
    check_dataset_matches(cfg)
    if cfg.data.dataset == "shapes":
        return
    if not cfg.data.data_path:
        folders = (
            "a folder of images at any depth"
            if cfg.task == "simmim"
            else "a folder with train/ and val/ ImageFolders"
        )
        raise DataError(
            f"no data path: pass --data-path DIR ({folders}, webdataset shards or a Hugging Face dataset)"
        )
    source = data_source(cfg)
    if source == "wds":
        shard_splits(cfg)
    elif source == "hf":
        if not Path(cfg.data.data_path).expanduser().exists():
            raise DataError(f"data path {cfg.data.data_path} does not exist")
    elif cfg.task == "simmim":  # images without classes: a folder of them does
        check_unlabeled_root(cfg.data.data_path)
    else:
        check_root(cfg.data.data_path, ())


def check_output_outside_data(cfg: Config) -> None:
    """ConfigError when the output folder is a data folder or inside one: the run's files would be read as data
    by the next start (a class folder named after the run, checkpoints beside the shards)."""
    out = Path(cfg.output).expanduser().resolve()
    folders = [cfg.data.data_path, cfg.data.val_path]
    if cfg.data.dataset == "shapes" and not cfg.data.data_path:
        from swin_train.data.shapes import default_shapes_root

        folders[0] = str(default_shapes_root())
    for folder in folders:
        if not folder or command_or_url(folder) is not None or not Path(folder).expanduser().is_dir():
            continue
        root = Path(folder).expanduser().resolve()
        if out == root or root in out.parents:
            where = "is the data folder" if out == root else f"is inside the data folder {folder}"
            raise ConfigError(
                f"output {cfg.output} {where}: the next start would read the run's files as data; "
                "choose an --output outside it"
            )


def warn_if_val_is_train(
    train: list[str], val: list[str], *, unit: str = "images", by_folder: bool = True
) -> None:
    """Validation on training data measures memory, not accuracy: say so when val files resolve to train files
    (a linked val/ or class folder, the same shards or split). `by_folder`: compare the folders, which for an
    image folder is enough (a folder that resolves to a train folder holds the same files) and costs one
    realpath per folder, not per image."""
    key = os.path.dirname if by_folder else str
    real = functools.lru_cache(maxsize=None)(os.path.realpath)
    train_keys = {real(k) for k in {key(f) for f in train}}
    shared = sum(real(key(f)) in train_keys for f in val)
    if shared:
        log.warning(
            "%d of %d val %s are train %s (the same files): validation will measure the training data; "
            "give validation data of its own",
            shared,
            len(val),
            unit,
            unit,
        )


def shard_splits(cfg: Config, *, train: bool = True):
    """(train split or None, val split) of a shard source: a folder's index names both; a brace pattern
    or pipe: URL is the train split and `data.val_path` the val split."""
    from swin_train.data.shards import resolve_split

    d = cfg.data
    is_folder = not d.data_path.startswith("pipe:") and Path(d.data_path).expanduser().is_dir()
    if is_folder:
        val = resolve_split(d.val_path or d.data_path, d.val_split, info_path=d.shard_info)
        return (resolve_split(d.data_path, d.train_split, info_path=d.shard_info) if train else None), val
    if not d.val_path:
        raise DataError(
            f"data path {d.data_path} names one split's shards; set data.val_path to the val shards "
            "(a brace pattern or pipe: URL) or point data.data_path at the folder with the _info.json"
        )
    val = resolve_split(d.val_path, d.val_split, info_path=d.shard_info)
    return (resolve_split(d.data_path, d.train_split, info_path=d.shard_info) if train else None), val


def shard_class_names(cfg: Config, names: tuple[str, ...] | None) -> list[str]:
    """The index's class names; without them (timm's Hub index has none), model.num_classes numbered classes."""
    if names:
        return list(names)
    log.info(
        "the shard index names no classes: using model.num_classes=%d numbered classes", cfg.model.num_classes
    )
    return [str(i) for i in range(cfg.model.num_classes)]


def data_root(cfg: Config, env: DistEnv) -> Path:
    """The ImageFolder root; for the built-in shapes set, generated once (on rank 0) into its cache."""
    if cfg.data.dataset == "shapes":
        from swin_train.data.shapes import default_shapes_root, ensure_shapes_dataset

        root = Path(cfg.data.data_path) if cfg.data.data_path else default_shapes_root()
        if env.is_main:
            # drawn square, at the larger side: the crops resize them to data.img_size
            ensure_shapes_dataset(root, img_size=max(image_size(cfg.data.img_size)), seed=0)
        barrier()
        return root
    check_data_path(cfg)
    return Path(cfg.data.data_path)


def device_transform_for(
    cfg: Config, env: DistEnv, *, train: bool, augment: DeviceAugment | None = None
) -> DeviceTransform:
    """Normalisation (and for training, seeded random erasing and `augment`) on `env.device`."""
    d, a = cfg.data, cfg.aug
    if not train:
        return DeviceTransform(env.device, d.mean, d.std)
    return DeviceTransform(
        env.device,
        d.mean,
        d.std,
        reprob=a.reprob,
        remode=a.remode,
        recount=a.recount,
        seed=cfg.seed,
        rank=env.rank,
        augment=augment,
    )


def train_transform_for(cfg: Config, device: torch.device, *, device_pipeline: bool):
    """(the workers' train transform, the device's augment or None). `aug.on_device` (auto: on a GPU) with
    the uint8 `device_pipeline`: the workers stop after the crop and the device flips and augments; a
    recipe the device cannot apply is a ConfigError for `true` (and data.decode=cuda) and stays in the
    workers for `auto`. data.decode=cuda: the workers stop before decoding (device_decode.py)."""
    d, a = cfg.data, cfg.aug
    decode = decode_for(cfg, device, device_pipeline=device_pipeline)
    if decode == "cuda" and device.type != "cuda":
        log.info("data.decode=cuda on the %s device: the main process decodes the JPEGs", device.type)
    if decode == "cuda" and d.skip_bad_images:
        log.warning(
            "data.skip_bad_images with data.decode=cuda: files whose header does not read are skipped, but a "
            "JPEG whose data fails on the device stops the run (set data.decode=cpu to skip those too)"
        )
    wanted = decode == "cuda" or (device.type == "cuda" if a.on_device == "auto" else a.on_device)
    if device_pipeline and wanted and not d.synthetic:
        try:
            transform = build_train_transform(replace(d, decode=decode), a, uint8=True, on_device=True)
            return transform, DeviceAugment(transform.draws.fill)
        except UnsupportedOnDevice as e:
            if decode == "cuda":
                raise ConfigError(f"data.decode=cuda: {e}; set data.decode=cpu") from None
            if a.on_device is True:
                raise ConfigError(
                    f"aug.on_device=true: {e}; set aug.on_device=false to augment in the data workers"
                ) from None
            log.info("flip and augmentation in the data workers (aug.on_device=auto: %s)", e)
    return build_train_transform(d, a, uint8=device_pipeline), None


def decode_for(cfg: Config, device: torch.device, *, device_pipeline: bool) -> str:
    """Where JPEGs are decoded: data.decode, except "cpu" when the workers normalise (no device half)."""
    return cfg.data.decode if device_pipeline and not cfg.data.synthetic else "cpu"


def eval_transform_for(cfg: Config, device: torch.device, *, device_pipeline: bool):
    """The workers' eval transform (the device decodes with data.decode=cuda)."""
    decode = decode_for(cfg, device, device_pipeline=device_pipeline)
    try:
        return build_eval_transform(
            Preprocess.from_config(cfg),
            uint8=device_pipeline,
            fast_decode=cfg.data.fast_decode,
            decode=decode,
        )
    except UnsupportedOnDevice as e:
        raise ConfigError(f"data.decode=cuda: {e}; set data.decode=cpu") from None


def build_data(cfg: Config, env: DistEnv, *, device_pipeline: bool = False) -> Data:
    """Datasets and loaders. `device_pipeline`: the workers return uint8 images and normalisation and
    random erasing (and with aug.on_device flips and RandAugment) run on `env.device`
    (`Data.device_transform`); otherwise the workers do all of it."""
    d = cfg.data
    train_transform, augment = train_transform_for(cfg, env.device, device_pipeline=device_pipeline)
    eval_transform = eval_transform_for(cfg, env.device, device_pipeline=device_pipeline)
    # the device decodes every epoch (data.decode=cuda): the workers keep no decoded images
    on_device = decode_for(cfg, env.device, device_pipeline=device_pipeline) == "cuda"
    cache_mib = 0 if on_device else d.decoded_cache_mib
    device_transform = (
        device_transform_for(cfg, env, train=True, augment=augment)
        if device_pipeline and not d.synthetic
        else None
    )
    source = "synthetic" if d.synthetic else data_source(cfg)
    warn_if_skip_bad_images_unused(cfg, source)
    if source == "wds":
        return build_shard_data(cfg, env, train_transform, eval_transform, device_transform)
    if source == "synthetic":  # random tensors: measures the loop without decoding
        classes = [f"class_{i}" for i in range(cfg.model.num_classes)]
        train_set = SyntheticDataset(
            50 * d.batch_size * env.world_size, len(classes), d.img_size, seed=cfg.seed
        )
        val_set = SyntheticDataset(
            4 * d.batch_size * env.world_size, len(classes), d.img_size, seed=cfg.seed + 1
        )
    elif source == "hf":
        from swin_train.data.hf_dataset import build_hf_split

        columns = dict(image_column=d.image_column, label_column=d.label_column)
        train_set = build_hf_split(d.data_path, d.train_split, train_transform, **columns)
        val_set = build_hf_split(d.data_path, d.val_split, eval_transform, **columns)
        classes = train_set.classes
        warn_if_val_is_train([d.train_split], [d.val_split], unit="splits", by_folder=False)
    else:
        train_set, val_set, classes = build_datasets(
            data_root(cfg, env),
            train_transform=train_transform,
            eval_transform=eval_transform,
            skip_bad_images=d.skip_bad_images,
            cache_bytes=cache_mib << 20,
        )
        warn_if_val_is_train([f for f, _ in train_set.samples], [f for f, _ in val_set.samples])
    train_sampler = ResumableTrainSampler(
        len(train_set), num_replicas=env.world_size, rank=env.rank, seed=cfg.seed
    )
    workers = usable_workers(d.num_workers)
    common = dict(num_workers=workers, pin_memory=d.pin_memory, seed=cfg.seed, rank=env.rank)
    train_loader = build_loader(
        train_set, batch_size=d.batch_size, sampler=train_sampler, drop_last=True, **common
    )
    val_sampler = ExactEvalSampler(len(val_set), env.world_size, env.rank)
    val_loader = build_loader(val_set, batch_size=cfg.eval_batch_size, sampler=val_sampler, **common)
    return Data(
        train_loader, val_loader, train_sampler, list(classes), len(train_set), len(val_set), device_transform
    )


def build_shard_data(cfg: Config, env: DistEnv, train_transform, eval_transform, device_transform) -> Data:
    """Train and val loaders over webdataset shards (see shards.py for the order and what is exact)."""
    from swin_train.data.shards import ShardEvalDataset, build_shard_loader

    d = cfg.data
    train_split, val_split = shard_splits(cfg)
    classes = shard_class_names(cfg, train_split.class_names)
    # the model's classes bound both splits' labels
    train_split, val_split = (replace(s, class_names=tuple(classes)) for s in (train_split, val_split))
    urls = lambda split: [shard.url for shard in split.shards]
    warn_if_val_is_train(urls(train_split), urls(val_split), unit="shards", by_folder=False)
    workers = usable_workers(d.num_workers)
    # every process reads at least one shard per worker: fewer workers when the shards are few
    train_workers = min(workers, max(1, len(train_split.shards) // env.world_size))
    if train_workers < workers:
        log.info(
            "train split: %d shards for %d processes: %d loader workers per process instead of %d",
            len(train_split.shards),
            env.world_size,
            train_workers,
            workers,
        )
    train_set = ShardTrainDataset(
        train_split,
        train_transform,
        batch_size=d.batch_size,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=train_workers,
        shuffle_buffer=d.shuffle_buffer,
    )
    if train_set.dropped_per_epoch:
        log.info(
            "train shards: %d of %d samples sit out each epoch (a different few each epoch), so that every "
            "one of %d processes x %d workers reads %d samples",
            train_set.dropped_per_epoch,
            train_split.num_samples,
            env.world_size,
            max(1, train_workers),
            train_set.samples_per_stream,
        )
    val_set = ShardEvalDataset(
        val_split, eval_transform, rank=env.rank, world_size=env.world_size, num_workers=workers
    )
    common = dict(pin_memory=d.pin_memory, seed=cfg.seed, rank=env.rank)
    train_loader = build_shard_loader(
        train_set, batch_size=d.batch_size, num_workers=train_workers, drop_last=True, **common
    )
    val_loader = build_shard_loader(
        val_set, batch_size=cfg.eval_batch_size, num_workers=workers, drop_last=False, **common
    )
    return Data(
        train_loader,
        val_loader,
        train_set,
        classes,
        train_split.num_samples,
        val_split.num_samples,
        device_transform,
    )


def build_eval_data(
    cfg: Config, env: DistEnv, *, device_pipeline: bool = False
) -> tuple[DataLoader, list[str]]:
    """The val split alone, for `swin-eval`: an exact (non-padding) loader and the class names."""
    d = cfg.data
    transform = eval_transform_for(cfg, env.device, device_pipeline=device_pipeline)
    workers = usable_workers(d.num_workers)
    source = data_source(cfg)
    warn_if_skip_bad_images_unused(cfg, source)
    if source == "wds":
        from swin_train.data.shards import ShardEvalDataset, build_shard_loader

        _, split = shard_splits(cfg, train=False)
        split = replace(split, class_names=tuple(shard_class_names(cfg, split.class_names)))
        dataset = ShardEvalDataset(
            split, transform, rank=env.rank, world_size=env.world_size, num_workers=workers
        )
        loader = build_shard_loader(
            dataset,
            batch_size=cfg.eval_batch_size,
            num_workers=workers,
            pin_memory=d.pin_memory,
            drop_last=False,
        )
        return loader, list(split.class_names)
    if source == "hf":
        from swin_train.data.hf_dataset import build_hf_split

        dataset = build_hf_split(
            d.data_path, d.val_split, transform, image_column=d.image_column, label_column=d.label_column
        )
        classes = dataset.classes
    else:
        dataset, classes = build_eval_dataset(
            data_root(cfg, env), transform, skip_bad_images=d.skip_bad_images
        )
    loader = build_loader(
        dataset,
        batch_size=cfg.eval_batch_size,
        sampler=ExactEvalSampler(len(dataset), env.world_size, env.rank),
        num_workers=workers,
        pin_memory=d.pin_memory,
    )
    return loader, classes
