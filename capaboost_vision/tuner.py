"""Applying CapaBoost to a timm ViT or Swin: plan every module first, then install them all (never half-way)."""
import copy
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from .adapter import ADAPTER_BLOCKS, CapaBoostAdapter
from .config import CapaBoostConfig
from .lora import CapaBoostLoRALinear
from .peft_baselines import is_peft_model
from .prompt import build_swin_prompt, build_vit_prompt, install_swin_prompt, install_vit_prompt

CAPABOOST_MODULES = (CapaBoostLoRALinear, CapaBoostAdapter)
# blocks with one attention (attn.qkv, attn.proj) and one MLP (mlp.fc1, mlp.fc2) on the residual stream; exact
# types, as the adapter and prompt forms swap in subclasses with timm's forward written out (a subclass of these
# may have a forward of its own)
SUPPORTED_BLOCKS = {'vit': (Block, ResPostBlock), 'swin': (SwinTransformerBlock,)}


def model_family(model: nn.Module) -> str:
    """'vit' or 'swin'; a ValueError for anything else."""
    if isinstance(model, VisionTransformer):
        return 'vit'
    if isinstance(model, SwinTransformer):
        return 'swin'
    raise ValueError(f'model of type {type(model).__name__} is not supported: CapaBoost applies to timm '
                     f'VisionTransformer (ViT, DeiT, DINOv2) and SwinTransformer models')


def transformer_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(qualified name, block) for every transformer block, in order; ValueError naming a block type CapaBoost does
    not know (e.g. ParallelThingsBlock, whose attention and MLP are lists)."""
    family = model_family(model)
    if family == 'vit':
        blocks = [(f'blocks.{i}', b) for i, b in enumerate(model.blocks)]
    else:
        blocks = [(f'layers.{s}.blocks.{j}', b) for s, stage in enumerate(model.layers)
                  for j, b in enumerate(stage.blocks)]
    for name, block in blocks:
        if type(block) not in SUPPORTED_BLOCKS[family]:
            raise ValueError(f'not supported: {type(block).__name__} ({name}) in {type(model).__name__}; CapaBoost '
                             f'applies to {", ".join(c.__name__ for c in SUPPORTED_BLOCKS[family])} blocks')
    return blocks


def head_name(model: nn.Module) -> str:
    """The classifier's qualified name: ``head`` for ViT, ``head.fc`` for Swin (the one place this is decided)."""
    return 'head' if model_family(model) == 'vit' else 'head.fc'


def head_module(model: nn.Module) -> nn.Module:
    """The classifier module (see ``head_name``)."""
    return model.get_submodule(head_name(model))


def is_capaboost_key(key: str) -> bool:
    """True for state-dict keys that belong to CapaBoost (parameters and masks), not to the base model."""
    return any(part.startswith(('lora_', 'capaboost_')) for part in key.split('.'))


def apply_capaboost(model: nn.Module, config: CapaBoostConfig) -> nn.Module:
    """Add CapaBoost ``config.method`` to a timm ViT/Swin in place and freeze all but it and the head.

    Base parameter names are unchanged, so a base checkpoint still loads into the returned model.
    Raises ValueError (and leaves the model untouched) when the model or a setting does not fit.
    """
    family = model_family(model)
    config.validate()
    if getattr(model, 'capaboost_config', None) is not None:
        raise ValueError('model already has CapaBoost applied (capaboost_config is set); start from a plain model')
    blocks = transformer_blocks(model)

    if config.method == 'lora':  # plan: build every layer before replacing any
        planned = []
        for block_name, block in blocks:
            for target in config.target_modules:
                parent_name, attr = target.rsplit('.', 1)
                parent = block.get_submodule(parent_name)
                base = getattr(parent, attr)
                planned.append((parent, attr, CapaBoostLoRALinear(base, config, f'{block_name}.{target}')))
        for parent, attr, layer in planned:
            setattr(parent, attr, layer)
    elif config.method == 'adapter':
        planned = []
        for block_name, block in blocks:
            ref = block.mlp.fc1.weight
            planned.append((block.mlp, CapaBoostAdapter(block.mlp.fc1.in_features, config,
                                                        f'{block_name}.mlp.capaboost_adapter',
                                                        device=ref.device, dtype=ref.dtype)))
        for (_, block), (mlp, adapter) in zip(blocks, planned):
            mlp.capaboost_adapter = adapter
            block.__class__ = ADAPTER_BLOCKS[type(block)]  # timm's forward with the adapter in it
    else:  # prompt
        if family == 'vit':
            install_vit_prompt(model, build_vit_prompt(model, config))
        else:
            install_swin_prompt(model, build_swin_prompt(model, config))

    for name, param in model.named_parameters():
        param.requires_grad_(is_capaboost_key(name))
    if config.train_head:
        head_module(model).requires_grad_(True)
    model.capaboost_config = config
    return model


