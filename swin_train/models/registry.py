"""Named Swin variants: one entry per official model name, holding its architecture only.

Training hyper-parameters (drop path, lr, ...) belong to recipes in `configs/`, not here.
"""

from __future__ import annotations

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))

# name -> architecture fields accepted by SwinTransformer(...)
VARIANTS: dict[str, dict] = {}
for _size, _arch in (("tiny", _TINY), ("small", _SMALL), ("base", _BASE), ("large", _LARGE)):
    VARIANTS[f"swin_{_size}_patch4_window7_224"] = dict(img_size=224, patch_size=4, window_size=7, **_arch)
    VARIANTS[f"swin_{_size}_patch4_window12_384"] = dict(img_size=384, patch_size=4, window_size=12, **_arch)


# The architecture of a config that names none (model.name: null): Swin-T, as the official default.
DEFAULT_VARIANT = "swin_tiny_patch4_window7_224"


def variant_names() -> list[str]:
    return sorted(VARIANTS)


def variant_arch(name: str) -> dict:
    """Architecture fields of a named variant (a copy). Raises KeyError with suggestions."""
    if name not in VARIANTS:
        import difflib

        close = difflib.get_close_matches(name, VARIANTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(variant_names())}"
        raise KeyError(f"unknown model '{name[:80]}'{hint}")
    return dict(VARIANTS[name])


def create_model(name: str | None = None, *, checkpoint: str | None = None, **overrides):
    """Build a Swin Transformer from a variant name and/or explicit architecture fields, or load a trained one.

    `create_model("swin_tiny_patch4_window7_224", num_classes=10, drop_path_rate=0.2)`;
    `create_model(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=32, patch_size=2, window_size=4)`;
    `create_model(checkpoint="output/run/best.pth")`: a swin-train checkpoint or export, with its own
    architecture (`swin_train.checkpoint.load_trained_model`); with a name or fields, `checkpoint` may hold
    weights of any supported layout, adapted to that architecture (`models.pretrained.load_pretrained`).
    """
    from swin_train.models.swin import SwinTransformer

    if checkpoint is not None and name is None and not overrides:
        from swin_train.checkpoint import load_trained_model

        return load_trained_model(checkpoint).model
    arch = variant_arch(name) if name else {}
    arch.update(overrides)
    model = SwinTransformer(**arch)
    if checkpoint is not None:
        from swin_train.models.pretrained import load_pretrained

        load_pretrained(model, checkpoint)
    return model
