"""Rank diagnostics of learned LoRA updates: singular values of ΔW per adapted layer and its effective rank.

Two effective ranks: the entropy-based one (Roy & Vetterli 2007: exp of the entropy of the normalised singular
values) and the count of singular values above ``threshold`` times the largest.
"""
from typing import Dict, List

import torch
import torch.nn as nn

from .lora import CapaBoostLoRALinear


def singular_values(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{layer name: singular values of ΔW (float64, descending)} for every CapaBoost-LoRA layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, CapaBoostLoRALinear):
            with torch.no_grad():
                out[name] = torch.linalg.svdvals(_delta64(module))
    if not out:
        raise ValueError('the model has no CapaBoost-LoRA layers: rank diagnostics apply to method="lora"')
    return out


def _delta64(module: CapaBoostLoRALinear) -> torch.Tensor:
    """ΔW in float64 (so float32 rounding does not pose as extra rank), without changing the module's dtype."""
    a_cat, b_cat = module.masked_factors()
    return module.scaling * b_cat.double() @ a_cat.double()


def effective_rank(sv: torch.Tensor, threshold: float = 1e-3) -> Dict[str, float]:
    """Entropy-based effective rank and the number of singular values above threshold * max."""
    if float(sv.max()) == 0.0:
        return {'entropy': 0.0, 'threshold': 0}
    p = sv / sv.sum()
    p = p[p > 0]
    return {'entropy': float(torch.exp(-(p * p.log()).sum())), 'threshold': int((sv > threshold * sv.max()).sum())}


def rank_table(model: nn.Module, threshold: float = 1e-3) -> List[Dict[str, float]]:
    rows = []
    for name, sv in singular_values(model).items():
        module = model.get_submodule(name)
        rows.append({'layer': name, 'max_rank': min(module.num_masks * module.rank, *module.weight.shape),
                     **effective_rank(sv, threshold)})
    return rows