def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every CapaBoost-LoRA update into its base weight and return a plain timm model.

    The result has exactly the base model's modules and state-dict keys, gives the same outputs, and is what
    ``timm.create_model(base)`` returns: every parameter trainable (the CapaBoost model's frozen backbone is a
    PEFT setting, not part of the merged model).
    """
    config = getattr(model, 'capaboost_config', None)
    if config is None or config.method != 'lora':
        raise ValueError('merge() needs a model with CapaBoost method="lora" applied '
                         f'(got {config.method if config else "a model without CapaBoost"}); adapters and '
                         'prompts are not linear in the input and cannot be folded into the weights')
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, CapaBoostLoRALinear):
            parent_name, attr = name.rsplit('.', 1)
            setattr(model.get_submodule(parent_name), attr, module.to_linear())
    del model.capaboost_config
    model.requires_grad_(True)
    return model


@dataclass
class StoredParameters:
    """What a method ships beside the backbone, counted the same way for every row (CapaBoost, HF PEFT, linear,
    full): the trainable parameters excluding the classifier head (the literature's column), the head, and the
    non-trainable tensors the method needs (CapaBoost masks, VeRA/RandLoRA random bases), shared ones counted once."""
    trainable_excl_head: int
    head: int
    fixed: int


def _fixed_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """A method's own non-trainable tensors: CapaBoost's mask buffers, or the buffers of PEFT's tuner layers beyond
    their base layers' (VeRA's and RandLoRA's random bases: one shared tensor referenced by every layer)."""
    if not is_peft_model(model):
        yield from (b for n, b in model.named_buffers() if is_capaboost_key(n))
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = {id(b) for b in module.get_base_layer().buffers()}
            yield from (b for b in module.buffers() if id(b) not in base)


def stored_parameters(model: nn.Module) -> StoredParameters:
    """The one parameter count of every results row and report (see ``StoredParameters``)."""
    timm_model = model.get_base_model() if is_peft_model(model) else model
    head_ids = {id(p) for p in head_module(timm_model).parameters()}
    trainable = head = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            head += p.numel()
        else:
            trainable += p.numel()
    fixed = sum(b.numel() for b in {id(b): b for b in _fixed_tensors(model)}.values())  # shared ones once
    return StoredParameters(trainable, head, fixed)


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
    counts = stored_parameters(model)
    per_module: Dict[str, int] = {}
    for name, p in model.named_parameters():
        if is_capaboost_key(name):
            module = name.rsplit('.', 1)[0]
            per_module[module] = per_module.get(module, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    max_rank = 0
    for module in model.modules():
        if isinstance(module, CapaBoostLoRALinear):
            max_rank = max(max_rank, min(module.num_masks * module.rank, module.in_features, module.out_features))
        elif isinstance(module, CapaBoostAdapter):
            max_rank = max(max_rank, module.mask_down.shape[0] * module.down_weight.shape[0])
    prompt = getattr(model, 'capaboost_prompt', None)
    if prompt is not None:
        max_rank = max(bank.max_rank() for bank in prompt.banks)
    return ParameterReport(total, trainable, counts.trainable_excl_head, counts.head, counts.fixed, max_rank,
                           per_module)
