"""The data of a run, built from the config's `data`, `aug` and `eval` sections: data sets, samplers,
loaders and (on CUDA) the device half of the input pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from swin_train.config import Config
from swin_train.data.folder import build_datasets, build_eval_dataset, check_root
from swin_train.data.loader import build_loader, usable_workers
from swin_train.data.prefetch import DeviceTransform
from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
from swin_train.data.synthetic import SyntheticDataset
from swin_train.data.transforms import Preprocess, build_eval_transform, build_train_transform
from swin_train.distributed import DistEnv, barrier
from swin_train.errors import DataError


@dataclass
class Data:
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: ResumableTrainSampler
    class_names: list[str]
    num_train: int
    num_val: int
    # the uint8 pipeline's device half (normalise, erase); None: the workers return normalised floats
    device_transform: DeviceTransform | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_data_path(cfg: Config) -> None:
    """Fail before anything is written when the data cannot exist (the shapes set is generated later)."""
    if cfg.data.synthetic or cfg.data.dataset == "shapes":
        return
    if not cfg.data.data_path:
        raise DataError("no data path: pass --data-path DIR (a folder with train/ and val/ ImageFolders)")
    check_root(cfg.data.data_path, ())


def data_root(cfg: Config, env: DistEnv) -> Path:
    """The ImageFolder root; for the built-in shapes set, generated once (on rank 0) into its cache."""
    if cfg.data.dataset == "shapes":
        from swin_train.data.shapes import default_shapes_root, ensure_shapes_dataset

        root = Path(cfg.data.data_path) if cfg.data.data_path else default_shapes_root()
        if env.is_main:
            ensure_shapes_dataset(root, img_size=cfg.data.img_size, seed=0)
        barrier()
        return root
    check_data_path(cfg)
    return Path(cfg.data.data_path)


def device_transform_for(cfg: Config, env: DistEnv, *, train: bool) -> DeviceTransform:
    """Normalisation (and for training, seeded random erasing) on `env.device`."""
    d, a = cfg.data, cfg.aug
    if not train:
        return DeviceTransform(env.device, d.mean, d.std)
    return DeviceTransform(env.device, d.mean, d.std, reprob=a.reprob, remode=a.remode, recount=a.recount,
                           seed=cfg.seed, rank=env.rank)  # fmt: skip


def build_data(cfg: Config, env: DistEnv, *, device_pipeline: bool = False) -> Data:
    """Datasets and loaders. `device_pipeline`: the workers return uint8 images and normalisation and
    random erasing run on `env.device` (`Data.device_transform`); otherwise the workers do all of it."""
    d = cfg.data
    device_transform = None
    if d.synthetic:  # random tensors: measures the loop without decoding
        classes = [f"class_{i}" for i in range(cfg.model.num_classes)]
        train_set = SyntheticDataset(50 * d.batch_size * env.world_size, len(classes), d.img_size, seed=cfg.seed)
        val_set = SyntheticDataset(4 * d.batch_size * env.world_size, len(classes), d.img_size, seed=cfg.seed + 1)
    else:
        train_set, val_set, classes = build_datasets(
            data_root(cfg, env),
            train_transform=build_train_transform(d, cfg.aug, uint8=device_pipeline),
            eval_transform=build_eval_transform(Preprocess.from_config(cfg), uint8=device_pipeline),
            skip_bad_images=d.skip_bad_images,
        )
        if device_pipeline:
            device_transform = device_transform_for(cfg, env, train=True)
    train_sampler = ResumableTrainSampler(len(train_set), num_replicas=env.world_size, rank=env.rank, seed=cfg.seed)
    workers = usable_workers(d.num_workers)
    common = dict(num_workers=workers, pin_memory=d.pin_memory, seed=cfg.seed, rank=env.rank)
    train_loader = build_loader(train_set, batch_size=d.batch_size, sampler=train_sampler, drop_last=True, **common)
    val_sampler = ExactEvalSampler(len(val_set), env.world_size, env.rank)
    val_loader = build_loader(val_set, batch_size=cfg.eval_batch_size, sampler=val_sampler, **common)
    return Data(train_loader, val_loader, train_sampler, list(classes), len(train_set), len(val_set), device_transform)


def build_eval_data(cfg: Config, env: DistEnv, *, device_pipeline: bool = False) -> tuple[DataLoader, list[str]]:
    """The val split alone, for `swin-eval`: an exact (non-padding) loader and the class names."""
    dataset, classes = build_eval_dataset(
        data_root(cfg, env),
        build_eval_transform(Preprocess.from_config(cfg), uint8=device_pipeline),
        skip_bad_images=cfg.data.skip_bad_images,
    )
    loader = build_loader(dataset, batch_size=cfg.eval_batch_size,
                          sampler=ExactEvalSampler(len(dataset), env.world_size, env.rank),
                          num_workers=usable_workers(cfg.data.num_workers), pin_memory=cfg.data.pin_memory)  # fmt: skip
    return loader, classes
