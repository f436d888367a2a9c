"""swin-train: a correct, fast and safe trainer for Swin Transformers."""

from swin_train.loading import create_model, create_simmim
from swin_train.models import SwinTransformer, convert_state_dict

__version__ = "0.1.0"
__all__ = ["SwinTransformer", "convert_state_dict", "create_model", "create_simmim", "__version__"]
