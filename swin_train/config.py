"""Typed configuration: the schema (one dataclass per section, each with its fields and their `check()`),
architecture resolution from `model.name`, and the public API (load_config, dump_config, ...). Reading YAML
is `config_yaml.py`; checking plain data against the annotations is `config_types.py`.

Order of precedence (later wins): dataclass defaults < `_base_` files < the YAML file < CLI shortcuts
(`data_path`, `output`, `batch_size`) < dotted overrides (`train.epochs=10`).

    cfg = load_config("configs/swin_tiny_patch4_window7_224.yaml", ["train.epochs=10"], data_path="/data")
    model = SwinTransformer(**cfg.model_kwargs())

Every user mistake raises a one-line `ConfigError` that names the key and, where known, the file and line
(`configs/x.yaml:12: ...`) or the override it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from swin_train.config_simmim import TASKS, SimMIMConfig
from swin_train.config_types import all_keys as _all_keys
from swin_train.config_types import (
    build_typed,
    coerce,
    field_hints,
    field_type,
    plain_data,
    shorten,
    with_origin,
)
from swin_train.config_yaml import deep_merge, dump_yaml, load_tree, nested, parse_override, record_origin
from swin_train.data.augment_spec import auto_augment_problem
from swin_train.errors import ConfigError
from swin_train.models.arch import ArchitectureError, check_architecture
from swin_train.models.registry import DEFAULT_VARIANT, VARIANTS, variant_arch
from swin_train.models.swin import ATTENTION_BACKENDS, config_size

ARCH_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "version",
    "pretrained_window_sizes",
)
# What an architecture field is when neither the config nor its named variant sets it
_ARCH_DEFAULTS = {"in_chans": 3, "pretrained_window_sizes": None}

AMP_MODES = ("auto", "bf16", "fp16", "none")
AMP_ALIASES = {"fp32": "none", "float32": "none", "off": "none", "bfloat16": "bf16", "float16": "fp16"}
DATASETS = (
    "imagefolder",
    "shapes",
    "wds",
    "hf",
)  # an imagefolder path holding shards or a HF dataset is read as such
BEST_ON = ("raw", "ema")
LR_SCHEDULES = ("cosine", "linear", "step", "multistep")  # train.lr_schedule: the official LR_SCHEDULER.NAME
OPTIMIZERS = ("adamw", "sgd")  # train.optimizer: the official OPTIMIZER.NAME (apex's fused ones aside)
DECODERS = ("cpu", "cuda")  # data.decode: where JPEGs are decoded
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")  # timm's PIL names
MIXUP_MODES = ("batch", "pair", "elem")  # timm.data.Mixup
RE_MODES = ("pixel", "rand", "const")  # timm.data.RandomErasing


# keyword arguments of load_config -> the dotted key they set
CLI_SHORTCUTS = {"data_path": "data.data_path", "output": "output", "batch_size": "data.batch_size"}


class Rules:
    """What a section's `check()` uses to reject a field, pointing at the file line or override that set it."""

    def __init__(self, origins: dict[str, str]):
        self.origins = origins
        self.order = {k: i for i, k in enumerate(origins)}

    def where(self, *keys: str) -> str | None:
        """Origin of the most recently set of `keys` (the likely culprit of a cross-field error)."""
        known = [k for k in keys if k in self.origins]
        return self.origins[max(known, key=self.order.__getitem__)] if known else None

    def fail(self, keys: str | tuple[str, ...], msg: str) -> typing.NoReturn:
        raise ConfigError(with_origin(self.where(*([keys] if isinstance(keys, str) else keys)), msg))

    def require(self, key: str, value: Any, ok: typing.Callable[[Any], bool], requirement: str) -> None:
        if not ok(value):  # also catches NaN
            self.fail(key, f"{key} must be {requirement}, got {shorten(repr(value))}")
        if isinstance(value, float) and math.isinf(value):
            self.fail(key, f"{key} must be a finite number {requirement}, got {value!r}")

    def choice(self, key: str, value: str, choices: tuple[str, ...]) -> None:
        if value in choices:
            return
        close = [AMP_ALIASES[value.lower()]] if key == "amp" and value.lower() in AMP_ALIASES else []
        close = close or difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        options = ", ".join(repr(c) for c in choices)
        self.fail(key, f"{key} must be one of {options}, got {shorten(repr(value))}{hint}")


