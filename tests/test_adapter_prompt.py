import copy

import pytest
import torch

from capaboost_vision import CapaBoostConfig, apply_capaboost, is_capaboost_key, merge, parameter_report
from capaboost_vision.adapter import CapaBoostAdapter
from capaboost_vision.models.swin_transformer_capaboost import PromptedWindowAttention
from capaboost_vision.prompt import PromptBank
from conftest import tiny_eva, tiny_swin, tiny_vit
from reference import naive_adapter, naive_prompts, naive_vpt_deep_vit, window_attention_with_prompts


@pytest.mark.parametrize('cfg', [dict(), dict(num_masks=3, mask_density=0.25), dict(mask_type='nm')])
def test_adapter_equals_naive_branch_sum_float64(cfg):
    adapter = CapaBoostAdapter(32, CapaBoostConfig(method='adapter', **cfg), 'a', dtype=torch.float64)
    with torch.no_grad():
        adapter.up_weight.normal_()
        adapter.up_bias.normal_()
        adapter.down_bias.normal_()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert torch.allclose(adapter(x), naive_adapter(adapter, x), atol=1e-10, rtol=0)
    with torch.no_grad():  # and without autograd
        assert torch.allclose(adapter(x), naive_adapter(adapter, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin, tiny_eva])
@pytest.mark.parametrize('placement', ['parallel', 'sequential'])
def test_adapter_model_equals_base_at_init_and_learns(make, placement):
    base = make().eval()
    model = apply_capaboost(copy.deepcopy(base), CapaBoostConfig(method='adapter', adapter_placement=placement))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), base(x))
    for name, p in model.named_parameters():
        assert p.requires_grad == ('capaboost_adapter' in name or name.startswith('head')), name
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).logsumexp(-1).sum().backward()
    opt.step()
    assert not torch.allclose(model.eval()(x), base(x))


@pytest.mark.parametrize('cfg', [dict(), dict(num_masks=3, mask_density=0.3, prompt_rank=2),
                                 dict(prompt_rank=0)])
def test_prompt_bank_equals_naive_branch_sum_float64(cfg):
    bank = PromptBank(4, 24, CapaBoostConfig(method='prompt', prompt_length=3, **cfg), 'b', 0.1,
                      dtype=torch.float64)
    assert torch.allclose(bank.materialize(), naive_prompts(bank), atol=1e-10, rtol=0)


def test_factorised_prompts_reach_rank_d_times_r():
    bank = PromptBank(6, 32, CapaBoostConfig(method='prompt', prompt_length=4, prompt_rank=3), 'b', 0.1,
                      dtype=torch.float64)
    assert torch.linalg.matrix_rank(bank.materialize().reshape(24, 32)) == 6 == bank.max_rank()


@pytest.mark.parametrize('cfg', [dict(), dict(prompt_rank=0), dict(num_masks=3, mask_density=0.4)])
def test_vit_prompt_model_equals_written_out_vpt_deep_float64(cfg):
    model = apply_capaboost(tiny_vit(reg_tokens=1).double(),
                            CapaBoostConfig(method='prompt', prompt_length=3, prompt_rank=cfg.pop('prompt_rank', 4),
                                            **cfg)).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = naive_vpt_deep_vit(model, x)
    assert torch.allclose(model(x), ref, atol=1e-10, rtol=0)
    with torch.no_grad():  # and without autograd, pass after pass
        assert torch.allclose(model(x), ref, atol=1e-10, rtol=0)
        assert torch.allclose(model(x), ref, atol=1e-10, rtol=0)


