"""mask_scaling='expected' against explicit d-branch sums (float64) with the factor 1/(d*rho^2) written out here;
adapter placement outside LayerScale and drop-path; the two LoRA inits."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from capaboost_vision import CapaBoostConfig, apply_capaboost
from capaboost_vision.adapter import CapaBoostAdapter
from capaboost_vision.lora import CapaBoostLoRALinear
from capaboost_vision.prompt import PromptBank
from conftest import tiny_vit, tiny_swin


@pytest.mark.parametrize('d, rho', [(2, 0.5), (3, 0.25), (4, 0.75)])
def test_lora_expected_scaling_equals_scaled_branch_sum_float64(d, rho):
    cfg = CapaBoostConfig(rank=4, lora_alpha=6.0, num_masks=d, mask_density=rho, mask_scaling='expected')
    layer = CapaBoostLoRALinear(torch.nn.Linear(24, 40, dtype=torch.float64), cfg, 'blocks.0.attn.qkv')
    with torch.no_grad():
        layer.lora_B.normal_()
    factor = 6.0 / 4 / (d * rho * rho)  # alpha/r / (d rho^2), independent of the implementation's properties
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    expected = F.linear(x, layer.weight, layer.bias)
    for i in range(d):
        a = layer.lora_A * layer.lora_mask_A[i]  # (r, in)
        b = layer.lora_B * layer.lora_mask_B[:, i]  # (out, r)
        expected = expected + factor * (x @ a.t()) @ b.t()
    assert torch.allclose(layer(x), expected, atol=1e-10, rtol=0)
    none = CapaBoostLoRALinear(torch.nn.Linear(24, 40, dtype=torch.float64),
                               CapaBoostConfig(rank=4, lora_alpha=6.0, num_masks=d, mask_density=rho), 'blocks.0.attn.qkv')
    none.load_state_dict(layer.state_dict())
    delta_none = none.delta_weight()
    assert torch.allclose(layer.delta_weight(), delta_none / (d * rho * rho), atol=1e-10, rtol=0)


def test_expected_scaling_matches_plain_lora_update_in_expectation():
    """Averaged over many mask draws, the 'expected' CapaBoost update equals plain LoRA's at the same (A, B)."""
    a, b = torch.randn(4, 24, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
    total = torch.zeros(40, 24, dtype=torch.float64)
    draws = 400
    for seed in range(draws):
        cfg = CapaBoostConfig(rank=4, lora_alpha=4.0, mask_scaling='expected', seed=seed)
        layer = CapaBoostLoRALinear(torch.nn.Linear(24, 40, dtype=torch.float64), cfg, 'q')
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        total += layer.delta_weight()
    plain = b @ a
    assert (total / draws - plain).abs().mean() < 0.15 * plain.abs().mean()


def test_adapter_expected_scaling_float64():
    cfg = CapaBoostConfig(method='adapter', num_masks=3, mask_density=0.4, mask_scaling='expected')
    adapter = CapaBoostAdapter(32, cfg, 'a', dtype=torch.float64)
    with torch.no_grad():
        for p in (adapter.up_weight, adapter.up_bias, adapter.down_bias):
            p.normal_()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out = 0
    for i in range(3):
        down, up = adapter.down_weight * adapter.mask_down[i], adapter.up_weight * adapter.mask_up[:, i]
        out = out + torch.relu(x @ down.t() + adapter.down_bias) @ up.t()
    expected = cfg.adapter_scale * (out / (3 * 0.4 ** 2) + adapter.up_bias)
    assert torch.allclose(adapter(x), expected, atol=1e-10, rtol=0)


def test_prompt_expected_scaling_float64_keeps_vpt_init_variance():
    cfg = CapaBoostConfig(method='prompt', prompt_length=4, prompt_rank=8, mask_scaling='expected')
    bank = PromptBank(12, 64, cfg, 'b', 0.1, dtype=torch.float64)
    p = 0
    for i in range(2):
        p = p + (bank.prompt_U * bank.mask_U[:, i]) @ (bank.prompt_V * bank.mask_V[:, i]).t()
    assert torch.allclose(bank.materialize(), (p / (2 * 0.25)).view(12, 4, 64), atol=1e-10, rtol=0)
    # the init is rescaled so the prompts keep VPT's variance bound^2/3 either way
    assert bank.materialize().var().item() == pytest.approx(0.1 ** 2 / 3, rel=0.35)


def test_plain_form_is_unaffected_by_expected_scaling():
    """d=1, rho=1: the factor is 1, so 'expected' is exactly the plain method."""
    cfg = CapaBoostConfig(num_masks=1, mask_density=1.0, mask_scaling='expected')
    assert cfg.branch_scale == 1.0 and cfg.scaling == cfg.lora_alpha / cfg.rank


def _adapter_contribution(model, x):
    """Model output with the adapter minus without it (the adapter's up-projection zeroed)."""
    with torch.no_grad():
        out = model(x)
        saved = {n: p.clone() for n, p in model.named_parameters() if 'capaboost_adapter' in n}
        for n, p in model.named_parameters():
            if 'capaboost_adapter.up' in n:
                p.zero_()
        base = model(x)
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    return out - base


def test_parallel_adapter_is_outside_layerscale():
    """A tiny frozen LayerScale gamma must not shrink the adapter's contribution (AdaptFormer placement)."""
    outs = []
    for gamma in (1e-4, 1.0):
        torch.manual_seed(0)
        base = tiny_vit(init_values=gamma, num_classes=0, global_pool='').double().eval()
        model = apply_capaboost(base, CapaBoostConfig(method='adapter', adapter_bottleneck=4)).double().eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if 'capaboost_adapter.up' in n:
                    p.normal_()
        torch.manual_seed(1)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        # the first block's adapter: its input norm2(x) barely depends on gamma, so its contribution must not
        # scale with gamma (inside ls2 it would be 1e4 times smaller)
        block = model.blocks[0]
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        with torch.no_grad():
            outs.append(_block_adapter_part(block, h))
    small, unit = outs
    assert small.abs().mean() > 0.1 * unit.abs().mean()  # inside ls2 it would be 1e-4 times unit


def _block_adapter_part(block, h):
    """The block's output with its adapter minus the same block with the adapter's up-projection zeroed."""
    adapter = block.mlp.capaboost_adapter
    out = block(h)
    saved = adapter.up_weight.clone(), adapter.up_bias.clone()
    adapter.up_weight.zero_()
    adapter.up_bias.zero_()
    plain = block(h)
    adapter.up_weight.copy_(saved[0])
    adapter.up_bias.copy_(saved[1])
    return out - plain


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
def test_parallel_adapter_bypasses_drop_path(make):
    """In train mode with drop-path 1.0 the MLP branch is dropped for every sample, the adapter's is not."""
    model = apply_capaboost(make(drop_path_rate=0.999).double(),
                            CapaBoostConfig(method='adapter', adapter_bottleneck=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'capaboost_adapter.up' in n:
                p.normal_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(0)
    model.train()
    contribution = _adapter_contribution(model, x)
    assert contribution.abs().mean() > 1e-3


def test_official_lora_init_bound():
    layer = CapaBoostLoRALinear(torch.nn.Linear(384, 1152), CapaBoostConfig(rank=8, lora_init='official'), 'q')
    bound = 1 / math.sqrt(8)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    peft = CapaBoostLoRALinear(torch.nn.Linear(384, 1152), CapaBoostConfig(rank=8), 'q')
    assert peft.lora_A.abs().max() <= 1 / math.sqrt(384) + 1e-6
    assert torch.count_nonzero(layer.lora_B) == 0 == torch.count_nonzero(peft.lora_B)


def test_new_settings_are_validated():
    with pytest.raises(ValueError, match='mask_scaling'):
        CapaBoostConfig(mask_scaling='half')
    with pytest.raises(ValueError, match='lora_init'):
        CapaBoostConfig(lora_init='xavier')
