"""Image transforms: timm's ImageNet train recipe and the eval resize/crop, from whole config sections.

Two pipelines: by default the transforms end in a normalised float (3, H, W) image (ToTensor, Normalize and
random erasing run in the data workers). With `uint8=True` they stop at a uint8 (3, S, S) tensor (timm's
`use_prefetcher` pipeline): a quarter of the bytes to pin and copy, and less worker CPU; conversion,
normalisation and random erasing then run on the device (`swin_train.data.prefetch.DeviceTransform`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation, ResizeKeepRatio
from torchvision import transforms as tv_transforms

from swin_train.config import AugConfig, Config, DataConfig
from swin_train.data.augment_draws import AugmentDraws, UnsupportedOnDevice
from swin_train.data.augment_spec import is_disabled
from swin_train.data.decode import (
    CoverSize,
    FastCompose,
    FastRandomResizedCrop,
    FastResizeCenterCrop,
    PILToUint8,
)
from swin_train.data.device_decode import EvalDecodeDraws, TrainDecodeDraws
from swin_train.errors import CheckpointError
from swin_train.models.swin import config_size, image_size


@dataclass(frozen=True)
class Preprocess:
    """What a user of a trained model needs to feed it images; stored in every checkpoint and export."""

    img_size: int | list[int]  # as data.img_size: one side (square) or [height, width]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: Config) -> Preprocess:
        d = cfg.data
        return cls(config_size(d.img_size), cfg.eval.crop_pct, d.interpolation, tuple(d.mean), tuple(d.std))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: object, where: str = "the checkpoint") -> Preprocess:
        """Read a stored `to_dict()`; CheckpointError when it is damaged."""
        keys = tuple(cls.__dataclass_fields__)
        if not isinstance(d, Mapping) or not set(keys) <= d.keys():
            raise CheckpointError(
                f"{where}: 'preprocess' must hold {', '.join(keys)}; the checkpoint is damaged"
            )
        try:
            pre = cls(
                config_size(d["img_size"]),
                float(d["crop_pct"]),
                str(d["interpolation"]),
                tuple(float(x) for x in d["mean"]),
                tuple(float(x) for x in d["std"]),
            )
            build_eval_transform(pre)  # rejects an impossible crop or interpolation
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{where}: invalid preprocessing {dict(d)} ({e})") from None
        return pre


def build_train_transform(
    data: DataConfig, aug: AugConfig, *, uint8: bool = False, on_device: bool = False
) -> Callable:
    """timm's ImageNet train transform (random-resized crop, flip, RandAugment or colour jitter,
    normalise, random erasing); the config defaults are the official Swin recipe. As in timm and the
    official code, colour jitter is ignored when RandAugment/AutoAugment is on. PIL image -> (3, H, W), the crop
    resized to data.img_size (H x W when it is [H, W]).

    `uint8=True`: stop before ToTensor, as timm's `use_prefetcher`: no normalisation and no random erasing
    (the device does both). The random draws before that point are the same, so the images are those of
    the float pipeline.

    `data.fast_decode`: the same chain with its crop taking undecoded files (decode.FastRandomResizedCrop).

    `on_device` (with `uint8`): the chain stops after the crop and hands over `Augmented` samples: the
    pixels and the flip and RandAugment draws of timm's own objects (augment_draws.AugmentDraws), which the
    device applies (device_augment.py); UnsupportedOnDevice when the chain has a step the device does not
    apply. With `data.decode: cuda` it stops before decoding and hands over `Undecoded` samples: the file,
    the crop box and the same draws (device_decode.py). The chain's `draws` attribute is its AugmentDraws."""
    aa = None if is_disabled(aug.auto_augment) else aug.auto_augment
    transform = create_transform(
        image_size(data.img_size),
        is_training=True,
        scale=tuple(aug.crop_scale),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter if aug.color_jitter > 0 else None,
        auto_augment=aa,
        interpolation=data.interpolation,
        mean=tuple(data.mean),
        std=tuple(data.std),
        re_prob=aug.reprob,
        re_mode=aug.remode,
        re_count=aug.recount,
        use_prefetcher=uint8,
    )
    _fix_posterize(transform)
    if on_device:
        return _device_chain(transform, fast_decode=data.fast_decode, decode=data.decode)
    return _fast_chain(transform) if data.fast_decode else transform


