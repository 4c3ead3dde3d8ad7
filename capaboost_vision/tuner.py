"""Applying CapaBoost to a timm model: the model's ``Backbone`` (registered by its family's model file) says where
its blocks are, the config's ``Form`` (registered by the form's module) installs itself into them; every module is
planned first, then all are installed (never half-way)."""
import copy
from dataclasses import dataclass, field
from typing import Dict

import torch.nn as nn

from . import lora, adapter, prompt  # noqa: F401  (the forms CapaBoost ships register themselves)
from .backbones import backbone_of, head_module, head_name, transformer_blocks  # noqa: F401  (re-exported)
from .config import CapaBoostConfig, config_keys
from .forms import FORMS, form_of, installer_for


def is_capaboost_key(key: str) -> bool:
    """True for state-dict keys that belong to CapaBoost (parameters and masks), not to the base model: a name part
    starts with a registered form's ``param_prefixes``."""
    prefixes = tuple({p for form in FORMS.values() for p in form.param_prefixes})
    return any(part.startswith(prefixes) for part in key.split('.'))


def apply_capaboost(model: nn.Module, config: CapaBoostConfig) -> nn.Module:
    """Add CapaBoost ``config.method`` to a timm ViT/Swin in place and freeze all but it and the head.

    Base parameter names are unchanged, so a base checkpoint still loads into the returned model.
    Raises ValueError (and leaves the model untouched) when the model or a setting does not fit.
    """
    if not isinstance(config, CapaBoostConfig):
        raise ValueError(f'config must be a CapaBoostConfig (e.g. CapaBoostConfig(method="lora", rank=8)), not '
                         f'{type(config).__name__}')
    backbone = backbone_of(model)
    config.validate()
    if getattr(model, 'capaboost_config', None) is not None:
        raise ValueError('model already has CapaBoost applied (capaboost_config is set); start from a plain model')
    installer_for(backbone, config.method)(model, transformer_blocks(model), backbone, config)

    for name, param in model.named_parameters():
        param.requires_grad_(is_capaboost_key(name))
    if config.train_head:
        head_module(model).requires_grad_(True)
    model.capaboost_config = config
    return model


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold the CapaBoost update into the base weights and return a plain timm model (a form that cannot be folded,
    the adapter or prompts, is one ValueError saying why).

    The result has exactly the base model's modules and state-dict keys, gives the same outputs, and is what
    ``timm.create_model(base)`` returns: every parameter trainable (the CapaBoost model's frozen backbone is a
    PEFT setting, not part of the merged model). Its ``pretrained_cfg`` names the base architecture and tag
    (a registered CapaBoost model's plain timm base) and keeps the data config and class names, and its recorded
    constructor arguments are the base's only, so ``timm.models.push_to_hf_hub(merged, ...)`` gives a repo that
    plain timm loads without this package.
    """
    config = getattr(model, 'capaboost_config', None)
    if config is None:
        raise ValueError('merge() needs a model with CapaBoost applied (got a model without CapaBoost)')
    form = form_of(config)
    if form.fold is None:
        raise ValueError(f'merge(): the {form.name} form cannot be merged: {form.cannot_fold}')
    model = model if inplace else copy.deepcopy(model)
    form.fold(model)
    del model.capaboost_config
    model.requires_grad_(True)
    base = model.__dict__.pop('capaboost_base_architecture', None)
    if base:  # '<family>_capaboost_lora' -> the plain timm model it was built on
        architecture, _, tag = base.partition('.')
        note = f'{base} with a {form.summary.split(" (")[0]} update (arXiv:2407.01320) merged into its weights'
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, architecture=architecture,
                                                        tag=tag or None, notes=(note,))
    model._model_args = {k: v for k, v in getattr(model, '_model_args', {}).items()
                         if k not in config_keys() and k != 'adapter'}
    return model


@dataclass
class ParameterReport:
    """Parameter counts of a CapaBoost model. ``stored`` = what an adapter file holds (CapaBoost + head)."""
    total: int
    trainable: int
    capaboost: int
    head: int
    mask_entries: int
    max_rank: int
    per_module: Dict[str, int] = field(default_factory=dict)

    @property
    def stored(self) -> int:
        return self.capaboost + self.head

    def __str__(self) -> str:
        lines = [f'total parameters       {self.total:>12,}',
                 f'trainable              {self.trainable:>12,} ({100 * self.trainable / max(self.total, 1):.3f}%)',
                 f'  capaboost (stored)   {self.capaboost:>12,} ({self.capaboost / 1e6:.4f}M, excl. head)',
                 f'  head                 {self.head:>12,}',
                 f'static mask entries    {self.mask_entries:>12,} (buffers, never trained)',
                 f'max rank of update     {self.max_rank:>12}']
        return '\n'.join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable/stored counts, per-module CapaBoost counts and the maximum reachable rank (d*r)."""
    head_ids = {id(p) for p in head_module(model).parameters()}
    head = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) in head_ids)
    mask_entries = sum(b.numel() for n, b in model.named_buffers() if is_capaboost_key(n))
    per_module: Dict[str, int] = {}
    for name, p in model.named_parameters():
        if is_capaboost_key(name):
            module = name.rsplit('.', 1)[0]
            per_module[module] = per_module.get(module, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = getattr(model, 'capaboost_config', None)
    max_rank = form_of(config).max_rank(model) if config is not None else 0
    return ParameterReport(total, trainable, trainable - head, head, mask_entries, max_rank, per_module)
