"""CapaBoost-LoRA: a LoRA ``nn.Linear`` whose update is the sum of d masked copies of one shared (A, B).

    y = x W0^T + b + c (alpha/r) * sum_i x (A⊙M^A_i)^T (B⊙M^B_i)^T = x W0^T + b + c (alpha/r) * x A_cat^T B_cat^T

with A_cat = [A⊙M^A_1; ...; A⊙M^A_d] (d*r x in) and B_cat = [B⊙M^B_1 | ... | B⊙M^B_d] (out x d*r): one rank-d*r
product, so the stored parameters are those of a rank-r LoRA while rank(ΔW) reaches d*r. c is 1 (official code) or
1/(d*rho^2) with ``mask_scaling='expected'``. Gradients on the shared
(A, B) are automatically the sum of the per-branch masked gradients (the official tied-copies semantics).
Being an ``nn.Linear`` subclass (as in microsoft/loralib), the base ``weight``/``bias`` names never change.

``use_dora`` (DoRA, Liu et al. 2024, arXiv:2402.09353, on the masked-branch sum): y = m ⊙ (W0 + ΔW) x / ||W0 + ΔW||
+ b, the norm per output row and detached from the graph (DoRA's section 4.3, as HF PEFT), the magnitude m
(unmasked, initialised to ||W0||) trained with A and B. Still one linear map, so it still merges.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import Backbone
from .config import CapaBoostConfig
from .forms import ANY_FAMILY, Form, register_form, register_installer, register_mixed_layer, sample_rows
from .masks import adapter_dtype, apply_masks, make_masks, masks_needed


def lora_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, mask_A: Optional[torch.Tensor],
                 mask_B: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A_cat (d*r, in), B_cat (out, d*r)), the concatenated masked branches of one adapter's factors; A and B
    themselves where nothing is masked (no masks)."""
    if mask_A is not None and mask_B is not None:
        return (lora_A.unsqueeze(0) * mask_A).flatten(0, 1), apply_masks(lora_B, mask_B)  # (d, r, in) -> (d*r, in)
    return lora_A, lora_B


