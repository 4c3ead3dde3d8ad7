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
stays as it was, and each block runs its own adapter: CapaBoost swaps the block's class for the subclass its family's
model file names (``adapter_installer({Block: AdapterBlock})``, registered for the family), whose forward is timm's
with the adapter added. Nothing is carried between modules
or calls, so the blocks script (TorchScript), trace (fx), compile and export as timm's do.
"""
import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import Backbone
from .config import CapaBoostConfig
from .forms import Form, Installer, register_form, register_mixed_layer, sample_rows
from .masks import adapter_dtype, apply_masks, make_masks, masks_needed


def adapter_weights(down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor, mask_down: Optional[torch.Tensor],
                    mask_up: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_down_cat (d*b, dim), b_down_cat (d*b,), W_up_cat (dim, d*b)) of one adapter's tensors; its own weights
    where nothing is masked (no masks)."""
    if mask_down is not None and mask_up is not None:
        down_cat = (down.unsqueeze(0) * mask_down).flatten(0, 1)  # (d, b, dim) -> (d*b, dim)
        return down_cat, down_bias.repeat(mask_down.shape[0]), apply_masks(up, mask_up)
    return down, down_bias, up


class CapaBoostAdapter(nn.Module):
    """Masked-branch bottleneck adapter with one shared (W_down, b_down, W_up, b_up)."""

    __constants__ = ['masked']  # TorchScript compiles only the branch this adapter takes

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
        self.masked = masks_needed(d, config.mask_density)  # the plain adapter (d = 1, rho = 1): no masks
        if self.masked:
            masks = dict(num_masks=d, density=config.mask_density, mask_type=config.mask_type, nm=config.nm,
                         seed=config.seed)
            mask_down = make_masks((b, dim), name=f'{name}.down_weight', **masks)  # (d, b, dim)
            mask_up = make_masks((dim, b), name=f'{name}.up_weight', **masks)  # (d, dim, b)
            self.register_buffer('mask_down', mask_down.to(device))  # (d, b, dim)
            self.register_buffer('mask_up', mask_up.permute(1, 0, 2).contiguous().to(device))  # (dim, d, b)

    def masked_weights(self):
        """(W_down_cat (d*b, dim), b_down_cat (d*b,), W_up_cat (dim, d*b)); the plain adapter's own weights."""
        if not self.masked:
            return self.down_weight, self.down_bias, self.up_weight
        return adapter_weights(self.down_weight, self.down_bias, self.up_weight, self.mask_down, self.mask_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, down_bias, up = self.masked_weights()
        branches = F.linear(self.act(F.linear(x.to(down.dtype), down, down_bias)), up)  # (..., dim): sum over d
        return (self.scale * (branches * self.branch_scale + self.up_bias)).to(x.dtype)

    def extra_repr(self) -> str:
        b, dim = self.down_weight.shape
        return f'dim={dim}, bottleneck={b}, num_masks={self.num_masks}, scale={self.scale}, placement={self.placement}'


class MixedAdapter(CapaBoostAdapter):
    """A CapaBoostAdapter during a mixed batch (``multi``; the class is swapped in for one forward): each group of
    samples through its own adapter's bottleneck. ``capaboost_groups``: [(sample indices, {tensor name: tensor})]."""

    capaboost_groups: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
    capaboost_batch: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)  # (rows, ..., dim): every sample is in one group
        for samples, t in self.capaboost_groups:
            idx = sample_rows(samples, x.shape[0], self.capaboost_batch)
            down, down_bias, up = adapter_weights(t['down_weight'], t['down_bias'], t['up_weight'], t.get('mask_down'),
                                                  t.get('mask_up'))
            branches = F.linear(self.act(F.linear(x[idx].to(down.dtype), down, down_bias)), up)
            out.index_copy_(0, idx, (self.scale * (branches * self.branch_scale + t['up_bias'])).to(x.dtype))
        return out


def adapter_installer(adapter_blocks: Mapping[type, type]) -> Installer:
    """The adapter form's installer for a family whose blocks run the adapter in their own forward:
    ``adapter_blocks`` maps each block type (exact: a subclass may have a forward of its own) to the subclass whose
    forward is timm's with the MLP's ``capaboost_adapter`` in it. The family's model file registers the result
    (``register_installer(family, 'adapter', adapter_installer({...}))``)."""
    def install_adapter(model: nn.Module, blocks: List[Tuple[str, nn.Module]], backbone: Backbone,
                        config: CapaBoostConfig) -> None:
        """Give every block's MLP a CapaBoostAdapter (all built first) and the block the class that runs it."""
        unknown = sorted({type(b).__name__ for _, b in blocks if type(b) not in adapter_blocks})
        if unknown:
            raise ValueError(f'the adapter form is not supported on {", ".join(unknown)} blocks: it runs in '
                             f'{", ".join(c.__name__ for c in adapter_blocks)} blocks')
        planned = []
        for block_name, block in blocks:
            ref = next(block.mlp.parameters())
            planned.append(CapaBoostAdapter(backbone.width(block), config, f'{block_name}.mlp.capaboost_adapter',
                                            device=ref.device, dtype=ref.dtype))
        for (_, block), adapter in zip(blocks, planned):
            block.mlp.capaboost_adapter = adapter
            block.capaboost_base_class = type(block)  # what disable_adapters runs instead
            block.__class__ = adapter_blocks[type(block)]  # timm's forward with the adapter in it
    return install_adapter


def adapter_max_rank(model: nn.Module) -> int:
    """The largest width the summed bottleneck reaches: d*b."""
    return max((m.num_masks * m.down_weight.shape[0] for m in model.modules()
                if isinstance(m, CapaBoostAdapter)), default=0)


register_form(Form('adapter', adapter_max_rank,
                   ('adapter_bottleneck', 'adapter_scale', 'adapter_placement'), 'CapaBoost-adapter',
                   cannot_fold='an adapter is a ReLU bottleneck, not linear in its input: it cannot be folded into '
                               'the weights'))
register_mixed_layer(CapaBoostAdapter, MixedAdapter)
