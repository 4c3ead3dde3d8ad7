"""Shared helpers for the CapaBoost model entry points: the base model is built (and its pretrained weights
loaded) by timm itself, then CapaBoost is applied and its settings recorded for ``push_to_hf_hub``."""
from typing import Any, Callable, Dict

import torch.nn as nn
from timm.models import get_pretrained_cfg

from ..config import CONFIG_KEYS, CapaBoostConfig
from ..tuner import apply_capaboost

METHODS_BY_SUFFIX = {'lora': 'lora', 'adapter': 'adapter', 'prompt': 'prompt'}


def base_cfg(name_tag: str, **overrides: Any) -> Dict[str, Any]:
    """A pretrained cfg that loads the base weights ``name_tag`` (with its full hub id) for our architecture."""
    cfg = get_pretrained_cfg(name_tag).to_dict()
    for key in ('architecture', 'tag'):
        cfg.pop(key, None)
    cfg.update(overrides)
    return cfg


def create_capaboost(create_base: Callable[..., nn.Module], variant: str, pretrained: bool,
                     **kwargs: Any) -> nn.Module:
    """Build ``variant`` = '<base>_capaboost_<method>': timm base model, then CapaBoost from the kwargs.

    CapaBoost settings (rank, num_masks, mask_density, ...) are keyword arguments; every setting, defaults
    included, lands in ``model._model_args`` so a pushed config.json rebuilds the same model.
    """
    method = variant.rsplit('_', 1)[-1]
    if kwargs.get('method', method) != method:
        raise ValueError(f'method={kwargs["method"]!r} is invalid for {variant}: its method is {method!r}')
    kwargs.pop('method', None)
    config = CapaBoostConfig.from_kwargs(dict(kwargs, method=method))  # validate before building anything
    base_kwargs = {k: v for k, v in kwargs.items() if k not in CONFIG_KEYS}
    model = create_base(variant, pretrained=pretrained, **base_kwargs)
    apply_capaboost(model, config)
    recorded = config.to_dict()
    recorded.pop('method')
    model._model_args = dict(getattr(model, '_model_args', {}), **recorded)
    return model
