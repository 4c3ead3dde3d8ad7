"""Independent reference implementations: explicit loops over the d masked branches, no concatenation."""
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def branch_mask(module, name: str, *index):
    """Branch ``index``'s mask of one factor (``mask[index]``); a layer with nothing masked (one branch at density 1)
    holds no masks: its one branch keeps every entry."""
    mask = getattr(module, name, None)
    return 1 if mask is None else mask[index]


def naive_lora_delta(layer) -> torch.Tensor:
    """ΔW = (alpha/r) * sum_i (B⊙M^B_i)(A⊙M^A_i), one branch at a time."""
    delta = torch.zeros_like(layer.weight)
    for i in range(layer.num_masks):
        a = layer.lora_A * branch_mask(layer, 'lora_mask_A', i)  # (r, in)
        b = layer.lora_B * branch_mask(layer, 'lora_mask_B', slice(None), i)  # (out, r)
        delta = delta + b @ a
    return layer.scaling * delta


def naive_lora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    out = F.linear(x, layer.weight, layer.bias)
    for i in range(layer.num_masks):
        a = layer.lora_A * branch_mask(layer, 'lora_mask_A', i)
        b = layer.lora_B * branch_mask(layer, 'lora_mask_B', slice(None), i)
        out = out + layer.scaling * (x @ a.t()) @ b.t()
    return out


def naive_adapter(adapter, x: torch.Tensor) -> torch.Tensor:
    out = 0
    for i in range(adapter.num_masks):
        down = adapter.down_weight * branch_mask(adapter, 'mask_down', i)
        up = adapter.up_weight * branch_mask(adapter, 'mask_up', slice(None), i)
        out = out + torch.relu(x @ down.t() + adapter.down_bias) @ up.t()
    return adapter.scale * (out * adapter.branch_scale + adapter.up_bias)


def naive_prompts(bank) -> torch.Tensor:
    if not bank.factorised:
        return bank.prompt.view(bank.num_blocks, bank.length, bank.dim)
    p = 0
    for i in range(bank.num_masks):
        u = bank.prompt_U * branch_mask(bank, 'mask_U', slice(None), i)
        p = p + u @ (bank.prompt_V * branch_mask(bank, 'mask_V', slice(None), i)).t()
    return (p * bank.branch_scale).view(bank.num_blocks, bank.length, bank.dim)


def naive_vpt_deep_vit(model, x: torch.Tensor) -> torch.Tensor:
    """VPT-deep written out: insert prompts after the prefix tokens before every block, drop them at the end."""
    prompts = naive_prompts(model.capaboost_prompt.banks[0])
    npt, n = model.num_prefix_tokens, prompts.shape[1]
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, block in enumerate(model.blocks):
        p = prompts[i].expand(h.shape[0], -1, -1)
        h = torch.cat([h[:, :npt], p, h[:, npt + (n if i else 0):]], dim=1)
        h = Block.forward(block, h)  # timm's own forward: not the prompted one under test
    h = torch.cat([h[:, :npt], h[:, npt + n:]], dim=1)
    return model.forward_head(model.norm(h))


def window_attention_with_prompts(attn, x, prompt, mask=None):
    """Swin window attention with prompt keys/values, written with an explicit softmax."""
    B_, N, C = x.shape
    H = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B_, N, 3, H, -1)
    pkv = F.linear(prompt, attn.qkv.weight, attn.qkv.bias).view(prompt.shape[0], 3, H, -1)
    q = qkv[:, :, 0].transpose(1, 2)  # (B_, H, N, hd)
    k = torch.cat([pkv[:, 1].transpose(0, 1).expand(B_, -1, -1, -1), qkv[:, :, 1].transpose(1, 2)], dim=2)
    v = torch.cat([pkv[:, 2].transpose(0, 1).expand(B_, -1, -1, -1), qkv[:, :, 2].transpose(1, 2)], dim=2)
    logits = q @ k.transpose(-1, -2) * attn.scale  # (B_, H, N, n+N)
    n = prompt.shape[0]
    bias = attn._get_rel_pos_bias()[0]  # (H, N, N)
    logits[..., n:] += bias
    if mask is not None:
        nw = mask.shape[0]
        logits = logits.view(B_ // nw, nw, H, N, n + N)
        logits[..., n:] += mask.view(1, nw, 1, N, N)
        logits = logits.view(B_, H, N, n + N)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def naive_dora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """DoRA on the explicit branch sum: m ⊙ (W0 + ΔW) x / ||W0 + ΔW|| (row norm, detached) + b."""
    weight = layer.weight + naive_lora_delta(layer)
    norm = weight.norm(dim=1, keepdim=True).detach()
    return F.linear(x, layer.lora_magnitude.unsqueeze(1) * weight / norm, layer.bias)
