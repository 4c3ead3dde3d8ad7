"""Rank diagnostics of learned CapaBoost updates: singular values of ΔW per adapted layer and its effective rank.

The form says what its update is (``Form.delta_weights``); a form without a weight update (adapter, prompts) says
so in one line. Two effective ranks: the entropy-based one (Roy & Vetterli 2007: exp of the entropy of the
normalised singular values) and the count of singular values above ``threshold`` times the largest.
"""
from typing import Dict, List

import torch
import torch.nn as nn

from .forms import FORMS, form_of


def _delta_weights(model: nn.Module) -> Dict[str, tuple]:
    config = getattr(model, 'capaboost_config', None)
    if config is None:
        raise ValueError('the model has no CapaBoost applied: rank diagnostics apply to a CapaBoost model')
    form = form_of(config)
    if form.delta_weights is None:
        able = ', '.join(f.name for f in FORMS.values() if f.delta_weights is not None)
        raise ValueError(f'rank diagnostics: the {form.name} form has no weight update ΔW to take singular values of '
                         f'(forms with one: {able})')
    return form.delta_weights(model)


def singular_values(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{layer name: singular values of ΔW (float64, descending)} for every layer the form updates."""
    return {name: torch.linalg.svdvals(delta) for name, (delta, _) in _delta_weights(model).items()}


def effective_rank(sv: torch.Tensor, threshold: float = 1e-3) -> Dict[str, float]:
    """Entropy-based effective rank and the number of singular values above threshold * max."""
    if float(sv.max()) == 0.0:
        return {'entropy': 0.0, 'threshold': 0}
    p = sv / sv.sum()
    p = p[p > 0]
    return {'entropy': float(torch.exp(-(p * p.log()).sum())), 'threshold': int((sv > threshold * sv.max()).sum())}


def rank_table(model: nn.Module, threshold: float = 1e-3) -> List[Dict[str, float]]:
    """One row per updated layer: its name, the largest rank its update can reach and its effective ranks."""
    return [{'layer': name, 'max_rank': max_rank, **effective_rank(torch.linalg.svdvals(delta), threshold)}
            for name, (delta, max_rank) in _delta_weights(model).items()]
