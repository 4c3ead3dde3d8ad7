"""CapaBoost Swin Transformers for timm.

Papers:
- Increasing Model Capacity for Free: A Simple Strategy for Parameter Efficient Fine-tuning (CapaBoost)
  - https://openreview.net/forum?id=7ub8hlR8pI (ICLR 2024)
- Swin Transformer: Hierarchical Vision Transformer using Shifted Windows - https://arxiv.org/abs/2103.14030

Everything CapaBoost knows about timm's ``SwinTransformer`` is here: its ``Backbone`` spec (blocks, the block
subclass that runs an adapter, the window attention with prompts and its installer), the CapaBoost families and their
generated ``<family>_capaboost_<form>`` entry points. Pretrained tags mirror the VTAB-standard base weights
(``ms_in22k``), loaded through timm's usual resolution.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs
from timm.models.swin_transformer import (SwinTransformer, SwinTransformerBlock, WindowAttention,
                                          _create_swin_transformer)

from ..backbones import Backbone, register_backbone
from ..config import CapaBoostConfig
from ..adapter import adapter_installer
from ..forms import FORMS, register_installer, register_mixed_layer
from ..prompt import BlockPrompts, DeepPrompt, PromptBank, attach_bank, name_banks_first, vpt_init_bound
from ._builder import base_cfg, create_capaboost, register_entry_points


class AdapterSwinBlock(SwinTransformerBlock):
    """timm's ``SwinTransformerBlock`` with its MLP's CapaBoost adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)  # (B, H, W, C) -> (B, H*W, C)
        h = self.norm2(x)
        if self.mlp.capaboost_adapter.placement == 'parallel':
            x = x + self.drop_path2(self.mlp(h)) + self.mlp.capaboost_adapter(h)
        else:
            y = self.mlp(h)
            x = x + self.drop_path2(y + self.mlp.capaboost_adapter(y))
        return x.reshape(B, H, W, C)


class PromptedWindowAttention(BlockPrompts, WindowAttention):
    """timm's WindowAttention with the block's prompts as extra keys/values (zero bias, never masked)."""

    def prompt_keys_values(self, prompt: torch.Tensor, num_windows: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block's prompts as keys and values of every window, (B_, H, n, hd) each: (n, C) prompts, shared."""
        n = prompt.shape[0]
        _, pk, pv = self.qkv(prompt).reshape(n, 3, self.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # (H, n, hd)
        return pk.expand(num_windows, -1, -1, -1), pv.expand(num_windows, -1, -1, -1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, H, N, hd)
        pk, pv = self.prompt_keys_values(self.capaboost_prompts().to(x.dtype), B_)
        n = pk.shape[2]
        k = torch.cat([pk, k], dim=2)  # (B_, H, n+N, hd)
        v = torch.cat([pv, v], dim=2)
        bias = self._get_rel_pos_bias()  # (1, H, N, N)
        if mask is not None:  # (nW, N, N) shift mask, windows innermost in B_ as in timm
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, num_win, 1, N, N)).expand(B_ // num_win, -1, -1, -1, -1)
            bias = bias.reshape(B_, self.num_heads, N, N)
        bias = F.pad(bias, (n, 0)).to(q.dtype)  # (.., N, n+N): zero bias on the prompt keys
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.proj(x.transpose(1, 2).reshape(B_, N, -1))
        return self.proj_drop(x)

class MixedPromptedWindowAttention(PromptedWindowAttention):
    """A PromptedWindowAttention during a mixed batch (``multi``; swapped in for one forward): its bank gives
    prompts per sample, (B, n, C), and each sample's windows (consecutive in B_, as timm's ``window_partition``
    orders them) attend to its own."""

    def prompt_keys_values(self, prompt: torch.Tensor, num_windows: int) -> Tuple[torch.Tensor, torch.Tensor]:
        B, n, _ = prompt.shape
        _, pk, pv = self.qkv(prompt).reshape(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,n,hd)
        per_sample = num_windows // B
        return pk.repeat_interleave(per_sample, dim=0), pv.repeat_interleave(per_sample, dim=0)  # (B_, H, n, hd)


def swin_blocks(model: SwinTransformer) -> List[Tuple[str, nn.Module]]:
    return [(f'layers.{s}.blocks.{j}', b) for s, stage in enumerate(model.layers) for j, b in enumerate(stage.blocks)]


def install_swin_prompt(model: SwinTransformer, blocks: List[Tuple[str, nn.Module]], backbone: Backbone,
                        config: CapaBoostConfig) -> None:
    """One bank per stage (one width each); every window attention of a stage reads its block's rows."""
    banks = []
    for s, stage in enumerate(model.layers):
        qkv = stage.blocks[0].attn.qkv
        dim = qkv.in_features
        bound = vpt_init_bound(model.patch_embed.patch_size, dim)
        banks.append(PromptBank(len(stage.blocks), dim, config, f'capaboost_prompt.banks.{s}', bound,
                                device=qkv.weight.device, dtype=qkv.weight.dtype))
    deep_prompt = DeepPrompt(banks)
    model.capaboost_prompt = deep_prompt
    for s, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            block.attn.capaboost_base_class = type(block.attn)  # what disable_adapters runs instead
            block.attn.__class__ = PromptedWindowAttention
            attach_bank(block.attn, deep_prompt.banks[s], j)
    name_banks_first(model)


SWIN = register_backbone(Backbone('swin', SwinTransformer, swin_blocks, (SwinTransformerBlock,), 'Swin'))
register_installer('swin', 'adapter', adapter_installer({SwinTransformerBlock: AdapterSwinBlock}))
register_installer('swin', 'prompt', install_swin_prompt)
register_mixed_layer(PromptedWindowAttention, MixedPromptedWindowAttention)

_ARGS = {
    'swin_tiny': dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'swin_small': dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'swin_base': dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

_BASE_WEIGHTS = {family: f'{family}_patch4_window7_224.ms_in22k' for family in _ARGS}

default_cfgs = generate_default_cfgs({
    f'{family}_capaboost_{form}.ms_in22k': base_cfg(base, ['arXiv:2103.14030']) for family, base in _BASE_WEIGHTS.items() for form in FORMS
})


def _create(variant: str, pretrained: bool, **kwargs) -> SwinTransformer:
    family = variant.split('_capaboost_')[0]
    return create_capaboost(_create_swin_transformer, variant, _BASE_WEIGHTS[family], pretrained,
                            **dict(_ARGS[family], **kwargs))


# swin_tiny_capaboost_lora, ..., swin_base_capaboost_prompt: one per family and form
globals().update(register_entry_points(__name__, _ARGS, _create))
