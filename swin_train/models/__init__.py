"""The model: Swin as in the paper (`swin.py`), its named variants (`registry.py`) and weight layouts
(`convert.py`, `hf.py`, `onnx.py`). Nothing here loads a trained model: that is `swin_train.loading`."""

from swin_train.models.convert import convert_state_dict
from swin_train.models.registry import VARIANTS, build_model, variant_names
from swin_train.models.swin import SwinTransformer

__all__ = ["SwinTransformer", "VARIANTS", "build_model", "convert_state_dict", "variant_names"]