def _positive(x: float) -> bool:
    return x > 0


def _non_negative(x: float) -> bool:
    return x >= 0


def _at_least_one(x: int) -> bool:
    return x >= 1


def _height_width(x: list[int]) -> bool:
    return len(x) == 2 and all(map(_at_least_one, x))


def _probability(x: float) -> bool:
    return 0 <= x <= 1


def _drop_rate(x: float) -> bool:
    return 0 <= x < 1


@dataclass
class ModelConfig:
    name: str | None = None  # registry variant; fills the architecture fields left None (none: Swin-T)
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    window_size: int | None = None
    # 1: Swin; 2: SwinV2 (res-post-norm, cosine attention, continuous position bias); null: model.name's
    version: int | None = None
    # SwinV2: each stage's window in pre-training (0: its own), which scales its position bias's offsets when
    # fine-tuning at another window; null: model.name's (else 0 per stage); Swin V1 has none
    pretrained_window_sizes: list[int] | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ape: bool = False  # absolute position embedding
    patch_norm: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # stochastic depth, growing linearly to this over the blocks
    num_classes: int = 1000
    grad_checkpointing: bool = False
    # "auto": scaled_dot_product_attention on CUDA, the same math written out on CPU; "flex": FlexAttention
    # (bias and shift mask inside the kernel): training needs a CUDA GPU of compute capability 8.0+,
    # evaluation and prediction elsewhere fall back to "auto"
    attention: str = "auto"
    pretrained: str | None = None  # weights to start from, any supported layout
    # set by the fine-tuning recipes: a run without model.pretrained is refused (it would fine-tune random weights)
    pretrained_required: bool = False
    head_map: str | None = None  # a file of source class indices, one per line (official map22kto1k.txt)

    def check(self, r: Rules) -> None:
        r.require("model.mlp_ratio", self.mlp_ratio, _positive, "> 0")
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            r.require(f"model.{key}", getattr(self, key), _drop_rate, "in [0, 1)")
        r.require("model.num_classes", self.num_classes, _at_least_one, ">= 1")
        r.choice("model.attention", self.attention, ATTENTION_BACKENDS)
        if self.in_chans != 3:  # every reader (folders, shards, HF, predict, decode=cuda) hands over RGB
            r.fail(
                "model.in_chans",
                f"model.in_chans={self.in_chans}: images are read as RGB (grayscale files too); set model.in_chans=3",
            )
        for key in ("pretrained", "head_map"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                r.fail(f"model.{key}", f"model.{key} is empty; use null to leave it unset")


@dataclass
class DataConfig:
    data_path: str | None = None
    # "imagefolder" | "shapes" (the generated quick-start set) | "wds" (webdataset shards) | "hf" (Hugging Face
    # datasets). An "imagefolder" data_path that holds shards or a saved/parquet dataset is read as such.
    dataset: str = "imagefolder"
    synthetic: bool = False  # in-memory random tensors, no decoding (benchmarks)
    # the single source of the image size: one side (square) or [height, width]
    img_size: int | list[int] = 224
    batch_size: int = 128  # per process
    num_workers: int = 8  # per process; at most one per usable CPU is started
    pin_memory: bool = True
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_DEFAULT_STD))
    # an undecodable image (logged) instead of failing: in training replaced by the next one, in evaluation
    # left out of every count (and named)
    skip_bad_images: bool = False
    # an ImageFolder train split whose decoded images fit in this many MiB is decoded once per process and kept
    # in memory, not decoded again every epoch; the val split keeps its transformed images (0: never); each
    # data worker holds its own copy
    decoded_cache_mib: int = 256
    # decode only what the crop needs (the crop drawn on the file's header, reduced-scale JPEG decoding,
    # uint8 tensor resizes; data/decode.py): the same boxes, flips and RandAugment ops, pixels within the
    # bound README states; false: timm's transforms on fully decoded images, bitwise as before
    fast_decode: bool = True
    # "cuda": the training device decodes JPEGs (nvjpeg on a GPU), crops and resizes them, a batch at a time;
    # the workers only read files and draw (data/device_decode.py; no decoded-image cache). Needs fast_decode
    # and aug.on_device
    decode: str = "cpu"
    val_path: str | None = None  # shards of the val split when data_path is a brace pattern or pipe: URL
    shard_info: str | None = None  # the shards' _info.json/_info.yaml when not beside them (pipe: URLs)
    train_split: str = "train"  # split names in a shard index or a Hugging Face dataset (not ImageFolder)
    val_split: str = "validation"
    shuffle_buffer: int = 2000  # samples each shard reader holds to shuffle (0: shard order only)
    image_column: str = "image"  # Hugging Face dataset columns
    label_column: str = "label"

    def check(self, r: Rules) -> None:
        r.choice("data.dataset", self.dataset, DATASETS)
        r.require("data.shuffle_buffer", self.shuffle_buffer, _non_negative, ">= 0")
        named = lambda v: isinstance(v, str) and v.strip() != ""
        for key in ("train_split", "val_split", "image_column", "label_column"):
            r.require(f"data.{key}", getattr(self, key), named, "a non-empty name")
        r.choice("data.interpolation", self.interpolation, INTERPOLATIONS)
        r.choice("data.decode", self.decode, DECODERS)
        if isinstance(self.img_size, int):
            r.require("data.img_size", self.img_size, _at_least_one, ">= 1")
        else:
            r.require("data.img_size", self.img_size, _height_width, "[height, width], two ints >= 1")
        r.require("data.batch_size", self.batch_size, _at_least_one, ">= 1")
        r.require("data.num_workers", self.num_workers, _non_negative, ">= 0")
        r.require("data.decoded_cache_mib", self.decoded_cache_mib, _non_negative, ">= 0 (0: never)")
        if not all(s > 0 for s in self.std):
            r.fail("data.std", f"data.std values must be > 0, got {self.std}")


