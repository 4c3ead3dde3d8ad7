"""CapaBoost for timm's ``Eva`` family: DINOv3, EVA-02 and Perception Encoder.

Papers:
- Increasing Model Capacity for Free: A Simple Strategy for Parameter Efficient Fine-tuning (CapaBoost)
  - https://openreview.net/forum?id=7ub8hlR8pI (ICLR 2024)
- DINOv3 - https://arxiv.org/abs/2508.10104
- EVA-02: A Visual Representation for Neon Genesis - https://arxiv.org/abs/2303.11331
- Perception Encoder: The best visual embeddings are not at the output of the network -
  https://arxiv.org/abs/2504.13181

What differs from timm's ``VisionTransformer``, and how each form deals with it, all in this file:

- LoRA. Where the attention has separate ``q_bias``/``k_bias``/``v_bias`` (EVA-02, DINOv3 ``_qkvb``), timm computes
  ``F.linear(x, qkv.weight, bias=cat(q_bias, k_bias, v_bias))`` and never calls ``qkv``, so a LoRA layer there would
  never run. ``prepare_lora`` sets timm's own ``qkv_bias_separate`` switch, ``qkv(x) + cat(biases)``: the same sum,
  with ``qkv`` called. ``attn.qkv`` means the separate ``q_proj``/``k_proj``/``v_proj`` where the attention has
  them (EVA-02 base), and ``mlp.fc1`` a SwiGLU's two input linears ``fc1_g``/``fc1_x``.
- Adapter: beside the MLP, outside the block's LayerScale ``gamma_2`` and drop-path (as for ViT).
- Prompts: inserted after the prefix (class/register) tokens; the attention's ``num_prefix_tokens`` counts them
  too, so RoPE still rotates exactly the patch tokens with the grid it was given.

The pretrained tags are the bases' own (DINOv3 ``lvd1689m``, EVA-02 ``mim_in22k``, PE ``fb``), built by timm's own
entry points; CapaBoost is applied on top.
"""
from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, model_entrypoint
from timm.models.eva import Eva, EvaBlock

from ..backbones import Backbone, register_backbone
from ..config import CapaBoostConfig
from ..adapter import adapter_installer
from ..forms import FORMS, register_installer
from ..lora import CapaBoostLoRALinear
from ..prompt import DeepPrompt, PromptBank, attach_bank, name_banks_first, vpt_init_bound
from ._builder import base_cfg, create_capaboost, register_entry_points
from .vision_transformer_capaboost import PromptedVitTokens


class AdapterEvaBlock(EvaBlock):
    """timm's ``EvaBlock`` with its MLP's CapaBoost adapter: sequential inside the MLP branch, parallel beside it
    (outside ``gamma_2`` and drop-path)."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        h = self.norm2(x)
        if self.mlp.capaboost_adapter.placement == 'parallel':
            return x + self.drop_path2(self.layer_scale2(self.mlp(h))) + self.mlp.capaboost_adapter(h)
        y = self.mlp(h)
        return x + self.drop_path2(self.layer_scale2(y + self.mlp.capaboost_adapter(y)))

    def layer_scale2(self, y: torch.Tensor) -> torch.Tensor:
        """The MLP branch as the block adds it: times LayerScale ``gamma_2`` where the block has one."""
        return y if self.gamma_2 is None else self.gamma_2 * y


class PromptedEvaBlock(PromptedVitTokens, EvaBlock):
    """timm's ``EvaBlock`` with its VPT-deep prompts after the prefix tokens (its attention counts them as prefix:
    no RoPE on them)."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.insert_prompts(x, attn_mask, is_causal)
        x_attn = self.attn(self.norm1(x), rope=rope)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        x = x + self.drop_path2(y)
        return self.remove_prompts(x)


def eva_blocks(model: Eva) -> List[Tuple[str, nn.Module]]:
    return [(f'blocks.{i}', b) for i, b in enumerate(model.blocks)]


def eva_lora_linears(block: EvaBlock, target: str) -> Tuple[str, ...]:
    """'attn.qkv': the fused projection, or the separate q/k/v ones; 'mlp.fc1': a SwiGLU's two input linears."""
    if target == 'attn.qkv' and block.attn.qkv is None:
        return 'attn.q_proj', 'attn.k_proj', 'attn.v_proj'
    if target == 'mlp.fc1' and not hasattr(block.mlp, 'fc1'):
        return 'mlp.fc1_g', 'mlp.fc1_x'
    return (target,)


def eva_prepare_lora(block: EvaBlock) -> None:
    """Make an attention with separate q/k/v biases call ``qkv`` (timm's ``qkv_bias_separate``: ``qkv(x) + bias``)
    instead of reading ``qkv.weight`` in ``F.linear``, which would bypass the LoRA layer."""
    if getattr(block.attn, 'q_bias', None) is not None and block.attn.qkv is not None:
        block.attn.qkv_bias_separate = True


