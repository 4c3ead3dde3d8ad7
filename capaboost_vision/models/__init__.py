"""Importing this package registers the CapaBoost model families in timm."""
from . import swin_transformer_capaboost, vision_transformer_capaboost  # noqa: F401
