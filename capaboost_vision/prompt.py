"""CapaBoost deep prompts (VPT-deep) for ViT and Swin.

The prompts of all blocks of one width, stacked, form a matrix P (blocks*n x dim). Plain VPT-deep learns P
directly. CapaBoost factorises it, P = c sum_i (U⊙M^U_i)(V⊙M^V_i)^T = c U_cat V_cat^T with U (blocks*n x r) and
V (dim x r) (c: ``CapaBoostConfig.branch_scale``), so P reaches rank d*r at the stored cost of rank r (masking P
itself would only rescale it). Each block computes its own n rows of P, (n x d*r) @ (d*r x dim): a product far
smaller than the block's attention, so inference costs plain VPT-deep.

Each block owns its prompts: nothing is carried from one block to the next, so any subset or order of block calls
works (gradient checkpointing recomputing one block, ``forward_intermediates``, ``prune_intermediate_layers``,
feature extraction).

- ViT: a block inserts its n prompt tokens after the prefix (class/register) tokens on entry and removes them
  on exit. That is VPT-deep exactly: VPT-deep discards a block's outputs at the prompt positions and puts the next
  block's prompts there, and drops them after the last block, so every block output has the usual tokens.
- Swin: each window attention gets its block's n prompts as extra keys/values (projected by the block's own
  frozen qkv), with zero relative-position bias and no shift mask for them.

CapaBoost swaps each ViT block's class for a subclass whose forward is timm's between the insertion and the removal,
and each Swin window attention's for ``PromptedWindowAttention`` (each family's model file in ``models/`` defines
them, and registers its prompt installer: ``forms.register_installer(family, 'prompt', ...)``), so every base
parameter name stays as it was. Each prompted module reaches its bank through its own subtree (a tied submodule, as tied weights are: TorchScript, fx and export need the path); the bank's one name stays
``capaboost_prompt.banks.<width group>``, listed first so ``named_parameters`` uses it, and state dicts hold it only
there.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import CapaBoostConfig
from .forms import Form, register_form, register_mixed_layer
from .masks import adapter_dtype, apply_masks, make_masks, masks_needed


def prompt_factors(prompt_U: torch.Tensor, prompt_V: torch.Tensor, mask_U: Optional[torch.Tensor],
                   mask_V: Optional[torch.Tensor], start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U_cat rows start:end (end - start, d*r), V_cat (dim, d*r)) of one adapter's factors; U and V themselves where
    nothing is masked (no masks)."""
    if mask_U is not None and mask_V is not None:
        return apply_masks(prompt_U[start:end], mask_U[start:end]), apply_masks(prompt_V, mask_V)
    return prompt_U[start:end], prompt_V


