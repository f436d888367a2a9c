from swin_train.models.convert import convert_state_dict
from swin_train.models.registry import VARIANTS, create_model, variant_names
from swin_train.models.swin import SwinTransformer

__all__ = ["SwinTransformer", "VARIANTS", "convert_state_dict", "create_model", "variant_names"]
