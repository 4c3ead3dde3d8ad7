"""CapaBoost Vision Transformers (ViT, DeiT, DINOv2 and register variants) for timm.

Papers:
- Increasing Model Capacity for Free: A Simple Strategy for Parameter Efficient Fine-tuning (CapaBoost)
  - https://openreview.net/forum?id=7ub8hlR8pI (ICLR 2024)
- An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale - https://arxiv.org/abs/2010.11929
- DINOv2: Learning Robust Visual Features without Supervision - https://arxiv.org/abs/2304.07193
- LoRA - https://arxiv.org/abs/2106.09685; AdaptFormer - https://arxiv.org/abs/2205.13535;
  Visual Prompt Tuning - https://arxiv.org/abs/2203.12119

Everything CapaBoost knows about timm's ``VisionTransformer`` is here: its ``Backbone`` spec (blocks, the block
subclasses that run an adapter or prompts, the prompt installer), the CapaBoost families and their generated
``<family>_capaboost_<form>`` entry points. Pretrained tags mirror the VTAB-standard base weights (ImageNet-21k:
``orig_in21k`` where timm has it, else ``augreg_in21k``); the weights are timm's own, loaded through its usual
resolution, and CapaBoost is applied on top. Use ``pretrained_cfg_overlay=dict(file=...)`` for a local checkpoint.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer, _create_vision_transformer

from ..backbones import Backbone, register_backbone
from ..config import CapaBoostConfig
from ..adapter import adapter_installer
from ..forms import FORMS, register_installer
from ..prompt import BlockPrompts, DeepPrompt, PromptBank, attach_bank, name_banks_first, vpt_init_bound
from ._builder import base_cfg, create_capaboost, register_entry_points


class AdapterBlock(Block):
    """timm's ViT ``Block`` with its MLP's CapaBoost adapter: sequential inside the MLP branch, parallel beside it
    (outside LayerScale and drop-path)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        h = self.norm2(x)
        if self.mlp.capaboost_adapter.placement == 'parallel':
            return x + self.drop_path2(self.ls2(self.mlp(h))) + self.mlp.capaboost_adapter(h)
        y = self.mlp(h)
        return x + self.drop_path2(self.ls2(y + self.mlp.capaboost_adapter(y)))


class AdapterResPostBlock(ResPostBlock):
    """timm's ``ResPostBlock`` (norm after attention and MLP) with its MLP's CapaBoost adapter."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal)))
        if self.mlp.capaboost_adapter.placement == 'parallel':
            return x + self.drop_path2(self.norm2(self.mlp(x))) + self.mlp.capaboost_adapter(x)
        y = self.mlp(x)
        return x + self.drop_path2(self.norm2(y + self.mlp.capaboost_adapter(y)))


class PromptedVitTokens(BlockPrompts):
    """The ViT prompt tokens of one block: inserted after the prefix tokens on entry, removed on exit."""

    capaboost_num_prefix: int

    def insert_prompts(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        # a real mask or causal attention would not fit the prompt tokens (fx's placeholders for them are neither)
        if isinstance(attn_mask, torch.Tensor) or (isinstance(is_causal, bool) and is_causal):
            raise ValueError('capaboost prompt models do not support attn_mask/is_causal: the prompts change the '
                             'token count')
        p = self.capaboost_num_prefix  # (B, prefix + patches, dim) -> (B, prefix + n + patches, dim)
        prompts = self.capaboost_prompts().to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n, dim)
        return torch.cat([x[:, :p], prompts, x[:, p:]], dim=1)

    def remove_prompts(self, x: torch.Tensor) -> torch.Tensor:
        p = self.capaboost_num_prefix  # (B, prefix + n + patches, dim) -> (B, prefix + patches, dim)
        return torch.cat([x[:, :p], x[:, p + self.capaboost_prompt_bank.length:]], dim=1)


class PromptedBlock(PromptedVitTokens, Block):
    """timm's ViT ``Block`` with its VPT-deep prompts."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.insert_prompts(x, attn_mask, is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self.remove_prompts(x)


class PromptedResPostBlock(PromptedVitTokens, ResPostBlock):
    """timm's ``ResPostBlock`` with its VPT-deep prompts."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.insert_prompts(x, attn_mask, is_causal)
        x = x + self.drop_path1(self.norm1(self.attn(x)))
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return self.remove_prompts(x)

# the classes CapaBoost swaps in for each supported block (exact types: a subclass may have its own forward)
ADAPTER_BLOCKS = {Block: AdapterBlock, ResPostBlock: AdapterResPostBlock}
PROMPTED_BLOCKS = {Block: PromptedBlock, ResPostBlock: PromptedResPostBlock}


def vit_blocks(model: VisionTransformer) -> List[Tuple[str, nn.Module]]:
    return [(f'blocks.{i}', b) for i, b in enumerate(model.blocks)]


def install_vit_prompt(model: VisionTransformer, blocks: List[Tuple[str, nn.Module]], backbone: Backbone,
                       config: CapaBoostConfig) -> None:
    """One bank for all blocks (one width), its tokens after the prefix (class/register) tokens of every block."""
    p = model.blocks[0].attn.qkv.weight
    bound = vpt_init_bound(model.patch_embed.patch_size, model.embed_dim)
    deep_prompt = DeepPrompt([PromptBank(len(model.blocks), model.embed_dim, config, 'capaboost_prompt.banks.0',
                                         bound, device=p.device, dtype=p.dtype)])
    model.capaboost_prompt = deep_prompt
    for i, block in enumerate(model.blocks):
        block.capaboost_base_class = type(block)  # what disable_adapters runs instead
        block.__class__ = PROMPTED_BLOCKS[type(block)]
        block.capaboost_num_prefix = model.num_prefix_tokens
        attach_bank(block, deep_prompt.banks[0], i)
    name_banks_first(model)


VIT = register_backbone(Backbone('vit', VisionTransformer, vit_blocks, tuple(ADAPTER_BLOCKS), 'ViT, DeiT, DINOv2'))
register_installer('vit', 'adapter', adapter_installer(ADAPTER_BLOCKS))
register_installer('vit', 'prompt', install_vit_prompt)

_ARGS = {
    'vit_tiny': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    'vit_small_dinov2': dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, img_size=518),
}
_BASE_WEIGHTS = {
    'vit_tiny': 'vit_tiny_patch16_224.augreg_in21k',
    'vit_small': 'vit_small_patch16_224.augreg_in21k',
    'vit_base': 'vit_base_patch16_224.orig_in21k',
    'vit_large': 'vit_large_patch16_224.orig_in21k',
    'vit_small_dinov2': 'vit_small_patch14_dinov2.lvd142m',
}


def _papers(family: str) -> List[str]:
    """The base's papers: ViT, and DINOv2 for the DINOv2 family."""
    return ['arXiv:2010.11929'] + (['arXiv:2304.07193'] if 'dinov2' in family else [])


default_cfgs = generate_default_cfgs({
    f'{family}_capaboost_{form}.{base.split(".")[1]}': base_cfg(base, _papers(family))
    for family, base in _BASE_WEIGHTS.items() for form in FORMS
})


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    family = variant.split('_capaboost_')[0]
    return create_capaboost(_create_vision_transformer, variant, _BASE_WEIGHTS[family], pretrained,
                            **dict(_ARGS[family], **kwargs))


# vit_tiny_capaboost_lora, ..., vit_small_dinov2_capaboost_prompt: one per family and form
globals().update(register_entry_points(__name__, _ARGS, _create))