def test_swin_prompted_window_attention_equals_explicit_softmax_float64():
    model = apply_capaboost(tiny_swin().double(), CapaBoostConfig(method='prompt', prompt_length=3, prompt_rank=2)).eval()
    attn = model.layers[0].blocks[1].attn  # a shifted block
    assert isinstance(attn, PromptedWindowAttention)
    prompt = model.capaboost_prompt.banks[0].block_prompts(1)
    x = torch.randn(2 * 4, 16, 16, dtype=torch.float64)  # (batch * windows, window area, C)
    mask = torch.zeros(4, 16, 16, dtype=torch.float64)
    mask[1:, :8, 8:] = float('-inf')
    mask[1:, 8:, :8] = float('-inf')
    assert torch.allclose(attn(x, mask=mask), window_attention_with_prompts(attn, x, prompt, mask), atol=1e-10)
    assert torch.allclose(attn(x), window_attention_with_prompts(attn, x, prompt), atol=1e-10)


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin, tiny_eva])
def test_prompt_cache_is_invalidated_by_an_optimizer_step(make):
    model = apply_capaboost(make(), CapaBoostConfig(method='prompt', prompt_length=2, prompt_rank=2))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.eval()(x)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(x).logsumexp(-1).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, model(x), atol=1e-6)  # a grad-enabled pass agrees


def test_swin_prompt_model_trains_only_prompts_and_head():
    model = apply_capaboost(tiny_swin(), CapaBoostConfig(method='prompt', prompt_length=2, prompt_rank=2))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ['capaboost_prompt.banks.0.prompt_U', 'capaboost_prompt.banks.0.prompt_V',
                         'capaboost_prompt.banks.1.prompt_U', 'capaboost_prompt.banks.1.prompt_V',
                         'head.fc.bias', 'head.fc.weight']
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin, tiny_eva])
def test_prompt_banks_are_tied_to_their_blocks_and_saved_once(make):
    model = apply_capaboost(make(), CapaBoostConfig(method='prompt', prompt_length=2, prompt_rank=2))
    prompted = [m for m in model.modules() if hasattr(m, 'capaboost_prompt_index')]
    assert prompted and all(m.capaboost_prompt_bank in list(model.capaboost_prompt.banks) for m in prompted)
    names = [n for n, _ in model.named_parameters()] + list(model.state_dict())
    assert not [n for n in names if 'capaboost_prompt_bank' in n]  # one name per prompt tensor: the bank's own
    loaded = model.load_state_dict(model.state_dict())  # strict: nothing missing, nothing unexpected
    assert not loaded.missing_keys and not loaded.unexpected_keys
    copied = copy.deepcopy(model)  # the tie survives a copy: the copy's blocks use the copy's banks
    assert all(m.capaboost_prompt_bank in list(copied.capaboost_prompt.banks) for m in copied.modules()
               if hasattr(m, 'capaboost_prompt_index'))
    x = torch.randn(2, 3, 32, 32)
    fresh = {k: torch.randn_like(v) if 'prompt_' in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # new tensors in the bank: every block sees them
    copied.load_state_dict(fresh)
    assert torch.allclose(model.eval()(x), copied.eval()(x), atol=1e-6)


def test_vit_prompt_model_refuses_an_attention_mask_it_cannot_fit():
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(method='prompt', prompt_length=2, prompt_rank=2))
    x = torch.randn(1, 3, 32, 32)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    for kwargs in (dict(attn_mask=torch.zeros(1, 1, tokens, tokens)), dict(is_causal=True)):
        with pytest.raises(ValueError, match='do not support attn_mask/is_causal'):
            model(x, **kwargs)


@pytest.mark.parametrize('form', [dict(method='lora'), dict(method='adapter'), dict(method='prompt', prompt_rank=2)])
def test_a_form_with_nothing_masked_holds_no_masks_and_scripts(form):
    """One branch at density 1 (plain LoRA, the plain adapter, unmasked prompt factors): no all-ones masks held,
    counted or saved, and TorchScript compiles the unmasked branch only."""
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(**form, num_masks=1, mask_density=1.0)).eval()
    assert not [n for n, _ in model.named_buffers() if is_capaboost_key(n)]
    assert parameter_report(model).mask_entries == 0 and parameter_report(model).max_rank > 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-6)


@pytest.mark.parametrize('method, why', [('adapter', 'ReLU bottleneck'), ('prompt', 'add tokens')])
def test_a_form_that_cannot_merge_says_so_in_one_line(method, why):
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(method=method))
    with pytest.raises(ValueError, match=f'merge\\(\\): the {method} form cannot be merged: .*{why}'):
        merge(model)
