"""Fine-tuning reuses a pretrained head of the same size by position: it says so when the checkpoint's
class names are not this data's."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from swin_train.checkpoint import stored_class_names
from swin_train.config import load_config
from swin_train.models.convert import save_weights
from swin_train.models.swin import SwinTransformer
from swin_train.tasks import build_classifier

FIELDS = [
    "model.patch_size=2",
    "model.embed_dim=24",
    "model.depths=[2,2]",
    "model.num_heads=[2,4]",
    "model.window_size=4",
    "model.num_classes=3",
    "data.img_size=32",
]
NAMES = ["cat", "dog", "fox"]


def _pretrained(tmp_path, fmt: str, names: list[str]):
    model = SwinTransformer(**load_config(None, FIELDS).model_kwargs())
    if fmt == "pth":
        path = tmp_path / "run.pth"
        torch.save({"model": model.state_dict(), "class_names": names}, path)
    else:
        path = tmp_path / "export.safetensors"
        save_weights(model.state_dict(), "safetensors", path, metadata={"class_names": json.dumps(names)})
    return path, model.state_dict()["head.weight"]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_head_trained_on_other_classes_is_reused_with_a_warning_that_names_the_first_difference(
    tmp_path, fmt, caplog
):
    path, head = _pretrained(tmp_path, fmt, ["cat", "fox", "dog"])
    assert stored_class_names(path) == ["cat", "fox", "dog"]
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        model = build_classifier(load_config(None, [*FIELDS, f"model.pretrained={path}"]), 3, NAMES)
    assert torch.equal(model.head.weight, head)  # reused, by position
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'fox' where this data has 'dog', class 1" in warnings[0]
    assert "model.head_map" in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("names", [NAMES, None])
def test_the_same_classes_or_none_stored_load_without_a_warning(tmp_path, names, caplog):
    path, _ = _pretrained(tmp_path, "pth", NAMES)
    if names is None:  # bare weights: nothing to compare
        torch.save(torch.load(path, weights_only=True)["model"], path)
    assert stored_class_names(path) == names
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        build_classifier(load_config(None, [*FIELDS, f"model.pretrained={path}"]), 3, NAMES)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_head_map_or_a_fresh_head_compares_nothing(tmp_path, caplog):
    path, _ = _pretrained(tmp_path, "pth", ["a", "b", "c"])
    head_map = tmp_path / "map.txt"
    head_map.write_text("2\n1\n0\n")
    with caplog.at_level(logging.WARNING, logger="swin_train"):
        build_classifier(
            load_config(None, [*FIELDS, f"model.pretrained={path}", f"model.head_map={head_map}"]), 3, NAMES
        )
        fresh = [f for f in FIELDS if not f.startswith("model.num_classes")] + ["model.num_classes=2"]
        build_classifier(load_config(None, [*fresh, f"model.pretrained={path}"]), 2, ["x", "y"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
