"""CapaBoost for timm vision transformers. Importing registers the ``*_capaboost_*`` models in timm."""
from .config import CapaBoostConfig
from .tuner import apply_capaboost, merge, parameter_report, is_capaboost_key
from .hub import export_peft, load_adapter, push_adapter_to_hub, save_adapter
from . import models  # noqa: F401  (registers the models)

__version__ = '0.1.0'
__all__ = ['CapaBoostConfig', 'apply_capaboost', 'merge', 'parameter_report', 'is_capaboost_key', 'save_adapter',
           'load_adapter', 'push_adapter_to_hub', 'export_peft']
