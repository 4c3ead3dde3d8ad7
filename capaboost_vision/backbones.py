"""What CapaBoost needs to know about a timm model family, as one ``Backbone`` spec per family.

A family's model file in ``models/`` (e.g. ``vision_transformer_capaboost.py``) defines its spec — where the
transformer blocks are, which linears a LoRA target names, its widths — registers it here, registers the installers
of the forms that need its own block forward (``forms.register_installer``: adapter, prompts) and generates its
``*_capaboost_<form>`` entry points. The forms and ``tuner`` only ever ask these registries, so supporting another
timm family (EVA, ...) is one new model file, and the spec has no field for any one form.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch.nn as nn


def same_linear(block: nn.Module, target: str) -> Tuple[str, ...]:
    """A LoRA target names one linear of the block, under that name (ViT, Swin)."""
    return (target,)


def mlp_input_width(block: nn.Module) -> int:
    """The width of the block's residual stream, read from its MLP's first linear (ViT, Swin)."""
    return block.mlp.fc1.in_features


def nothing_to_prepare(block: nn.Module) -> None:
    """The block calls every linear a LoRA target names as a module (ViT, Swin)."""


def stock_peft_runs(model: nn.Module) -> str:
    """'' : stock PEFT's LoRA layers at the same linears run in the plain base model (ViT, Swin)."""
    return ''


@dataclass(frozen=True)
class Backbone:
    """One timm model family as CapaBoost sees it.

    ``block_types`` are the block types CapaBoost supports in this family (exact types: a subclass may have a forward
    of its own). ``lora_linears(block, target)`` says which linears of a block a LoRA target ('attn.qkv', 'mlp.fc1',
    ...) is in this family: the same name, or the family's own split (separate q/k/v projections, a SwiGLU's two input
    linears). ``prepare_lora(block)`` runs before a block's linears are replaced, so that the block calls them as
    modules (a forward that reads ``qkv.weight`` directly would bypass LoRA). ``width(block)`` is the width of the
    block's residual stream (the adapter's input). ``peft_blocker(model)`` says why stock PEFT's LoRA at those
    linears would not run in the plain base model ('' when it would), so ``export_peft`` refuses instead.
    """
    name: str
    model_class: type
    blocks: Callable[[nn.Module], List[Tuple[str, nn.Module]]]
    block_types: Tuple[type, ...]
    description: str
    lora_linears: Callable[[nn.Module, str], Tuple[str, ...]] = same_linear
    prepare_lora: Callable[[nn.Module], None] = nothing_to_prepare
    width: Callable[[nn.Module], int] = mlp_input_width
    peft_blocker: Callable[[nn.Module], str] = stock_peft_runs


BACKBONES: Dict[str, Backbone] = {}


def register_backbone(spec: Backbone) -> Backbone:
    """Make ``spec`` known to ``apply_capaboost`` (its model file calls this on import)."""
    BACKBONES[spec.name] = spec
    return spec


def backbone_of(model: nn.Module) -> Backbone:
    """The spec of ``model``'s family; a ValueError naming the supported families otherwise."""
    for spec in BACKBONES.values():
        if isinstance(model, spec.model_class):
            return spec
    supported = ' and '.join(f'timm {s.model_class.__name__} ({s.description})' for s in BACKBONES.values())
    raise ValueError(f'model of type {type(model).__name__} is not supported: CapaBoost applies to {supported} models')


def transformer_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, block) for every transformer block, in order; ValueError naming a block type CapaBoost does
    not know (e.g. ParallelThingsBlock, whose attention and MLP are lists)."""
    spec = backbone_of(model)
    blocks = spec.blocks(model)
    for name, block in blocks:
        if type(block) not in spec.block_types:
            raise ValueError(f'not supported: {type(block).__name__} ({name}) in {type(model).__name__}; CapaBoost '
                             f'applies to {", ".join(c.__name__ for c in spec.block_types)} blocks')
    return blocks


def head_name(model: nn.Module) -> str:
    """The classifier's qualified name, as timm records it (``pretrained_cfg['classifier']``: ``head`` for ViT,
    ``head.fc`` for Swin), else found from ``get_classifier()``."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    name = name[0] if isinstance(name, (tuple, list)) else name  # distilled DeiT: ('head', 'head_dist')
    try:
        model.get_submodule(name)
        return name
    except (AttributeError, TypeError):
        classifier = model.get_classifier()
        classifier = classifier[0] if isinstance(classifier, tuple) else classifier
        return next(n for n, m in model.named_modules() if m is classifier)


def head_module(model: nn.Module) -> nn.Module:
    """The classifier module (see ``head_name``)."""
    return model.get_submodule(head_name(model))
