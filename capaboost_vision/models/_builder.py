"""Shared helpers for the CapaBoost model entry points: the base model is built (and its pretrained weights
loaded) by timm itself, then CapaBoost is applied and its settings recorded for ``push_to_hf_hub``."""
from pathlib import Path
from typing import Any, Callable, Dict

import torch.nn as nn
from timm.models import PretrainedCfg, get_pretrained_cfg

from ..config import CONFIG_KEYS, CapaBoostConfig
from ..hub import load_adapter, registered_base_id
from ..tuner import apply_capaboost


def base_cfg(name_tag: str, **overrides: Any) -> Dict[str, Any]:
    """A pretrained cfg that loads the base weights ``name_tag`` (with its full hub id) for our architecture."""
    cfg = get_pretrained_cfg(name_tag).to_dict()
    for key in ('architecture', 'tag'):
        cfg.pop(key, None)
    cfg.update(overrides)
    return cfg


def loaded_weights_id(model: nn.Module, pretrained: bool) -> str:
    """What was actually loaded: 'random-init', 'file:<name>' (a local checkpoint) or the weights' hub id."""
    if not pretrained:
        return 'random-init'
    if model.pretrained_cfg.get('file'):
        return f'file:{Path(model.pretrained_cfg["file"]).name}'
    return registered_base_id(model) or 'unknown'


def create_capaboost(create_base: Callable[..., nn.Module], variant: str, pretrained: bool,
                     **kwargs: Any) -> nn.Module:
    """Build ``variant`` = '<base>_capaboost_<method>': timm base model, then CapaBoost from the kwargs.

    CapaBoost settings (rank, num_masks, mask_density, ...) are keyword arguments; every setting, defaults
    included, lands in ``model._model_args`` so a pushed config.json rebuilds the same model.
    ``adapter='hf-hub:org/repo[@rev]'`` or a local folder loads trained adapter weights after the base weights.
    """
    method = variant.rsplit('_', 1)[-1]
    adapter = kwargs.pop('adapter', None)
    source_cfg = kwargs.get('pretrained_cfg')
    source_cfg = source_cfg.to_dict() if isinstance(source_cfg, PretrainedCfg) else source_cfg
    if isinstance(source_cfg, dict) and source_cfg.get('source') in ('hf-hub', 'local-dir'):
        # an adapter repo (timm's 'hf-hub:'/'local-dir:' names): the repo holds the adapter, and its recorded tag
        # names the base weights, which load from their own source
        if pretrained:
            adapter = f'hf-hub:{source_cfg["hf_hub_id"]}' if source_cfg['source'] == 'hf-hub' else source_cfg['file']
        kwargs['pretrained_cfg'] = source_cfg.get('tag') or None
    if kwargs.get('method', method) != method:
        raise ValueError(f'method={kwargs["method"]!r} is invalid for {variant}: its method is {method!r}')
    kwargs.pop('method', None)
    config = CapaBoostConfig.from_kwargs(dict(kwargs, method=method))  # validate before building anything
    base_kwargs = {k: v for k, v in kwargs.items() if k not in CONFIG_KEYS}
    model = create_base(variant, pretrained=pretrained, **base_kwargs)
    model.capaboost_base_weights = loaded_weights_id(model, pretrained)
    apply_capaboost(model, config)
    recorded = config.to_dict()
    recorded.pop('method')
    model._model_args = dict(getattr(model, '_model_args', {}), **recorded)
    if adapter:
        load_adapter(model, adapter)
    return model
