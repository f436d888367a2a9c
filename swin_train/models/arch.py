"""Swin's architecture rules: what makes a (patch, depths, heads, window, version) combination buildable.

Messages name the config keys (`model.num_heads`, `model.version`) because that is where users set them;
`ArchitectureError.keys` lists the keys involved so the config can point at the line that set them.
"""

from __future__ import annotations

from collections.abc import Sequence


class ArchitectureError(ValueError):
    def __init__(self, keys: tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = keys


def check_architecture(
    *,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int,
    version: int = 1,
    pretrained_window_sizes: Sequence[int] | None = None,
    built_for_version: int | None = None,
    name: str | None = None,
) -> None:
    """Raise ArchitectureError when Swin cannot be built this way. `built_for_version`: the Swin version of the
    named variant `name`, to say so when another version contradicts it. Every image size builds: the model
    pads the image to whole patches and each stage's map to whole windows (docs/design.md, "Any image size")."""
    _check_version(version, pretrained_window_sizes, len(depths), built_for_version, name)
    for key, value in (
        ("patch_size", patch_size),
        ("in_chans", in_chans),
        ("embed_dim", embed_dim),
        ("window_size", window_size),
    ):
        if value < 1:
            raise ArchitectureError((f"model.{key}", "model.name"), f"model.{key} must be >= 1, got {value}")
    if not depths or any(d < 1 for d in depths):
        raise ArchitectureError(
            ("model.depths",), f"model.depths must be a non-empty list of ints >= 1, got {depths}"
        )
    if any(h < 1 for h in num_heads):
        raise ArchitectureError(("model.num_heads",), f"model.num_heads must be ints >= 1, got {num_heads}")
    if len(depths) != len(num_heads):
        raise ArchitectureError(
            ("model.num_heads", "model.depths"),
            f"model.num_heads has {len(num_heads)} entries but model.depths has {len(depths)} stages; "
            "give one head count per stage",
        )
    for i, h in enumerate(num_heads):
        dim = embed_dim * 2**i
        if dim % h:
            raise ArchitectureError(
                ("model.num_heads", "model.embed_dim"),
                f"model.num_heads[{i}]={h} does not divide stage {i} width {dim} "
                f"(model.embed_dim={embed_dim} * 2**{i}); use a divisor of {dim}",
            )


def _check_version(
    version: int, pretrained_windows: Sequence[int] | None, stages: int, named: int | None, name: str | None
) -> None:
    """The version is 1 or 2, agrees with the named variant's, and only V2 has pre-training windows (one per
    stage, each 0 for "this stage's own" or a window >= 2)."""
    if version not in (1, 2):
        raise ArchitectureError(("model.version",), f"model.version must be 1 or 2, got {version}")
    if named is not None and version != named:
        raise ArchitectureError(
            ("model.version", "model.name"),
            f"model.version={version} contradicts model.name '{name}', a Swin V{named} variant; "
            f"drop model.version or name a {'swinv2_' if version == 2 else 'swin_'} variant",
        )
    if pretrained_windows is None:
        return
    if version == 1:
        raise ArchitectureError(
            ("model.pretrained_window_sizes", "model.version", "model.name"),
            "model.pretrained_window_sizes is a Swin V2 setting but this model is Swin V1; "
            "set model.version=2 (or name a swinv2_ variant) or drop model.pretrained_window_sizes",
        )
    if len(pretrained_windows) != stages:
        raise ArchitectureError(
            ("model.pretrained_window_sizes", "model.depths"),
            f"model.pretrained_window_sizes has {len(pretrained_windows)} entries but model.depths has "
            f"{stages} stages; give one pre-training window per stage (0: the stage's own)",
        )
    if any(w < 0 or w == 1 for w in pretrained_windows):
        raise ArchitectureError(
            ("model.pretrained_window_sizes",),
            f"model.pretrained_window_sizes must be 0 (the stage's own window) or windows >= 2, "
            f"got {list(pretrained_windows)}",
        )


def largest_activation_bytes(
    *,
    batch_size: int,
    img_size: int | Sequence[int],
    patch_size: int,
    embed_dim: int,
    mlp_ratio: float,
    **_: object,
) -> int:
    """Bytes of the largest fp32 activation of a step: stage 1's MLP hidden map (batch x tokens x
    embed_dim x mlp_ratio), which every later stage halves. Takes `Config.model_kwargs()` whole."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    tokens = -(-height // patch_size) * -(-width // patch_size)  # the image padded to whole patches
    return batch_size * tokens * int(embed_dim * mlp_ratio) * 4
