"""The CapaBoost forms (LoRA, adapter, prompt), one ``Form`` each, registered by the form's own module.

A form says how it installs into a model (given the model's ``Backbone``), the largest rank its update reaches and
which settings an adapter file must share with the model it is loaded into. ``tuner`` (apply, report), ``hub``
(loading) and the model entry points in ``models/`` (one per family and form) derive from this registry, so adding a
fourth form is one module that registers itself plus its settings (and name) in ``config.CapaBoostConfig``.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from .backbones import Backbone
from .config import METHODS, CapaBoostConfig

COMMON_MATCHING_KEYS = ('method', 'num_masks', 'mask_scaling')  # shape or scale every form


@dataclass(frozen=True)
class Form:
    """One CapaBoost form. ``install(model, blocks, backbone, config)`` adds the form to every block of
    ``blocks`` ((name, block) pairs, checked by ``backbones.transformer_blocks``), building every module before
    replacing any, so a bad setting leaves the model untouched; ``matching_keys`` are the settings beyond
    ``COMMON_MATCHING_KEYS`` that shape this form's weights.

    What the form can do, asked by ``merge``, ``predict``, ``load_classifier``, ``export_peft`` and the model card:
    ``fold(model)`` replaces every layer of the form by the plain module with its update folded into the weights
    (``None`` where the form is not linear in its input; ``cannot_fold`` says why, in one line); ``peft_type`` is the
    stock PEFT adapter type it exports as ('' for none).
    """
    name: str
    install: Callable[[nn.Module, List[Tuple[str, nn.Module]], Backbone, CapaBoostConfig], None]
    max_rank: Callable[[nn.Module], int]
    matching_keys: Tuple[str, ...]
    summary: str  # the entry points' docstring: 'CapaBoost-LoRA (attn.qkv)'
    fold: Optional[Callable[[nn.Module], None]] = None
    cannot_fold: str = ''
    peft_type: str = ''


FORMS: Dict[str, Form] = {}


def register_form(form: Form) -> Form:
    """Make ``form`` known; its name must be one of ``config.METHODS`` (the settings' torch-free list)."""
    if form.name not in METHODS:
        raise ValueError(f'form {form.name!r} is not listed in config.METHODS ({", ".join(METHODS)})')
    FORMS[form.name] = form
    return form


def form_of(config: CapaBoostConfig) -> Form:
    """The registered form of ``config.method``."""
    return FORMS[config.method]


def can_merge(method: str) -> bool:
    """True when the form ``method`` folds into the base weights (``merge``)."""
    return FORMS[method].fold is not None