@dataclass
class TrainConfig:
    epochs: int = 300
    warmup_epochs: int = 20
    base_lr: float = 5e-4  # learning rates are quoted for a global batch of lr_base_batch
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_base_batch: int = 512
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = 5.0  # None: no clipping
    accumulation_steps: int = 1
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (fine-tuning)
    # after the warmup: "cosine" (to min_lr), "linear" (to lr/100), "step", "multistep" (optim.build_schedule)
    lr_schedule: str = "cosine"
    warmup_prefix: bool = True  # cosine: start the cosine after the warmup (false: count it from step 0)
    lr_decay_epochs: int = 30  # step: lr x lr_decay_rate every this many epochs (counted from epoch 0)
    lr_milestones: list[int] = field(default_factory=list)  # multistep: lr x lr_decay_rate at each epoch
    lr_decay_rate: float = 0.1  # step, multistep: the factor of each decay
    optimizer: str = "adamw"  # "adamw" (betas, eps) or "sgd" (momentum, nesterov)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd (the official build_optimizer always uses Nesterov momentum)
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    keep_checkpoints: int = 3  # step checkpoints kept
    max_nonfinite_steps: int = 25  # this many skipped steps in a row stop the run
    compile: bool = False
    # CPU, one process: run each micro-batch as this many parts at once, one thread each (cpu_split.py);
    # 0: auto (one part per intra-op thread, at least 16 images each), 1: off
    cpu_split: int = 0
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    ema_every: int = 1  # update the EMA every this many optimizer steps
    best_on: str = "raw"  # "raw" | "ema": which weights decide best.pth

    def check(self, r: Rules) -> None:
        r.require("train.epochs", self.epochs, _at_least_one, ">= 1")
        r.require("train.warmup_epochs", self.warmup_epochs, _non_negative, ">= 0")
        r.require("train.base_lr", self.base_lr, _positive, "> 0")
        r.require("train.warmup_lr", self.warmup_lr, _non_negative, ">= 0")
        r.require("train.min_lr", self.min_lr, _non_negative, ">= 0")
        r.require("train.lr_base_batch", self.lr_base_batch, _at_least_one, ">= 1")
        r.require("train.weight_decay", self.weight_decay, _non_negative, ">= 0")
        r.require("train.eps", self.eps, _positive, "> 0")
        if self.clip_grad is not None:
            r.require("train.clip_grad", self.clip_grad, _positive, "> 0 (use null to disable clipping)")
        r.require("train.accumulation_steps", self.accumulation_steps, _at_least_one, ">= 1")
        r.require("train.layer_decay", self.layer_decay, lambda x: 0 < x <= 1, "in (0, 1]")
        r.require(
            "train.checkpoint_every_steps",
            self.checkpoint_every_steps,
            _non_negative,
            ">= 0 (0: epoch ends only)",
        )
        r.require("train.keep_checkpoints", self.keep_checkpoints, _at_least_one, ">= 1")
        r.require("train.max_nonfinite_steps", self.max_nonfinite_steps, _at_least_one, ">= 1")
        r.require("train.cpu_split", self.cpu_split, _non_negative, ">= 0 (0: auto, 1: off)")
        r.require("train.ema_decay", self.ema_decay, lambda x: 0 < x < 1, "in (0, 1)")
        r.require("train.ema_every", self.ema_every, _at_least_one, ">= 1")
        r.choice("train.best_on", self.best_on, BEST_ON)
        if self.warmup_epochs >= self.epochs:  # the schedule decays after the warmup: it must end first
            r.fail(
                ("train.warmup_epochs", "train.epochs"),
                f"train.warmup_epochs={self.warmup_epochs} is not less than train.epochs={self.epochs}; "
                f"set train.warmup_epochs to at most {self.epochs - 1}",
            )
        if self.min_lr > self.base_lr:
            r.fail(
                ("train.min_lr", "train.base_lr"),
                f"train.min_lr={self.min_lr} is larger than train.base_lr={self.base_lr}",
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            r.fail("train.betas", f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.best_on == "ema" and not self.ema:
            r.fail(("train.best_on", "train.ema"), "train.best_on='ema' needs train.ema=true")
        self.check_schedule_and_optimizer(r)

    def check_schedule_and_optimizer(self, r: Rules) -> None:
        r.choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        r.require("train.lr_decay_epochs", self.lr_decay_epochs, _at_least_one, ">= 1")
        r.require("train.lr_decay_rate", self.lr_decay_rate, lambda x: 0 < x <= 1, "in (0, 1]")
        steps = self.lr_milestones
        if any(b <= a for a, b in zip(steps, steps[1:])):
            r.fail("train.lr_milestones", f"train.lr_milestones must be increasing epochs, got {steps}")
        if self.lr_schedule == "multistep" and (not steps or steps[0] < self.warmup_epochs):
            r.fail(
                ("train.lr_milestones", "train.lr_schedule", "train.warmup_epochs"),
                f"train.lr_schedule='multistep' needs train.lr_milestones, epochs from the end of the warmup "
                f"(train.warmup_epochs={self.warmup_epochs}) on, got {steps}; e.g. train.lr_milestones=[700]",
            )
        r.choice("train.optimizer", self.optimizer, OPTIMIZERS)
        r.require("train.momentum", self.momentum, lambda x: 0 <= x < 1, "in [0, 1)")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            r.fail(
                ("train.nesterov", "train.momentum"),
                "train.nesterov=true needs train.momentum > 0; set train.momentum or train.nesterov=false",
            )


@dataclass
class AugConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null: none
    color_jitter: float = 0.4  # ignored when auto_augment is set (as timm and the official code do)
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    mixup: float = 0.8  # Beta alpha; 0 disables
    cutmix: float = 1.0  # Beta alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.1
    # flip and RandAugment/AutoAugment applied on the training device to the uint8 batch (the workers draw
    # the same random numbers and stop after the crop; data/device_augment.py): true, false (the workers
    # apply them) or auto (on the device when it is a GPU and it applies the recipe's ops)
    on_device: bool | str = "auto"

    def check(self, r: Rules) -> None:
        r.choice("aug.mixup_mode", self.mixup_mode, MIXUP_MODES)
        if self.on_device not in (True, False, "auto"):
            r.fail("aug.on_device", f"aug.on_device must be true, false or auto, got {self.on_device!r}")
        r.choice("aug.remode", self.remode, RE_MODES)
        r.require("aug.color_jitter", self.color_jitter, _non_negative, ">= 0")
        r.require("aug.reprob", self.reprob, _probability, "in [0, 1]")
        r.require("aug.recount", self.recount, _at_least_one, ">= 1")
        r.require("aug.hflip", self.hflip, _probability, "in [0, 1]")
        r.require("aug.mixup", self.mixup, _non_negative, ">= 0 (a Beta alpha; 0 disables)")
        r.require("aug.cutmix", self.cutmix, _non_negative, ">= 0 (a Beta alpha; 0 disables)")
        r.require("aug.mixup_prob", self.mixup_prob, _probability, "in [0, 1]")
        r.require("aug.mixup_switch_prob", self.mixup_switch_prob, _probability, "in [0, 1]")
        r.require("aug.label_smoothing", self.label_smoothing, _drop_rate, "in [0, 1)")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            r.fail(
                "aug.crop_scale",
                f"aug.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}",
            )
        problem = None if self.auto_augment is None else auto_augment_problem(self.auto_augment)
        if problem:
            r.fail("aug.auto_augment", f"aug.auto_augment={shorten(repr(self.auto_augment))}: {problem}")


@dataclass
class EvalConfig:
    crop_pct: float = 0.875  # resize to img_size / crop_pct, center-crop img_size; 1.0: plain resize
    batch_size: int | None = None  # None: data.batch_size

    def check(self, r: Rules) -> None:
        r.require("eval.crop_pct", self.crop_pct, lambda x: 0 < x <= 1, "in (0, 1]")
        if self.batch_size is not None:
            r.require("eval.batch_size", self.batch_size, _at_least_one, ">= 1 (or null: data.batch_size)")


SECTIONS = ("model", "data", "train", "aug", "eval", "simmim")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    simmim: SimMIMConfig = field(default_factory=SimMIMConfig)  # task: simmim's settings
    task: str = "classification"  # "classification" | "simmim" (masked-image pre-training, no labels)
    amp: str = "auto"  # "auto" (bf16 where supported, resolved at run time) | "bf16" | "fp16" | "none"
    seed: int = 0
    output: str = "output/run"
    save_freq: int = 1  # last.pth every this many epochs (and at the end)
    print_freq: int = 50  # a log line every this many optimizer steps

    def check(self, r: Rules) -> None:
        """Each section's own fields, then what spans sections."""
        for section in SECTIONS:
            getattr(self, section).check(r)
        r.choice("amp", self.amp, AMP_MODES)
        r.choice("task", self.task, TASKS)
        if self.task == "simmim":
            self.simmim.check_task(self, r)
        # torch's generators take seeds below 2**64, and run seeds add the rank, epoch and step to it
        r.require("seed", self.seed, lambda x: 0 <= x < 2**63, "in [0, 2**63)")
        r.require("save_freq", self.save_freq, _at_least_one, ">= 1")
        r.require("print_freq", self.print_freq, _at_least_one, ">= 1")
        if not self.output.strip():
            r.fail("output", "output must be a non-empty directory path")
        m = self.model
        try:
            check_architecture(
                **{f: getattr(m, f) for f in ARCH_FIELDS},
                built_for_version=VARIANTS[m.name]["version"] if m.name in VARIANTS else None,
                name=m.name,
            )
        except ArchitectureError as e:
            r.fail(e.keys, str(e))
        if self.data.decode == "cuda" and not self.data.fast_decode:
            r.fail(("data.decode", "data.fast_decode"), "data.decode=cuda needs data.fast_decode=true")
        if self.data.decode == "cuda" and self.aug.on_device is False:
            r.fail(
                ("data.decode", "aug.on_device"),
                "data.decode=cuda needs aug.on_device true or auto (the workers hand over undecoded files)",
            )
        for key, values in (("data.mean", self.data.mean), ("data.std", self.data.std)):
            if len(values) != m.in_chans:
                r.fail(
                    (key, "model.in_chans"), f"{key} has {len(values)} values but model.in_chans={m.in_chans}"
                )

    @property
    def eval_batch_size(self) -> int:
        return self.eval.batch_size or self.data.batch_size

    def model_kwargs(self) -> dict[str, Any]:
        """Exactly the keyword arguments of `SwinTransformer(...)` (architecture resolved from model.name)."""
        m = self.model
        kwargs = {
            f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in _NOT_MODEL_KWARGS
        }
        return {"img_size": config_size(self.data.img_size), **kwargs, **_resolved_arch(m)}


# ModelConfig fields that are not SwinTransformer arguments (they say where weights come from)
_NOT_MODEL_KWARGS = ("name", "pretrained", "pretrained_required", "head_map")


# --------------------------------------------------------------------------------------------------
# Public API


def load_config(
    path: str | os.PathLike | None,
    overrides: typing.Iterable[str] = (),
    *,
    base: dict | None = None,
    **cli: Any,
) -> Config:
    """Load a YAML recipe (None: `base`, a plain config dict such as a checkpoint's, or the defaults), apply
    CLI shortcuts, then dotted overrides; validate."""
    if path is None:
        data, origins = copy.deepcopy(base or {}), {}
    else:
        data, origins = load_tree(os.fspath(path), ())
    for name, value in cli.items():
        if name not in CLI_SHORTCUTS:
            raise TypeError(f"load_config() got an unexpected keyword argument '{name}'")
        if value is not None:
            key = CLI_SHORTCUTS[name]
            deep_merge(data, nested(key, value))
            record_origin(origins, key, value, f"command line {name}={shorten(repr(value))}")
    for item in overrides:
        key, value = parse_override(item, functools.partial(field_type, Config))
        deep_merge(data, nested(key, value))
        record_origin(origins, key, value, f"override '{shorten(item)}'")
    return _from_dict(data, origins)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from plain data (e.g. stored in a checkpoint); missing keys take defaults."""
    return _from_dict(copy.deepcopy(d), {})


def config_to_dict(cfg: Config) -> dict:
    """Plain Python types only (str/int/float/bool/None/list/dict), in field order."""
    return plain_data(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    """YAML text that `load_config` reads back to an equal Config."""
    return dump_yaml(config_to_dict(cfg))


def all_keys() -> list[str]:
    """Every dotted key the schema knows, sections included (e.g. 'train', 'train.epochs')."""
    return _all_keys(Config)


def check_config(cfg: Config) -> Config:
    """Fill None architecture fields from model.name (or Swin-T), then check every field; returns cfg."""
    _fill_architecture(cfg)
    _validate(cfg, {})
    return cfg


def _from_dict(data: Any, origins: dict[str, str]) -> Config:
    cfg = build_typed(Config, data, origins)
    _fill_architecture(cfg, origins)
    _validate(cfg, origins)
    return cfg


# --------------------------------------------------------------------------------------------------
# Architecture resolution and validation


def _resolved_arch(m: ModelConfig, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """Architecture fields with None taken from the named variant (or the default); does not mutate `m`."""
    try:
        src = {**_ARCH_DEFAULTS, **variant_arch(m.name or DEFAULT_VARIANT)}
    except KeyError as e:
        raise ConfigError(
            with_origin((origins or {}).get("model.name"), f"model.name: {e.args[0]}")
        ) from None
    out = {}
    for f in ARCH_FIELDS:
        v = getattr(m, f)
        out[f] = (list(src[f]) if isinstance(src[f], (list, tuple)) else src[f]) if v is None else v
    return out


def _fill_architecture(cfg: Config, origins: dict[str, str] | None = None) -> None:
    for f, v in _resolved_arch(cfg.model, origins).items():
        setattr(cfg.model, f, v)


def _validate(cfg: Config, origins: dict[str, str]) -> None:
    """Type checks (a Config built in Python may hold anything), then every section's own check()."""
    r = Rules(origins)
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f, tp in field_hints(type(sub)).items():
            setattr(sub, f, coerce(getattr(sub, f), tp, f"{section}.{f}", r.where(f"{section}.{f}")))
    for f, tp in field_hints(Config).items():
        if not dataclasses.is_dataclass(tp):
            setattr(cfg, f, coerce(getattr(cfg, f), tp, f, r.where(f)))
    cfg.check(r)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every key whose value differs between two `config_to_dict` results."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {shorten(repr(a), 40)} -> {shorten(repr(b), 40)}")
    return out


__all__ = [
    "AugConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "all_keys",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "check_config",
    "config_diff",
    "load_config",
]
