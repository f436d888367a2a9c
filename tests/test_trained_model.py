"""One way to load a trained model: every command gives the same logits from the same checkpoint."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers import MICRO_OVERRIDES

from swin_train import create_model
from swin_train.checkpoint import FORMAT, save_checkpoint, training_checkpoint
from swin_train.cli.eval import load_model_and_config
from swin_train.cli.export import cli as export_cli
from swin_train.config import config_to_dict, load_config
from swin_train.data.transforms import Preprocess
from swin_train.errors import CheckpointError
from swin_train.loading import load_trained_model
from swin_train.models.swin import SwinTransformer
from swin_train.predict import Predictor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training checkpoint of a micro model with an EMA copy that differs from the raw weights."""
    cfg = load_config(None, MICRO_OVERRIDES)
    torch.manual_seed(0)
    raw, ema = SwinTransformer(**cfg.model_kwargs()), SwinTransformer(**cfg.model_kwargs())
    state = training_checkpoint(
        model=raw.state_dict(),
        optimizer={},
        schedule={"step": 0},
        scaler=None,
        ema={"module": ema.state_dict(), "num_updates": 1, "calls": 1},
        train_state={},
        best={},
        rng=[],
        config=config_to_dict(cfg),
        world_size=1,
        class_names=[f"c{i}" for i in range(8)],
        preprocess=Preprocess.from_config(cfg).to_dict(),
    )
    path = tmp_path_factory.mktemp("trained") / "best.pth"
    save_checkpoint(state, path)
    return path


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _eval_args(path, ema: bool) -> argparse.Namespace:
    return argparse.Namespace(
        checkpoint=str(path), ema=ema, model=None, config=None, overrides=[], data_path=None
    )


@pytest.mark.parametrize("ema", [False, True])
def test_every_command_loads_the_same_model(checkpoint, tmp_path, ema):
    x = torch.randn(3, 3, 32, 32)
    reference = _logits(load_trained_model(checkpoint, ema=ema).model, x)
    exported = tmp_path / "w.safetensors"
    flags = ["--ema"] if ema else []
    assert (
        export_cli(
            ["--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(exported), *flags]
        )
        == 0
    )
    loaded = {
        "swin-predict": Predictor.from_checkpoint(checkpoint, device="cpu", ema=ema).model,
        "swin-eval": load_model_and_config(_eval_args(checkpoint, ema))[0],
        "swin-export (safetensors), loaded back": load_trained_model(exported).model,
        "swin-eval on the export": load_model_and_config(_eval_args(exported, False))[0],
    }
    if not ema:
        loaded["create_model(checkpoint=)"] = create_model(checkpoint=str(checkpoint))
    for name, model in loaded.items():
        assert torch.equal(_logits(model, x), reference), name
    raw, averaged = (_logits(load_trained_model(checkpoint, ema=flag).model, x) for flag in (False, True))
    assert not torch.equal(raw, averaged)  # the EMA weights really are other weights


def test_a_checkpoint_of_another_format_is_refused_by_name(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    assert state["format"] == FORMAT
    state["format"] = "someone-else/3"
    del state["config"]
    save_checkpoint(state, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a swin-train checkpoint or export"):
        load_trained_model(tmp_path / "other.pth")
