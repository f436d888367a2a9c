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


def variant_names() -> list[str]:
    return sorted(VARIANTS)


def variant_arch(name: str) -> dict:
    """Architecture fields of a named variant (a copy). Raises KeyError with suggestions."""
    if name not in VARIANTS:
        import difflib

        close = difflib.get_close_matches(name, VARIANTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(variant_names())}"
        raise KeyError(f"unknown model '{name}'{hint}")
    return dict(VARIANTS[name])
