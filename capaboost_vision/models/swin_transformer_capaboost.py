"""CapaBoost Swin Transformers for timm.

Papers:
- Increasing Model Capacity for Free: A Simple Strategy for Parameter Efficient Fine-tuning (CapaBoost)
  - https://openreview.net/forum?id=7ub8hlR8pI (ICLR 2024)
- Swin Transformer: Hierarchical Vision Transformer using Shifted Windows - https://arxiv.org/abs/2103.14030

Pretrained tags mirror the VTAB-standard base weights (``ms_in22k``), loaded through timm's usual resolution.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, _create_swin_transformer

from ..config import METHODS
from ._builder import base_cfg, create_capaboost

_ARGS = {
    'swin_tiny': dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'swin_small': dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'swin_base': dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

default_cfgs = generate_default_cfgs({
    f'{family}_capaboost_{method}.ms_in22k': base_cfg(f'{family}_patch4_window7_224.ms_in22k')
    for family in _ARGS for method in METHODS
})


def _create(variant: str, pretrained: bool, **kwargs) -> SwinTransformer:
    family = variant.split('_capaboost_')[0]
    return create_capaboost(_create_swin_transformer, variant, pretrained, **dict(_ARGS[family], **kwargs))


@register_model
def swin_tiny_capaboost_lora(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-LoRA (attn.qkv) on Swin tiny; frozen backbone."""
    return _create('swin_tiny_capaboost_lora', pretrained, **kwargs)


@register_model
def swin_tiny_capaboost_adapter(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-adapter on Swin tiny; frozen backbone."""
    return _create('swin_tiny_capaboost_adapter', pretrained, **kwargs)


@register_model
def swin_tiny_capaboost_prompt(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on Swin tiny; frozen backbone."""
    return _create('swin_tiny_capaboost_prompt', pretrained, **kwargs)


@register_model
def swin_small_capaboost_lora(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-LoRA (attn.qkv) on Swin small; frozen backbone."""
    return _create('swin_small_capaboost_lora', pretrained, **kwargs)


@register_model
def swin_small_capaboost_adapter(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-adapter on Swin small; frozen backbone."""
    return _create('swin_small_capaboost_adapter', pretrained, **kwargs)


@register_model
def swin_small_capaboost_prompt(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on Swin small; frozen backbone."""
    return _create('swin_small_capaboost_prompt', pretrained, **kwargs)


@register_model
def swin_base_capaboost_lora(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-LoRA (attn.qkv) on Swin base; frozen backbone."""
    return _create('swin_base_capaboost_lora', pretrained, **kwargs)


@register_model
def swin_base_capaboost_adapter(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-adapter on Swin base; frozen backbone."""
    return _create('swin_base_capaboost_adapter', pretrained, **kwargs)


@register_model
def swin_base_capaboost_prompt(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on Swin base; frozen backbone."""
    return _create('swin_base_capaboost_prompt', pretrained, **kwargs)
