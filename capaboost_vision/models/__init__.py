"""Importing this package registers the CapaBoost model families in timm."""
from . import vision_transformer_capaboost, swin_transformer_capaboost, eva_capaboost  # noqa: F401
