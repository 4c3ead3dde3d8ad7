"""CapaBoost bottleneck adapter beside (or after) a transformer block's MLP.

AdaptFormer-style parallel adapter (the CapaBoost paper's "PAdapter"), added to the residual stream:

    x = x + drop_path(ls2(mlp(norm2(x)))) + s * [ c sum_i (W_up⊙M^up_i) act((W_down⊙M^down_i) norm2(x) + b_down)
                                                   + b_up ]

outside the block's frozen LayerScale ``ls2`` and its drop-path, as AdaptFormer adds it: otherwise the frozen
per-channel gamma (0.2 to 11 in DINOv2) would set the adapter's scale and effective learning rate differently
in every block. c is 1 (official code) or 1/(d*rho^2) with ``mask_scaling='expected'``. The sum is computed as
ONE bottleneck of width d*b: W_down_cat = [W_down⊙M^down_1; ...] (d*b x dim), b_down repeated d times,
W_up_cat = [W_up⊙M^up_1 | ...] (dim x d*b); b_up is added once. The adapter reads the MLP's input (norm2(x)).

``placement='sequential'`` is part of the MLP branch by definition: mlp(x) + s * adapter(mlp(x)), inside it.

The adapter is attached as ``mlp.capaboost_adapter``, so every base parameter name (``blocks.0.mlp.fc1.weight``...)
stays as it was, and each block runs its own adapter: CapaBoost swaps the block's class for the subclass below that
matches it (``ADAPTER_BLOCKS``), whose forward is timm's with the adapter added. Nothing is carried between modules
or calls, so the blocks script (TorchScript), trace (fx), compile and export as timm's do.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block, ResPostBlock

from .config import CapaBoostConfig
from .masks import adapter_dtype, apply_masks, make_masks


class CapaBoostAdapter(nn.Module):
    """Masked-branch bottleneck adapter with one shared (W_down, b_down, W_up, b_up)."""

    def __init__(self, dim: int, config: CapaBoostConfig, name: str, device=None, dtype=None) -> None:
        super().__init__()
        b, d = config.adapter_bottleneck, config.num_masks
        if b > dim:
            raise ValueError(f'adapter_bottleneck={b} is invalid for {name} (width {dim}): it must be at most {dim}')
        self.num_masks, self.scale, self.placement = d, config.adapter_scale, config.adapter_placement
        self.branch_scale = config.branch_scale
        dd = dict(device=device, dtype=adapter_dtype(dtype or torch.get_default_dtype(), config.autocast_adapter_dtype))
        self.down_weight = nn.Parameter(torch.empty(b, dim, **dd))
        self.down_bias = nn.Parameter(torch.zeros(b, **dd))
        self.up_weight = nn.Parameter(torch.zeros(dim, b, **dd))  # zero: output = base at init
        self.up_bias = nn.Parameter(torch.zeros(dim, **dd))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.act = nn.ReLU()
        masks = dict(num_masks=d, density=config.mask_density, mask_type=config.mask_type, nm=config.nm,
                     seed=config.seed)
        mask_down = make_masks((b, dim), name=f'{name}.down_weight', **masks)  # (d, b, dim)
        mask_up = make_masks((dim, b), name=f'{name}.up_weight', **masks)  # (d, dim, b)
        self.register_buffer('mask_down', mask_down.to(device))  # (d, b, dim)
        self.register_buffer('mask_up', mask_up.permute(1, 0, 2).contiguous().to(device))  # (dim, d, b)

    def masked_weights(self):
        """(W_down_cat (d*b, dim), b_down_cat (d*b,), W_up_cat (dim, d*b))."""
        down = (self.down_weight.unsqueeze(0) * self.mask_down).flatten(0, 1)  # (d, b, dim) -> (d*b, dim)
        return down, self.down_bias.repeat(self.num_masks), apply_masks(self.up_weight, self.mask_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, down_bias, up = self.masked_weights()
        branches = F.linear(self.act(F.linear(x.to(down.dtype), down, down_bias)), up)  # (..., dim): sum over d
        return (self.scale * (branches * self.branch_scale + self.up_bias)).to(x.dtype)

    def extra_repr(self) -> str:
        b, dim = self.down_weight.shape
        return f'dim={dim}, bottleneck={b}, num_masks={self.num_masks}, scale={self.scale}, placement={self.placement}'


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


# the class CapaBoost swaps in for each supported timm block (exact types: a subclass may have its own forward)
ADAPTER_BLOCKS = {Block: AdapterBlock, ResPostBlock: AdapterResPostBlock, SwinTransformerBlock: AdapterSwinBlock}
