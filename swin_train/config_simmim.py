"""The `simmim:` config section: SimMIM pre-training's own settings (task: simmim), with the official names
beside each, and what the task needs of the rest of the config."""

from __future__ import annotations

import math
from dataclasses import dataclass

from swin_train.models.simmim import ENCODER_STRIDE

TASKS = ("classification", "simmim")  # `task`: what a run trains the model for


@dataclass
class SimMIMConfig:
    # the side of the square patches masked together, in pixels (official DATA.MASK_PATCH_SIZE)
    mask_patch_size: int = 32
    mask_ratio: float = 0.6  # the share of mask patches masked in each image (official DATA.MASK_RATIO)
    # null: the decoder reconstructs the normalised image; an odd patch size (official NORM_TARGET.PATCH_SIZE 47,
    # the SwinV2 recipe): each pixel standardised by the mean and variance of the window around it
    norm_target: int | None = None
    # the first validation images (that decode) in each epoch's picture: original | masked | reconstruction; 0: none
    pictures: int = 4

    def check(self, r) -> None:
        r.require("simmim.mask_patch_size", self.mask_patch_size, lambda x: x >= 1, ">= 1")
        r.require("simmim.mask_ratio", self.mask_ratio, lambda x: 0 < x < 1, "in (0, 1)")
        if self.norm_target is not None:
            r.require(
                "simmim.norm_target",
                self.norm_target,
                lambda x: x >= 3 and x % 2,
                "null or odd and >= 3 (e.g. 47; a 1-pixel window has no variance)",
            )
        r.require("simmim.pictures", self.pictures, lambda x: x >= 0, ">= 0 (0: none)")

    def check_task(self, cfg, r) -> None:
        """What pre-training needs of the model and data sections (`cfg` a Config with task: simmim)."""
        m, d = cfg.model, cfg.data
        sides = [d.img_size] * 2 if isinstance(d.img_size, int) else d.img_size
        stride = m.patch_size * 2 ** (len(m.depths) - 1)
        if stride != ENCODER_STRIDE:
            r.fail(
                ("model.patch_size", "model.depths"),
                f"task simmim decodes from stride {ENCODER_STRIDE} (official), but model.patch_size "
                f"{m.patch_size} x 2^{len(m.depths) - 1} merges is stride {stride}; use patch 4 and 4 stages "
                "(or patch 8 and 3)",
            )
        if any(side % ENCODER_STRIDE for side in sides):
            r.fail(
                "data.img_size",
                f"task simmim needs data.img_size a multiple of {ENCODER_STRIDE}, got {d.img_size}",
            )
        if any(side % self.mask_patch_size for side in sides) or self.mask_patch_size % m.patch_size:
            r.fail(
                ("simmim.mask_patch_size", "data.img_size", "model.patch_size"),
                f"simmim.mask_patch_size={self.mask_patch_size} must divide data.img_size={d.img_size} and be a "
                f"multiple of model.patch_size={m.patch_size}; change one of them",
            )
        patches = (sides[0] // self.mask_patch_size) * (sides[1] // self.mask_patch_size)
        if patches == 1:
            r.fail(
                ("simmim.mask_patch_size", "data.img_size"),
                f"simmim.mask_patch_size={self.mask_patch_size} makes the {sides[0]} x {sides[1]} image one mask "
                "patch: every mask hides all of it; use a smaller simmim.mask_patch_size",
            )
        if math.ceil(patches * self.mask_ratio) >= patches:  # as MaskGenerator counts them
            r.fail(
                ("simmim.mask_ratio", "simmim.mask_patch_size"),
                f"simmim.mask_ratio={self.mask_ratio} masks all {patches} mask patches of a {sides[0]} x {sides[1]} image "
                f"(ceil({patches} x {self.mask_ratio})), leaving the encoder nothing to see; use at most "
                f"{(patches - 1) / patches:g} or a smaller simmim.mask_patch_size",
            )
        if d.synthetic:
            r.fail(
                ("data.synthetic", "task"),
                "task simmim reads images; data.synthetic gives random tensors, set it false",
            )
        if d.decode == "cuda":
            r.fail(("data.decode", "task"), "task simmim decodes in the data workers; set data.decode=cpu")
        if cfg.model.pretrained:
            r.fail(
                ("model.pretrained", "task"),
                "task simmim starts from random weights; unset model.pretrained (resume a pre-training with "
                "--resume)",
            )
