"""Every implementation of one architecture with the same weights (timm's random init converted into ours
and torchvision's layout), and how far their logits are apart."""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

from bench.common import Setup
from swin_train import convert_state_dict, create_model
from swin_train.models.convert import to_layout

IMPLS = ("ours", "timm", "torchvision")


def build_model(
    impl: str,
    arch: dict,
    num_classes: int,
    drop_path: float,
    grad_checkpointing: bool = False,
    attention: str = "auto",
) -> nn.Module:
    """One implementation of the architecture (Swin V1 or V2, `arch["version"]`), randomly initialised, in
    train mode."""
    version = arch.get("version", 1)
    if impl in ("ours", "timm"):
        if impl == "ours":
            model = create_model(
                **arch, num_classes=num_classes, drop_path_rate=drop_path, attention=attention
            )
        else:  # timm has a class per version
            timm_arch = {k: v for k, v in arch.items() if k != "version"}
            timm_class = TimmSwinV2 if version == 2 else TimmSwin
            model = timm_class(**timm_arch, num_classes=num_classes, drop_path_rate=drop_path)
        model.set_grad_checkpointing(grad_checkpointing)
        return model
    p, w = arch["patch_size"], arch["window_size"]
    v2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == 2 else {}
    return TorchvisionSwin(
        **v2,
        patch_size=[p, p],
        embed_dim=arch["embed_dim"],
        depths=list(arch["depths"]),
        num_heads=list(arch["num_heads"]),
        window_size=[w, w],
        stochastic_depth_prob=drop_path,
        num_classes=num_classes,
    )


def build_same_weight_models(setup: Setup) -> dict[str, nn.Module]:
    """timm's random weights -> ours (convert_state_dict) -> torchvision (to_layout)."""
    models = {
        impl: build_model(
            impl, setup.arch, setup.num_classes, setup.drop_path, setup.grad_checkpointing, setup.attention
        )
        for impl in setup.impls
    }
    ours_sd = convert_state_dict(models["timm"].state_dict()) if "timm" in models else None
    if ours_sd is not None:
        models["ours"].load_state_dict(ours_sd, strict=True)
    ours_sd = models["ours"].state_dict()
    if "torchvision" in models:
        tv = models["torchvision"]
        tv.load_state_dict(to_layout(ours_sd, "torchvision", models["ours"]), strict=True)
        back = convert_state_dict(tv.state_dict())
        assert all(torch.equal(back[k], ours_sd[k]) for k in ours_sd), "torchvision weights differ from ours"
    return models


@torch.no_grad()
def logits_max_abs_diff(models: dict[str, nn.Module], x: torch.Tensor) -> dict[str, float]:
    """max |logits_ours - logits_other| in fp32 eval mode, per other implementation; moves the models to
    x's device."""
    out = {}
    for impl, model in models.items():
        model.to(x.device).eval()
        out[impl] = model(x).float()
        model.train()
    return {impl: (out["ours"] - logits).abs().max().item() for impl, logits in out.items() if impl != "ours"}