class CapaBoostLoRALinear(nn.Linear):
    """LoRA linear layer with ``num_masks`` static masked branches of one shared rank-r pair (A, B)."""

    __constants__ = ['use_dora', 'masked']  # TorchScript compiles only the branches this layer takes

    def __init__(self, base: nn.Linear, config: CapaBoostConfig, name: str) -> None:
        out_features, in_features = base.weight.shape
        if config.rank > min(in_features, out_features):
            raise ValueError(
                f'rank={config.rank} is invalid for {name} ({in_features}->{out_features}): '
                f'it must be at most {min(in_features, out_features)}')
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = base.weight, base.bias  # shared with the base layer: same names, no copy
        self.rank, self.num_masks, self.scaling = config.rank, config.num_masks, config.scaling
        dd = dict(device=base.weight.device, dtype=adapter_dtype(base.weight.dtype, config.autocast_adapter_dtype))
        self.lora_A = nn.Parameter(torch.empty(config.rank, in_features, **dd))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, **dd))  # zero: output = base at init
        if config.lora_init == 'peft':  # loralib/PEFT: U(+-1/sqrt(in))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:  # the official CapaBoost code: U(+-1/sqrt(r)), ~sqrt(in/r) times larger
            nn.init.uniform_(self.lora_A, -1 / math.sqrt(config.rank), 1 / math.sqrt(config.rank))
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.masked = masks_needed(config.num_masks, config.mask_density)  # plain LoRA (d = 1, rho = 1): no masks
        if self.masked:
            masks = dict(num_masks=config.num_masks, density=config.mask_density, mask_type=config.mask_type,
                         nm=config.nm, seed=config.seed)
            # each factor's masks have its reduction dim last (N:M groups run along it): A (r, in), B (out, r)
            mask_a = make_masks((config.rank, in_features), name=f'{name}.lora_A', **masks)  # (d, r, in)
            mask_b = make_masks((out_features, config.rank), name=f'{name}.lora_B', **masks)  # (d, out, r)
            self.register_buffer('lora_mask_A', mask_a.to(dd['device']))  # (d, r, in)
            self.register_buffer('lora_mask_B', mask_b.permute(1, 0, 2).contiguous().to(dd['device']))  # (out, d, r)
        self.use_dora = config.use_dora
        self.capaboost_base_class = nn.Linear  # what disable_adapters runs instead: the plain linear
        if self.use_dora:  # ||W0|| per output row: the model starts as the base model
            self.lora_magnitude = nn.Parameter(torch.linalg.vector_norm(base.weight.detach().to(dd['dtype']), dim=1))

    def masked_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat): A_cat (d*r, in), B_cat (out, d*r), the concatenated masked branches (plain LoRA: A, B)."""
        if not self.masked:
            return self.lora_A, self.lora_B
        return lora_factors(self.lora_A, self.lora_B, self.lora_mask_A, self.lora_mask_B)

    def delta_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """ΔW = (alpha/r) * B_cat A_cat, shape (out, in): the low-rank update (with ``use_dora``, before the
        magnitude and the row normalisation), computed in ``dtype`` (default: the factors' own; float64 for rank
        diagnostics, so float32 rounding does not pose as extra rank)."""
        a_cat, b_cat = self.masked_factors()
        if dtype is not None:
            a_cat, b_cat = a_cat.to(dtype), b_cat.to(dtype)
        return self.scaling * b_cat @ a_cat

    def dora_scale(self, delta: torch.Tensor) -> torch.Tensor:
        """m / ||W0 + ΔW|| per output row (out,), the norm detached (DoRA, HF PEFT)."""
        norm = torch.linalg.vector_norm(self.weight.to(delta.dtype) + delta, dim=1).detach()
        return self.lora_magnitude / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_cat, b_cat = self.masked_factors()
        # scaling folded into the small factor rather than the (tokens x out) result
        update = F.linear(F.linear(self.lora_dropout(x).to(a_cat.dtype), a_cat), b_cat * self.scaling)
        if not self.use_dora:
            out = F.linear(x, self.weight, self.bias)
            return out + update.to(out.dtype)
        out = F.linear(x, self.weight)
        scale = self.dora_scale(self.scaling * b_cat @ a_cat)  # (out,)
        out = (scale * (out.to(update.dtype) + update)).to(out.dtype)
        return out if self.bias is None else out + self.bias

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ΔW folded into the base weight."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight = self.weight.float() + self.delta_weight().float()  # folded in fp32
            if self.use_dora:
                weight = self.dora_scale(self.delta_weight()).float().unsqueeze(1) * weight
            merged.weight.copy_(weight)
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        merged.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            merged.bias.requires_grad_(self.bias.requires_grad)
        return merged

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, rank={self.rank}, num_masks={self.num_masks}, dora={self.use_dora}, '
                f'scaling={self.scaling:g}, max_rank={min(self.num_masks * self.rank, self.in_features, self.out_features)}')


class MixedLoRALinear(CapaBoostLoRALinear):
    """A CapaBoostLoRALinear during a mixed batch (``multi``; the class is swapped in for one forward): each group of
    samples gets its own adapter's low-rank update on the one shared base product. ``capaboost_groups``: [(sample
    indices, {tensor name: that adapter's tensor})]."""

    capaboost_groups: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
    capaboost_batch: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the base product once for the whole batch, (rows, ..., out); each group's update added to its rows in place
        out = F.linear(x, self.weight, None if self.use_dora else self.bias)
        for samples, t in self.capaboost_groups:
            idx = sample_rows(samples, x.shape[0], self.capaboost_batch)
            a_cat, b_cat = lora_factors(t['lora_A'], t['lora_B'], t.get('lora_mask_A'), t.get('lora_mask_B'))
            update = F.linear(F.linear(self.lora_dropout(x[idx]).to(a_cat.dtype), a_cat), b_cat * self.scaling)
            if not self.use_dora:
                out.index_add_(0, idx, update.to(out.dtype))
                continue
            norm = torch.linalg.vector_norm(self.weight.to(update.dtype) + self.scaling * b_cat @ a_cat, dim=1)
            group = t['lora_magnitude'] / norm.detach() * (out[idx].to(update.dtype) + update)  # m / ||W0 + dW||
            out = out.index_copy(0, idx, group.to(out.dtype))
        return out if not self.use_dora or self.bias is None else out + self.bias


def install_lora(model: nn.Module, blocks: List[Tuple[str, nn.Module]], backbone: Backbone,
                 config: CapaBoostConfig) -> None:
    """Replace every target linear of every block (the family's ``lora_linears`` of each target) by a
    CapaBoostLoRALinear sharing its weight (all built first)."""
    planned = []
    for block_name, block in blocks:
        for target in config.target_modules:
            for linear in backbone.lora_linears(block, target):
                parent_name, attr = linear.rsplit('.', 1)
                parent = block.get_submodule(parent_name)
                planned.append((parent, attr, CapaBoostLoRALinear(getattr(parent, attr), config,
                                                                  f'{block_name}.{linear}')))
    for _, block in blocks:
        backbone.prepare_lora(block)
    for parent, attr, layer in planned:
        setattr(parent, attr, layer)


def lora_max_rank(model: nn.Module) -> int:
    """The largest rank a layer's update reaches: min(d*r, in, out)."""
    return max((min(m.num_masks * m.rank, m.in_features, m.out_features) for m in model.modules()
                if isinstance(m, CapaBoostLoRALinear)), default=0)


def fold_lora(model: nn.Module) -> None:
    """Replace every CapaBoostLoRALinear by the plain ``nn.Linear`` with its update folded in (``to_linear``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CapaBoostLoRALinear):
            parent_name, attr = name.rsplit('.', 1)
            setattr(model.get_submodule(parent_name), attr, module.to_linear())


def lora_delta_weights(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, int]]:
    """{layer: (ΔW in float64, min(d*r, in, out))} for every CapaBoostLoRALinear: float64 so float32 rounding does
    not pose as extra rank, without changing the module's dtype."""
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, CapaBoostLoRALinear):
                out[name] = (m.delta_weight(torch.float64), min(m.num_masks * m.rank, m.in_features, m.out_features))
    return out


register_form(Form('lora', lora_max_rank, ('rank', 'lora_alpha', 'target_modules'),
                   'CapaBoost-LoRA (attn.qkv by default)', param_prefixes=('lora_',), fold=fold_lora,
                   peft_type='LORA', delta_weights=lora_delta_weights))
register_mixed_layer(CapaBoostLoRALinear, MixedLoRALinear)
register_installer(ANY_FAMILY, 'lora', install_lora)  # every family: through its Backbone's lora_linears
