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

CapaBoost swaps each ViT block's class for the subclass below that matches it (``PROMPTED_VIT_BLOCKS``: timm's
forward between the insertion and the removal) and each Swin window attention's for ``PromptedWindowAttention``,
so every base parameter name stays as it was. Each prompted module reaches its bank through its own subtree (a tied
submodule, as tied weights are: TorchScript, fx and export need the path); the bank's one name stays
``capaboost_prompt.banks.<width group>``, listed first so ``named_parameters`` uses it, and state dicts hold it only
there.
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Block, ResPostBlock

from .config import CapaBoostConfig
from .masks import adapter_dtype, apply_masks, make_masks


class PromptBank(nn.Module):
    """The stacked prompts of ``num_blocks`` blocks of width ``dim``: plain, or CapaBoost-factorised."""

    __constants__ = ['factorised']  # TorchScript compiles only the form this bank has

    def __init__(self, num_blocks: int, dim: int, config: CapaBoostConfig, name: str, init_bound: float,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_blocks, self.length, self.dim = num_blocks, config.prompt_length, dim
        rows = num_blocks * config.prompt_length
        self.factorised, self.branch_scale = config.prompt_rank > 0, config.branch_scale
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
        masks = dict(num_masks=d, density=rho, mask_type=config.mask_type, nm=config.nm, seed=config.seed)
        mask_u = make_masks((rows, r), name=f'{name}.prompt_U', **masks)  # (d, rows, r)
        mask_v = make_masks((dim, r), name=f'{name}.prompt_V', **masks)  # (d, dim, r)
        self.register_buffer('mask_U', mask_u.permute(1, 0, 2).contiguous().to(device))  # (rows, d, r)
        self.register_buffer('mask_V', mask_v.permute(1, 0, 2).contiguous().to(device))  # (dim, d, r)

    def materialize(self) -> torch.Tensor:
        """The prompts, shape (num_blocks, n, dim)."""
        if not self.factorised:
            prompts = self.prompt
        else:
            # (rows, d*r) @ (d*r, dim) -> (rows, dim)
            prompts = apply_masks(self.prompt_U, self.mask_U) @ apply_masks(self.prompt_V, self.mask_V).t()
            if self.branch_scale != 1.0:
                prompts = prompts * self.branch_scale
        return prompts.view(self.num_blocks, self.length, self.dim)

    def max_rank(self) -> int:
        rows = self.num_blocks * self.length
        if not self.factorised:
            return min(rows, self.dim)
        return min(self.mask_U.shape[1] * self.prompt_U.shape[1], rows, self.dim)

    def block_prompts(self, index: int) -> torch.Tensor:
        """The (n, dim) prompts of block ``index`` (prompt dropout applied): its own rows of P, computed from
        nothing but the parameters (a block recomputed by gradient checkpointing needs nothing from other blocks)."""
        start, end = index * self.length, (index + 1) * self.length
        if not self.factorised:
            return self.dropout(self.prompt[start:end])
        # (n, d*r) @ (d*r, dim) -> (n, dim)
        prompts = apply_masks(self.prompt_U[start:end], self.mask_U[start:end]) @ apply_masks(self.prompt_V,
                                                                                            self.mask_V).t()
        return self.dropout(prompts * self.branch_scale if self.branch_scale != 1.0 else prompts)


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


def _name_banks_first(model: nn.Module) -> None:
    """Move ``capaboost_prompt`` to the front of the model's children: a tied module is named after its first path."""
    for name in [n for n in model._modules if n != 'capaboost_prompt']:
        model._modules[name] = model._modules.pop(name)


class PromptedVitTokens(BlockPrompts):
    """The ViT prompt tokens of one block: inserted after the prefix tokens on entry, removed on exit."""

    capaboost_num_prefix: int

    def insert_prompts(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        # a real mask or causal attention would not fit the prompt tokens (fx's placeholders for them are neither)
        if isinstance(attn_mask, torch.Tensor) or (isinstance(is_causal, bool) and is_causal):
            raise ValueError('capaboost prompt models do not support attn_mask/is_causal: the prompts change the '
                             'token count')
        p = self.capaboost_num_prefix  # (B, prefix + patches, dim) -> (B, prefix + n + patches, dim)
        prompts = self.capaboost_prompts().to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n, dim)
        return torch.cat([x[:, :p], prompts, x[:, p:]], dim=1)

    def remove_prompts(self, x: torch.Tensor) -> torch.Tensor:
        p = self.capaboost_num_prefix  # (B, prefix + n + patches, dim) -> (B, prefix + patches, dim)
        return torch.cat([x[:, :p], x[:, p + self.capaboost_prompt_bank.length:]], dim=1)


class PromptedBlock(PromptedVitTokens, Block):
    """timm's ViT ``Block`` with its VPT-deep prompts."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.insert_prompts(x, attn_mask, is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return self.remove_prompts(x)


class PromptedResPostBlock(PromptedVitTokens, ResPostBlock):
    """timm's ``ResPostBlock`` with its VPT-deep prompts."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = self.insert_prompts(x, attn_mask, is_causal)
        x = x + self.drop_path1(self.norm1(self.attn(x)))
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return self.remove_prompts(x)


# the class CapaBoost swaps in for each supported ViT block (exact types: a subclass may have its own forward)
PROMPTED_VIT_BLOCKS = {Block: PromptedBlock, ResPostBlock: PromptedResPostBlock}


class PromptedWindowAttention(BlockPrompts, WindowAttention):
    """timm's WindowAttention with the block's prompts as extra keys/values (zero bias, never masked)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        prompt = self.capaboost_prompts().to(x.dtype)  # (n, C)
        B_, N, C = x.shape
        n = prompt.shape[0]
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, H, N, hd)
        _, pk, pv = self.qkv(prompt).reshape(n, 3, self.num_heads, -1).permute(1, 2, 0, 3).unbind(0)  # (H, n, hd)
        k = torch.cat([pk.expand(B_, -1, -1, -1), k], dim=2)  # (B_, H, n+N, hd)
        v = torch.cat([pv.expand(B_, -1, -1, -1), v], dim=2)
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


def vpt_init_bound(patch_size, dim: int) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch_area + dim))."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


def build_vit_prompt(model: nn.Module, config: CapaBoostConfig) -> DeepPrompt:
    p = model.blocks[0].attn.qkv.weight
    bound = vpt_init_bound(model.patch_embed.patch_size, model.embed_dim)
    return DeepPrompt([PromptBank(len(model.blocks), model.embed_dim, config, 'capaboost_prompt.banks.0', bound,
                                  device=p.device, dtype=p.dtype)])


def install_vit_prompt(model: nn.Module, deep_prompt: DeepPrompt) -> None:
    model.capaboost_prompt = deep_prompt
    for i, block in enumerate(model.blocks):
        block.__class__ = PROMPTED_VIT_BLOCKS[type(block)]
        block.capaboost_num_prefix = model.num_prefix_tokens
        attach_bank(block, deep_prompt.banks[0], i)
    _name_banks_first(model)


def build_swin_prompt(model: nn.Module, config: CapaBoostConfig) -> DeepPrompt:
    banks = []
    for s, stage in enumerate(model.layers):
        qkv = stage.blocks[0].attn.qkv
        dim = qkv.in_features
        bound = vpt_init_bound(model.patch_embed.patch_size, dim)
        banks.append(PromptBank(len(stage.blocks), dim, config, f'capaboost_prompt.banks.{s}', bound,
                                device=qkv.weight.device, dtype=qkv.weight.dtype))
    return DeepPrompt(banks)


def install_swin_prompt(model: nn.Module, deep_prompt: DeepPrompt) -> None:
    model.capaboost_prompt = deep_prompt
    for s, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            block.attn.__class__ = PromptedWindowAttention
            attach_bank(block.attn, deep_prompt.banks[s], j)
    _name_banks_first(model)