class PromptBank(nn.Module):
    """The stacked prompts of ``num_blocks`` blocks of width ``dim``: plain, or CapaBoost-factorised."""

    __constants__ = ['factorised', 'masked']  # TorchScript compiles only the form this bank has

    def __init__(self, num_blocks: int, dim: int, config: CapaBoostConfig, name: str, init_bound: float,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_blocks, self.length, self.dim = num_blocks, config.prompt_length, dim
        rows = num_blocks * config.prompt_length
        self.factorised, self.branch_scale = config.prompt_rank > 0, config.branch_scale
        self.num_masks = config.num_masks
        self.masked = self.factorised and masks_needed(config.num_masks, config.mask_density)  # d = 1, rho = 1: none
        self.dropout = nn.Dropout(config.prompt_dropout) if config.prompt_dropout > 0 else nn.Identity()
        dd = dict(device=device, dtype=adapter_dtype(dtype or torch.get_default_dtype(), config.autocast_adapter_dtype))
        if not self.factorised:  # plain VPT-deep: uniform init as in VPT
            self.prompt = nn.Parameter(torch.empty(rows, dim, **dd).uniform_(-init_bound, init_bound))
            return
        r, d, rho = config.prompt_rank, config.num_masks, config.mask_density
        if r > min(rows, dim):
            raise ValueError(f'prompt_rank={r} is invalid for {name} ({rows}x{dim} prompts): '
                             f'it must be at most {min(rows, dim)}')
        # balanced factors whose product c * sum has VPT's prompt variance (bound^2 / 3) over ~d*r*rho^2 kept terms:
        # c^2 * d*r*rho^2 * std^4 = bound^2 / 3, with c = config.branch_scale
        std = (init_bound ** 2 / 3 / (self.branch_scale ** 2 * d * r * rho * rho)) ** 0.25
        self.prompt_U = nn.Parameter(torch.randn(rows, r, **dd) * std)
        self.prompt_V = nn.Parameter(torch.randn(dim, r, **dd) * std)
        if self.masked:
            masks = dict(num_masks=d, density=rho, mask_type=config.mask_type, nm=config.nm, seed=config.seed)
            mask_u = make_masks((rows, r), name=f'{name}.prompt_U', **masks)  # (d, rows, r)
            mask_v = make_masks((dim, r), name=f'{name}.prompt_V', **masks)  # (d, dim, r)
            self.register_buffer('mask_U', mask_u.permute(1, 0, 2).contiguous().to(device))  # (rows, d, r)
            self.register_buffer('mask_V', mask_v.permute(1, 0, 2).contiguous().to(device))  # (dim, d, r)

    def masked_factors(self, start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(U_cat rows start:end (end - start, d*r), V_cat (dim, d*r)); unmasked U and V where nothing is masked."""
        if not self.masked:
            return self.prompt_U[start:end], self.prompt_V
        return prompt_factors(self.prompt_U, self.prompt_V, self.mask_U, self.mask_V, start, end)

    def materialize(self) -> torch.Tensor:
        """The prompts, shape (num_blocks, n, dim)."""
        if not self.factorised:
            prompts = self.prompt
        else:
            u, v = self.masked_factors(0, self.num_blocks * self.length)
            prompts = u @ v.t()  # (rows, d*r) @ (d*r, dim) -> (rows, dim)
            if self.branch_scale != 1.0:
                prompts = prompts * self.branch_scale
        return prompts.view(self.num_blocks, self.length, self.dim)

    def max_rank(self) -> int:
        rows = self.num_blocks * self.length
        if not self.factorised:
            return min(rows, self.dim)
        return min(self.num_masks * self.prompt_U.shape[1], rows, self.dim)

    def block_prompts(self, index: int) -> torch.Tensor:
        """The (n, dim) prompts of block ``index`` (prompt dropout applied): its own rows of P, computed from
        nothing but the parameters (a block recomputed by gradient checkpointing needs nothing from other blocks)."""
        start, end = index * self.length, (index + 1) * self.length
        if not self.factorised:
            return self.dropout(self.prompt[start:end])
        u, v = self.masked_factors(start, end)
        prompts = u @ v.t()  # (n, d*r) @ (d*r, dim) -> (n, dim)
        return self.dropout(prompts * self.branch_scale if self.branch_scale != 1.0 else prompts)


class MixedPromptBank(PromptBank):
    """A PromptBank during a mixed batch (``multi``; the class is swapped in for one forward): a block's prompts per
    sample, (B, n, dim), each group of samples with its own adapter's. ``capaboost_groups``: [(sample indices,
    {tensor name: tensor})]; ``capaboost_batch``: B."""

    capaboost_groups: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
    capaboost_batch: int

    def block_prompts(self, index: int) -> torch.Tensor:
        start, end = index * self.length, (index + 1) * self.length
        out = None
        for idx, t in self.capaboost_groups:
            if self.factorised:
                u, v = prompt_factors(t['prompt_U'], t['prompt_V'], t.get('mask_U'), t.get('mask_V'), start, end)
                prompts = u @ v.t() * self.branch_scale  # (n, d*r) @ (d*r, dim) -> (n, dim)
            else:
                prompts = t['prompt'][start:end]
            prompts = self.dropout(prompts)
            out = prompts.new_zeros(self.capaboost_batch, *prompts.shape) if out is None else out
            out = out.index_copy(0, idx, prompts.expand(len(idx), -1, -1))  # (B, n, dim)
        return out


class DeepPrompt(nn.Module):
    """All prompt banks of a model (one per block width), registered in one place: ``capaboost_prompt.banks``."""

    def __init__(self, banks: List[PromptBank]) -> None:
        super().__init__()
        self.banks = nn.ModuleList(banks)


class BlockPrompts:
    """Mixin of the prompted modules: ``capaboost_prompts()`` is this module's (n, dim) rows of its bank."""

    capaboost_prompt_index: int

    def capaboost_prompts(self) -> torch.Tensor:
        return self.capaboost_prompt_bank.block_prompts(self.capaboost_prompt_index)


def attach_bank(module: nn.Module, bank: PromptBank, index: int) -> None:
    """Tie ``bank`` to the prompted ``module`` as ``capaboost_prompt_bank`` (the module's prompts are its rows
    ``index``), leaving the tied path out of state dicts, saved and loaded."""
    module.capaboost_prompt_bank = bank
    module.capaboost_prompt_index = index
    module.register_state_dict_post_hook(_leave_out_tied_bank)
    module.register_load_state_dict_post_hook(_tied_bank_is_not_missing)


def _leave_out_tied_bank(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + 'capaboost_prompt_bank.')]:
        del state_dict[key]


def _tied_bank_is_not_missing(module: nn.Module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if 'capaboost_prompt_bank' not in k.split('.')]


def name_banks_first(model: nn.Module) -> None:
    """Move ``capaboost_prompt`` to the front of the model's children: a tied module is named after its first path."""
    for name in [n for n in model._modules if n != 'capaboost_prompt']:
        model._modules[name] = model._modules.pop(name)


def vpt_init_bound(patch_size, dim: int) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch_area + dim))."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


def prompt_max_rank(model: nn.Module) -> int:
    """The largest rank of a bank's prompt matrix: min(d*r, rows, dim) (plain prompts: min(rows, dim))."""
    return max((m.max_rank() for m in model.modules() if isinstance(m, PromptBank)), default=0)


register_form(Form('prompt', prompt_max_rank, ('prompt_length', 'prompt_rank'),
                   'CapaBoost-prompt (factorised VPT-deep)',
                   cannot_fold='prompts add tokens to every block: they cannot be folded into the weights'))
register_mixed_layer(PromptBank, MixedPromptBank)
