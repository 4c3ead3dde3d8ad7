"""CapaBoost for timm vision transformers. Importing registers the ``*_capaboost_*`` models in timm."""
from ._version import __version__
from .config import CapaBoostConfig
from .tuner import apply_capaboost, merge, parameter_report, is_capaboost_key
from .hub import export_peft, load_adapter, push_adapter_to_hub, push_folder_to_hub, save_adapter
from .classifier import Classifier, load_classifier
from . import models  # noqa: F401  (registers the models)

__all__ = ['__version__', 'CapaBoostConfig', 'apply_capaboost', 'merge', 'parameter_report', 'is_capaboost_key',
           'save_adapter', 'load_adapter', 'push_adapter_to_hub', 'push_folder_to_hub', 'export_peft',
           'load_classifier', 'Classifier']
