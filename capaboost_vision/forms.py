"""The CapaBoost forms (LoRA, adapter, prompt), one ``Form`` each, registered by the form's own module, and who
installs each form into each backbone family.

A form declares its trainable parameter names (``param_prefixes``), the largest rank its update reaches, which settings
an adapter file must share with the model it is loaded into, and what it can do (fold into the base weights, export
to stock PEFT, rank diagnostics). Its settings section is registered with ``config.register_form_settings`` (torch
free, for the CLI). How it installs is a ``(family, form) -> installer`` registry: a form that works through the
``Backbone`` description alone (LoRA) registers one installer for every family (``ANY_FAMILY``); a form that needs a
family's own block forward (adapter, prompts) is installed by what that family's model file registers. ``tuner``,
``hub``, ``merge``, ``rank`` and the model entry points ask these registries, so adding a form never edits a family
file it does not support, and adding a family never edits a form.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .backbones import Backbone
from .config import CapaBoostConfig, form_names

Installer = Callable[[nn.Module, List[Tuple[str, nn.Module]], Backbone, CapaBoostConfig], None]
ANY_FAMILY = '*'

COMMON_MATCHING_KEYS = ('method', 'num_masks', 'mask_scaling')  # shape or scale every form


@dataclass(frozen=True)
class Form:
    """One CapaBoost form. ``matching_keys`` are the settings beyond ``COMMON_MATCHING_KEYS`` that shape this form's
    weights. ``param_prefixes``: every parameter and buffer the form adds has a name part starting with one of them;
    those are the parameters ``apply_capaboost`` leaves trainable and an adapter file holds (``lora_``/``capaboost_``
    are the shipped forms', and any other is added to ``tuner.is_capaboost_key`` by registering).

    What the form can do, asked by ``merge``, ``predict``, ``load_classifier``, ``export_peft``, ``rank`` and the
    model card: ``fold(model)`` replaces every layer of the form by the plain module with its update folded into the
    weights (``None`` where the form is not linear in its input; ``cannot_fold`` says why, in one line);
    ``peft_type`` is the stock PEFT adapter type it exports as ('' for none); ``delta_weights(model)`` gives
    {layer: (ΔW in float64, the largest rank it can reach)} for rank diagnostics (``None``: the form has no weight
    update). A form runs mixed batches (``multi``) when it registers, for each of its layer classes, the subclass that
    runs one (``register_mixed_layer``).
    """
    name: str
    max_rank: Callable[[nn.Module], int]
    matching_keys: Tuple[str, ...]
    summary: str  # the entry points' docstring: 'CapaBoost-LoRA (attn.qkv)'
    param_prefixes: Tuple[str, ...] = ('capaboost_',)
    fold: Optional[Callable[[nn.Module], None]] = None
    cannot_fold: str = ''
    peft_type: str = ''
    delta_weights: Optional[Callable[[nn.Module], Dict[str, Tuple[torch.Tensor, int]]]] = None


FORMS: Dict[str, Form] = {}


def sample_rows(idx: torch.Tensor, rows: int, batch: int) -> torch.Tensor:
    """The rows of a layer's input (``rows`` of them) that belong to the samples ``idx`` of a batch of ``batch``: a
    layer may see each sample as several consecutive rows (Swin's attention: one per window, sample-major as timm's
    ``window_partition`` orders them), for a mixed batch's groups."""
    per_sample = rows // batch
    if per_sample == 1:
        return idx
    return (idx.unsqueeze(1) * per_sample + torch.arange(per_sample, device=idx.device)).flatten()


MIXED_LAYERS: Dict[type, type] = {}
"""{layer class: its subclass that runs a mixed batch}: what ``multi`` swaps in for one forward with
``adapter_names=``. A form registers its layers' (each group of samples through its own adapter's tensors, given as
``capaboost_groups``); a family registers a module of its own that must follow (Swin's prompted window attention)."""


def register_mixed_layer(layer_class: type, mixed_class: type) -> None:
    """``mixed_class`` (a subclass of ``layer_class``) runs ``layer_class``'s modules in a mixed batch."""
    MIXED_LAYERS[layer_class] = mixed_class


INSTALLERS: Dict[Tuple[str, str], Installer] = {}
"""{(family, form): installer(model, blocks, backbone, config)}; the family ``ANY_FAMILY`` for a form that installs
into every family the same way."""


def register_form(form: Form) -> Form:
    """Make ``form`` known; its settings section must be registered first (``config.register_form_settings``)."""
    if form.name not in form_names():
        raise ValueError(f'form {form.name!r} has no settings: register them first with '
                         f'config.register_form_settings({form.name!r}, <settings dataclass>)')
    FORMS[form.name] = form
    return form


def register_installer(family: str, form: str, installer: Installer) -> Installer:
    """``installer(model, blocks, backbone, config)`` adds ``form`` to every block of ``blocks`` ((name, block) pairs,
    checked by ``backbones.transformer_blocks``) of a ``family`` model (``ANY_FAMILY``: of every family without its
    own), building every module before replacing any, so a bad setting leaves the model untouched."""
    INSTALLERS[(family, form)] = installer
    return installer


def installer_for(backbone: Backbone, form: str) -> Installer:
    """The installer of ``form`` for ``backbone``'s family; ValueError in one line where there is none."""
    installer = INSTALLERS.get((backbone.name, form)) or INSTALLERS.get((ANY_FAMILY, form))
    if installer is None:
        supported = sorted(f for (family, f) in INSTALLERS if family in (backbone.name, ANY_FAMILY))
        raise ValueError(f'the {form} form is not supported on timm {backbone.model_class.__name__} '
                         f'({backbone.description}): its family supports {", ".join(supported) or "no form"}')
    return installer


def form_of(config: CapaBoostConfig) -> Form:
    """The registered form of ``config.method``."""
    return FORMS[config.method]


def can_merge(method: str) -> bool:
    """True when the form ``method`` folds into the base weights (``merge``)."""
    return FORMS[method].fold is not None