def build_eval_transform(
    pre: Preprocess, *, uint8: bool = False, fast_decode: bool = False, decode: str = "cpu"
) -> Callable:
    """Resize the shorter side to int(img_size / crop_pct), center-crop img_size, normalise.
    crop_pct == 1.0 is a plain resize to img_size x img_size (the official 384 eval: no crop).
    A non-square [H, W] resizes as timm does: keeping the aspect ratio, to the smallest size that covers
    floor(H / crop_pct) x floor(W / crop_pct), then center-crops H x W.
    `uint8=True`: (3, S, S) uint8 without normalisation (done on the device). `fast_decode`: the resize
    and crop take undecoded files (decode.FastResizeCenterCrop); with `decode="cuda"` (and `uint8`) the
    device decodes, resizes and crops (device_decode.EvalDecodeDraws)."""
    if not 0.0 < pre.crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {pre.crop_pct}")
    # timm: floor(img_size / crop_pct) == int(...) for positive sizes; 'squash' resizes both edges.
    transform = create_transform(
        image_size(pre.img_size),
        is_training=False,
        crop_pct=pre.crop_pct,
        crop_mode="squash" if pre.crop_pct == 1.0 else "center",
        interpolation=pre.interpolation,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        use_prefetcher=uint8,
    )
    if decode == "cuda" and uint8:
        resize, crop = transform.transforms[:2]
        return FastCompose([EvalDecodeDraws(_resize_size(resize), crop.size, interpolation_name(resize))])
    return _fast_chain(transform) if fast_decode else transform


def _fast_chain(transform: Callable) -> FastCompose:
    """timm's chain with its first steps swapped for ones that decode only what they need: the
    random-resized crop (its own settings and random draws) or the eval resize + center crop; and the
    uint8 hand-over without the extra copy. Every other step is timm's own object."""
    steps = list(transform.transforms)
    first = steps[0]
    if isinstance(first, RandomResizedCropAndInterpolation):
        steps[0] = FastRandomResizedCrop(first)
    elif isinstance(first, tv_transforms.Resize | ResizeKeepRatio) and isinstance(
        steps[1], tv_transforms.CenterCrop
    ):
        uint8 = isinstance(steps[2], MaybePILToTensor)  # the next step takes the tensor as it is
        resize, interpolation = _resize_size(first), interpolation_name(first)
        steps[:2] = [FastResizeCenterCrop(resize, steps[1].size, interpolation, as_tensor=uint8)]
    else:
        raise ValueError(f"fast_decode: no fast first step for {first!r}")
    return FastCompose([PILToUint8() if isinstance(s, MaybePILToTensor) else s for s in steps])


def _resize_size(resize: tv_transforms.Resize | ResizeKeepRatio) -> int | Sequence[int] | CoverSize:
    """The size argument of FastResizeCenterCrop for timm's eval resize: torchvision's (the shorter side, or
    the exact size), or for a non-square target timm's ResizeKeepRatio (the size to cover)."""
    if isinstance(resize, ResizeKeepRatio):
        if resize.longest != 0.0 or resize.random_scale_prob or resize.random_aspect_prob:
            raise ValueError(f"fast_decode: no fast resize for {resize!r}")
        return CoverSize(*resize.size)
    return resize.size


def interpolation_name(resize: tv_transforms.Resize | ResizeKeepRatio) -> str:
    return resize.interpolation.value


def _device_chain(transform: Callable, *, fast_decode: bool, decode: str) -> Callable:
    """timm's uint8 train chain up to its crop, then AugmentDraws for its flip and RandAugment/AutoAugment
    (timm's objects: their settings and draws); any other step raises UnsupportedOnDevice. `decode`
    "cuda": one step that draws the crop box too (device_decode.TrainDecodeDraws)."""
    crop, *rest = transform.transforms
    flip = augment = None
    for step in rest:
        if isinstance(step, tv_transforms.RandomHorizontalFlip) and flip is None and augment is None:
            flip = step
        elif isinstance(step, RandAugment | AutoAugment) and augment is None:
            augment = step
        elif not isinstance(step, MaybePILToTensor):
            raise UnsupportedOnDevice(f"the device does not apply {type(step).__name__}")
    draws = AugmentDraws(flip, augment)
    if decode == "cuda":
        chain = FastCompose([TrainDecodeDraws(FastRandomResizedCrop(crop), draws)])
    elif fast_decode:
        chain = FastCompose([FastRandomResizedCrop(crop, as_tensor=True), draws])
    else:
        chain = tv_transforms.Compose([crop, draws])
    chain.draws = draws
    return chain


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, valid for 0 bits: Pillow >= 12 raises on bits=0 (older Pillow returned black,
    which is what the official recipe trained with)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every channel masked to 0
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Callable) -> None:
    """Route the posterize ops of timm's RandAugment/AutoAugment/AugMix in `transform` to `_posterize`.

    `rand-m9-mstd0.5-inc1` sometimes samples magnitude 10 (clamped), which maps to 0 bits for
    PosterizeIncreasing: with current Pillow that is a ValueError that kills a worker mid-epoch.
    Patched per op instance, nothing global.
    """
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))
        for sub_policy in getattr(t, "policy", []):
            ops += list(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = _posterize
