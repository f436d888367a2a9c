"""The data of a SimMIM pre-training run (task: simmim): every source a classification run reads, and a flat
folder of images without classes; labels, where a source has them, are dropped.

Each train sample is (image, mask) from the official SimMIM transform under the sample's seed (data/simmim.py);
each val sample the eval preprocessing with a mask fixed by the image (FixedMaskTransform). The loaders hand
over (images, masks) batches (`masked_batch`), normalised on the device as classification's are (no erasing).
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path

from swin_train.config import AugConfig, Config
from swin_train.data.build import (
    Data,
    build_shard_data,
    data_root,
    data_source,
    eval_transform_for,
    warn_if_skip_bad_images_unused,
    warn_if_val_is_train,
)
from swin_train.data.loader import build_loader, usable_workers
from swin_train.data.prefetch import DeviceTransform
from swin_train.data.samplers import ExactEvalSampler, ResumableTrainSampler
from swin_train.data.simmim import FixedMaskTransform, MaskGenerator, build_simmim_transform, masked_batch
from swin_train.data.unlabeled import scan_unlabeled_folder, unlabeled_image_folder
from swin_train.distributed import DistEnv

log = logging.getLogger("swin_train")

# A flat folder without data.val_path validates on this many of its own images, spread over the folder
FLAT_FOLDER_VAL_IMAGES = 256


def build_pretraining_data(cfg: Config, env: DistEnv, *, device_pipeline: bool = False) -> Data:
    """Train and val loaders of (images, masks) for SimMIM pre-training, with no classes. Sources: an image
    folder root with train/ and val/ (class folders or not: each split read at any depth), a flat folder of
    images (val: a fixed spread of its own images), either with data.val_path for validation, webdataset
    shards, a Hugging Face dataset, the shapes set. `device_pipeline`: see build_data."""
    d, s = cfg.data, cfg.simmim
    train_transform = build_simmim_transform(
        d,
        model_patch_size=cfg.model.patch_size,
        mask_patch_size=s.mask_patch_size,
        mask_ratio=s.mask_ratio,
        uint8=device_pipeline,
    )
    masks = MaskGenerator(d.img_size, s.mask_patch_size, cfg.model.patch_size, s.mask_ratio)
    eval_transform = FixedMaskTransform(
        eval_transform_for(cfg, env.device, device_pipeline=device_pipeline), masks
    )
    device_transform = DeviceTransform(env.device, d.mean, d.std) if device_pipeline else None
    warn_if_aug_set(cfg)
    source = data_source(cfg)
    warn_if_skip_bad_images_unused(cfg, source)
    if source == "wds":
        data = build_shard_data(cfg, env, train_transform, eval_transform, device_transform)
        for loader in (data.train_loader, data.val_loader):
            loader.collate_fn = masked_batch  # before any iterator: every epoch's workers collate so
        return replace(data, class_names=[])
    if source == "hf":
        from swin_train.data.hf_dataset import build_hf_split

        columns = dict(image_column=d.image_column, label_column=d.label_column)
        train_set = build_hf_split(d.data_path, d.train_split, train_transform, **columns)
        val_set = build_hf_split(d.data_path, d.val_split, eval_transform, **columns)
        warn_if_val_is_train([d.train_split], [d.val_split], unit="splits", by_folder=False)
    else:
        train_set, val_set = folder_sets(cfg, env, train_transform, eval_transform)
    train_sampler = ResumableTrainSampler(
        len(train_set), num_replicas=env.world_size, rank=env.rank, seed=cfg.seed
    )
    common = dict(
        num_workers=usable_workers(d.num_workers), pin_memory=d.pin_memory, seed=cfg.seed, rank=env.rank
    )
    train_loader = build_loader(
        train_set, batch_size=d.batch_size, sampler=train_sampler, drop_last=True, **common
    )
    val_sampler = ExactEvalSampler(len(val_set), env.world_size, env.rank)
    val_loader = build_loader(val_set, batch_size=cfg.eval_batch_size, sampler=val_sampler, **common)
    for loader in (train_loader, val_loader):
        loader.collate_fn = masked_batch
    return Data(train_loader, val_loader, train_sampler, [], len(train_set), len(val_set), device_transform)


def warn_if_aug_set(cfg: Config) -> None:
    """aug.* is classification's: a pre-training run that sets it is told that its transform is fixed."""
    default = AugConfig()
    ignored = [
        f"aug.{f.name}={getattr(cfg.aug, f.name)}"
        for f in fields(AugConfig)
        if getattr(cfg.aug, f.name) != getattr(default, f.name)
    ]
    if ignored:
        log.warning(
            "%s ignored: task simmim uses the official SimMIM transform (random-resized crop of 67-100%%, flip), "
            "whatever aug.* says",
            ", ".join(ignored),
        )


def folder_sets(cfg: Config, env: DistEnv, train_transform, eval_transform):
    """(train, val) image sets of a folder source: root/train when root has train/ and val/, else the folder
    itself; validation on data.val_path (a folder of images) when set, else root/val, else a fixed spread of
    the folder's own images."""
    d = cfg.data
    root = data_root(cfg, env)
    common = dict(skip_bad_images=d.skip_bad_images)
    cache = d.decoded_cache_mib << 20
    split = (root / "train").is_dir() and (root / "val").is_dir()
    paths = scan_unlabeled_folder(root / "train" if split else root)
    train = unlabeled_image_folder(
        root / "train" if split else root, train_transform, cache_bytes=cache, paths=paths, **common
    )
    if d.val_path or split:  # the val folder given wins over root/val
        val_root, setting = (Path(d.val_path), "data.val_path") if d.val_path else (root / "val", "data path")
        val = unlabeled_image_folder(val_root, eval_transform, evaluation=True, setting=setting, **common)
        warn_if_val_is_train(paths, [f for f, _ in val.samples])
        return train, val
    val_paths = paths[:: max(1, len(paths) // FLAT_FOLDER_VAL_IMAGES)][:FLAT_FOLDER_VAL_IMAGES]
    log.info(
        "%s has no train/ and val/ and data.val_path is not set: validating on %d of its own images, spread "
        "over the folder, which the training also sees",
        root,
        len(val_paths),
    )
    return train, unlabeled_image_folder(root, eval_transform, evaluation=True, paths=val_paths, **common)