def eva_peft_blocker(model: Eva) -> str:
    """Where the attention has q/k/v biases, the plain base reads ``qkv.weight`` in ``F.linear``: a stock PEFT LoRA
    layer at ``attn.qkv`` would never be called."""
    if any(isinstance(m, CapaBoostLoRALinear) and n.endswith('attn.qkv') for n, m in model.named_modules()) and \
            any(getattr(b.attn, 'q_bias', None) is not None for b in model.blocks):
        return ('its attention adds q/k/v biases in F.linear(x, qkv.weight, ...), so stock PEFT\'s LoRA at attn.qkv '
                'would never run in the plain timm model; use merge() for a plain timm model instead')
    return ''


def eva_width(block: EvaBlock) -> int:
    return block.norm2.weight.shape[0]


def install_eva_prompt(model: Eva, blocks: List[Tuple[str, nn.Module]], backbone: Backbone,
                       config: CapaBoostConfig) -> None:
    """One bank for all blocks, its tokens after the prefix tokens of every block, counted as prefix by the
    attention (RoPE rotates the patch tokens only, as without prompts)."""
    p = model.patch_embed.proj.weight
    bound = vpt_init_bound(model.patch_embed.patch_size, model.embed_dim)
    deep_prompt = DeepPrompt([PromptBank(len(model.blocks), model.embed_dim, config, 'capaboost_prompt.banks.0',
                                         bound, device=p.device, dtype=p.dtype)])
    model.capaboost_prompt = deep_prompt
    for i, block in enumerate(model.blocks):
        block.capaboost_base_class = type(block)  # what disable_adapters runs instead, with the attention's own count
        block.attn.capaboost_base_attrs = {'num_prefix_tokens': model.num_prefix_tokens}
        block.__class__ = PromptedEvaBlock
        block.capaboost_num_prefix = model.num_prefix_tokens
        block.attn.num_prefix_tokens = model.num_prefix_tokens + config.prompt_length
        attach_bank(block, deep_prompt.banks[0], i)
    name_banks_first(model)


EVA = register_backbone(Backbone('eva', Eva, eva_blocks, (EvaBlock,),
                                 'DINOv3, EVA-02, Perception Encoder', lora_linears=eva_lora_linears,
                                 prepare_lora=eva_prepare_lora, width=eva_width, peft_blocker=eva_peft_blocker))
register_installer('eva', 'adapter', adapter_installer({EvaBlock: AdapterEvaBlock}))
register_installer('eva', 'prompt', install_eva_prompt)

_BASE_WEIGHTS = {
    'vit_small_dinov3': 'vit_small_patch16_dinov3.lvd1689m',
    'vit_small_dinov3_qkvb': 'vit_small_patch16_dinov3_qkvb.lvd1689m',
    'vit_base_dinov3': 'vit_base_patch16_dinov3.lvd1689m',
    'vit_base_dinov3_qkvb': 'vit_base_patch16_dinov3_qkvb.lvd1689m',
    'eva02_tiny': 'eva02_tiny_patch14_224.mim_in22k',
    'eva02_small': 'eva02_small_patch14_224.mim_in22k',
    'eva02_base': 'eva02_base_patch14_224.mim_in22k',
    'vit_pe_core_tiny': 'vit_pe_core_tiny_patch16_384.fb',
    'vit_pe_core_small': 'vit_pe_core_small_patch16_384.fb',
    'vit_pe_core_base': 'vit_pe_core_base_patch16_224.fb',
}
_PAPERS = {'dinov3': 'arXiv:2508.10104', 'eva02': 'arXiv:2303.11331', 'pe_core': 'arXiv:2504.13181'}

default_cfgs = generate_default_cfgs({
    f'{family}_capaboost_{form}.{base.split(".")[1]}': base_cfg(base, [p for k, p in _PAPERS.items() if k in family])
    for family, base in _BASE_WEIGHTS.items() for form in FORMS
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> Eva:
    base = _BASE_WEIGHTS[variant.split('_capaboost_')[0]]

    def create_base(_: str, pretrained: bool, **base_kwargs: Any) -> Eva:
        """The base by timm's own entry point (its architecture arguments live there), named as our variant: a
        pushed config.json must rebuild the CapaBoost model, not the plain base."""
        model = model_entrypoint(base.split('.')[0])(pretrained=pretrained, **base_kwargs)
        model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, architecture=variant)
        return model

    return create_capaboost(create_base, variant, base, pretrained, **kwargs)


# vit_small_dinov3_capaboost_lora, eva02_base_capaboost_adapter, vit_pe_core_tiny_capaboost_prompt, ...
globals().update(register_entry_points(__name__, _BASE_WEIGHTS, _create))
