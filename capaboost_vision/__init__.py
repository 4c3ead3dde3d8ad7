"""CapaBoost for timm vision transformers. Importing registers the ``*_capaboost_*`` models in timm."""
from ._version import __version__
from .config import CapaBoostConfig
from .tuner import apply_capaboost, merge, parameter_report, is_capaboost_key
from .hub import export_peft, push_adapter_to_hub, push_folder_to_hub, save_adapter
from .multi import (active_adapter, delete_adapter, disable_adapters, list_adapters, load_adapter, set_adapter,
                    using_adapter)
from .classifier import Classifier, load_classifier
from . import models  # noqa: F401  (registers the models)

__all__ = ['__version__', 'CapaBoostConfig', 'apply_capaboost', 'merge', 'parameter_report', 'is_capaboost_key',
           'save_adapter', 'load_adapter', 'push_adapter_to_hub', 'push_folder_to_hub', 'export_peft',
           'set_adapter', 'disable_adapters', 'delete_adapter', 'list_adapters', 'active_adapter', 'using_adapter',
           'load_classifier', 'Classifier']
