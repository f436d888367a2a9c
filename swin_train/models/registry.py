"""Named Swin variants (V1 and V2): one entry per official model name, holding its architecture only (it
loads no files).

Training hyper-parameters (drop path, lr, ...) belong to recipes in `configs/`, not here.
"""

from __future__ import annotations

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

# name -> architecture fields accepted by SwinTransformer(...); `version` says which Swin it is
VARIANTS: dict[str, dict] = {}
for _size, _arch in (("tiny", _TINY), ("small", _SMALL), ("base", _BASE), ("large", _LARGE)):
    VARIANTS[f"swin_{_size}_patch4_window7_224"] = dict(
        img_size=224, patch_size=4, window_size=7, version=1, **_arch
    )
    VARIANTS[f"swin_{_size}_patch4_window12_384"] = dict(
        img_size=384, patch_size=4, window_size=12, version=1, **_arch
    )
# Swin V2 (the official configs/swinv2/). The 22k models are pre-trained at 192 px with windows of 12 and
# fine-tuned at 256/w16 or 384/w24, their position bias offsets scaled by the pre-training windows (12 in
# stages 0-2; stage 3 is 6x6 at 192 px, so its window was 6).
for _size, _arch in (("tiny", _TINY), ("small", _SMALL), ("base", _BASE)):
    for _window in (8, 16):
        VARIANTS[f"swinv2_{_size}_patch4_window{_window}_256"] = dict(
            img_size=256, patch_size=4, window_size=_window, version=2, **_arch
        )
for _size, _arch in (("base", _BASE), ("large", _LARGE)):
    VARIANTS[f"swinv2_{_size}_patch4_window12_192_22k"] = dict(
        img_size=192, patch_size=4, window_size=12, version=2, **_arch
    )
    for _window, _img in ((16, 256), (24, 384)):
        VARIANTS[f"swinv2_{_size}_patch4_window12to{_window}_192to{_img}_22kto1k_ft"] = dict(
            img_size=_img,
            patch_size=4,
            window_size=_window,
            version=2,
            pretrained_window_sizes=(12, 12, 12, 6),
            **_arch,
        )


# The architecture of a config that names none (model.name: null): Swin-T, as the official default.
DEFAULT_VARIANT = "swin_tiny_patch4_window7_224"

# Names without a recipe in configs/: the official zoo has no Swin-T/S at 384 (architectures only).
ARCHITECTURE_ONLY = ("swin_small_patch4_window12_384", "swin_tiny_patch4_window12_384")

IMAGENET_22K_CLASSES = 21841  # the head of the official ImageNet-22k weights


def variant_names() -> list[str]:
    return sorted(VARIANTS)


def default_num_classes(name: str | None) -> int:
    """The head a named variant has when no number of classes is given: a `*_22k` name is its ImageNet-22k
    model (what its weights and README's sizes hold), any other ImageNet-1k's 1000."""
    return IMAGENET_22K_CLASSES if name and name.endswith("_22k") else 1000


def variant_arch(name: str) -> dict:
    """Architecture fields of a named variant (a copy). Raises KeyError with suggestions."""
    if name not in VARIANTS:
        import difflib

        close = difflib.get_close_matches(name, VARIANTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(variant_names())}"
        raise KeyError(f"unknown model '{name[:80]}'{hint}")
    return dict(VARIANTS[name])


def build_model(name: str | None = None, **overrides):
    """A Swin Transformer (random weights) from a variant name and/or explicit architecture fields:
    `build_model("swin_tiny_patch4_window7_224", num_classes=10)` (a name's own head otherwise:
    `default_num_classes`), `build_model(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=32,
    patch_size=2, window_size=4)`. Loading weights is `swin_train.loading`."""
    from swin_train.models.swin import SwinTransformer

    arch = {"num_classes": default_num_classes(name), **variant_arch(name)} if name else {}
    arch.update(overrides)
    return SwinTransformer(**arch)
