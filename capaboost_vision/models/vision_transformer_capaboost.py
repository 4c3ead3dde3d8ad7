"""CapaBoost Vision Transformers (ViT, DINOv2 ViT-S/14) for timm.

Papers:
- Increasing Model Capacity for Free: A Simple Strategy for Parameter Efficient Fine-tuning (CapaBoost)
  - https://openreview.net/forum?id=7ub8hlR8pI (ICLR 2024)
- An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale - https://arxiv.org/abs/2010.11929
- DINOv2: Learning Robust Visual Features without Supervision - https://arxiv.org/abs/2304.07193
- LoRA - https://arxiv.org/abs/2106.09685; AdaptFormer - https://arxiv.org/abs/2205.13535;
  Visual Prompt Tuning - https://arxiv.org/abs/2203.12119

Pretrained tags mirror the VTAB-standard base weights (ImageNet-21k: ``orig_in21k`` where timm has it, else
``augreg_in21k``); the weights are timm's own, loaded through its usual resolution, and CapaBoost is applied on
top. Use ``pretrained_cfg_overlay=dict(file=...)`` for a local base checkpoint.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from ..config import METHODS
from ._builder import base_cfg, create_capaboost

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

default_cfgs = generate_default_cfgs({
    f'{family}_capaboost_{method}.{base.split(".")[1]}': base_cfg(base)
    for family, base in _BASE_WEIGHTS.items() for method in METHODS
})


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    family = variant.split('_capaboost_')[0]
    return create_capaboost(_create_vision_transformer, variant, pretrained, **dict(_ARGS[family], **kwargs))


@register_model
def vit_tiny_capaboost_lora(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-LoRA (attn.qkv) on ViT tiny; frozen backbone."""
    return _create('vit_tiny_capaboost_lora', pretrained, **kwargs)


@register_model
def vit_tiny_capaboost_adapter(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-adapter on ViT tiny; frozen backbone."""
    return _create('vit_tiny_capaboost_adapter', pretrained, **kwargs)


@register_model
def vit_tiny_capaboost_prompt(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on ViT tiny; frozen backbone."""
    return _create('vit_tiny_capaboost_prompt', pretrained, **kwargs)


@register_model
def vit_small_capaboost_lora(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-LoRA (attn.qkv) on ViT small; frozen backbone."""
    return _create('vit_small_capaboost_lora', pretrained, **kwargs)


@register_model
def vit_small_capaboost_adapter(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-adapter on ViT small; frozen backbone."""
    return _create('vit_small_capaboost_adapter', pretrained, **kwargs)


@register_model
def vit_small_capaboost_prompt(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on ViT small; frozen backbone."""
    return _create('vit_small_capaboost_prompt', pretrained, **kwargs)


@register_model
def vit_base_capaboost_lora(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-LoRA (attn.qkv) on ViT base; frozen backbone."""
    return _create('vit_base_capaboost_lora', pretrained, **kwargs)


@register_model
def vit_base_capaboost_adapter(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-adapter on ViT base; frozen backbone."""
    return _create('vit_base_capaboost_adapter', pretrained, **kwargs)


@register_model
def vit_base_capaboost_prompt(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on ViT base; frozen backbone."""
    return _create('vit_base_capaboost_prompt', pretrained, **kwargs)


@register_model
def vit_large_capaboost_lora(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-LoRA (attn.qkv) on ViT large; frozen backbone."""
    return _create('vit_large_capaboost_lora', pretrained, **kwargs)


@register_model
def vit_large_capaboost_adapter(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-adapter on ViT large; frozen backbone."""
    return _create('vit_large_capaboost_adapter', pretrained, **kwargs)


@register_model
def vit_large_capaboost_prompt(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on ViT large; frozen backbone."""
    return _create('vit_large_capaboost_prompt', pretrained, **kwargs)


@register_model
def vit_small_dinov2_capaboost_lora(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-LoRA (attn.qkv) on ViT small dinov2; frozen backbone."""
    return _create('vit_small_dinov2_capaboost_lora', pretrained, **kwargs)


@register_model
def vit_small_dinov2_capaboost_adapter(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-adapter on ViT small dinov2; frozen backbone."""
    return _create('vit_small_dinov2_capaboost_adapter', pretrained, **kwargs)


@register_model
def vit_small_dinov2_capaboost_prompt(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """CapaBoost-prompt (factorised VPT-deep) on ViT small dinov2; frozen backbone."""
    return _create('vit_small_dinov2_capaboost_prompt', pretrained, **kwargs)
