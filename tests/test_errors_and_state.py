import copy

import pytest
import timm
import torch

from capaboost_vision import CapaBoostConfig, apply_capaboost, is_capaboost_key
from capaboost_vision.lora import CapaBoostLoRALinear
from conftest import tiny_swin, tiny_vit


@pytest.mark.parametrize('kwargs, match', [
    (dict(mask_density=0.0), 'mask_density=0.0 is invalid: must lie in \\(0, 1\\]'),
    (dict(mask_density=1.5), 'mask_density'),
    (dict(num_masks=0), 'num_masks=0 is invalid'),
    (dict(rank=0), 'rank=0 is invalid'),
    (dict(method='ia3'), "method='ia3' is invalid: choose one of lora, adapter, prompt"),
    (dict(target_modules=('attn.q',)), 'target_modules=.* choose from attn.qkv, attn.proj, mlp.fc1, mlp.fc2'),
    (dict(mask_type='block'), 'mask_type'),
    (dict(mask_type='nm', mask_density=0.3), 'must equal N/M'),
    (dict(method='adapter', adapter_placement='inside'), "adapter_placement='inside' is invalid: choose one of"),
    (dict(method='prompt', prompt_length=0), 'prompt_length=0 is invalid'),
    (dict(method='prompt', prompt_rank=-1), 'prompt_rank=-1 is invalid: an integer >= 1, or 0 for plain'),
    # another form's setting, at a value its form would read, is refused (at its default it is left out)
    (dict(method='adapter', rank=4), "rank applies to the lora form only; this method has form 'adapter'"),
    (dict(prompt_rank=-1), 'prompt_rank applies to the prompt form only'),
])
def test_bad_settings_raise_value_error_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CapaBoostConfig(**kwargs)


def test_rank_larger_than_layer_and_nothing_applied_half_way():
    model = tiny_vit(mlp_ratio=0.5)  # qkv 32->96 fits rank 20, mlp.fc1 32->16 does not
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match='rank=20 is invalid for blocks.0.mlp.fc1 .* at most 16'):
        apply_capaboost(model, CapaBoostConfig(rank=20, target_modules=('attn.qkv', 'mlp.fc1')))
    assert not any(isinstance(m, CapaBoostLoRALinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, 'capaboost_config')


def test_nm_on_indivisible_dimension():
    with pytest.raises(ValueError, match='divisible by M=4'):
        apply_capaboost(tiny_vit(), CapaBoostConfig(rank=6, mask_type='nm'))  # B's reduction dim r=6


def test_unsupported_model_and_double_application():
    with pytest.raises(ValueError, match='ResNet is not supported: CapaBoost applies to timm VisionTransformer'):
        apply_capaboost(timm.create_model('resnet18'), CapaBoostConfig())
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(rank=2))
    with pytest.raises(ValueError, match='already has CapaBoost applied'):
        apply_capaboost(model, CapaBoostConfig(rank=2))


def test_bad_create_model_kwargs():
    with pytest.raises(ValueError, match='num_masks'):
        timm.create_model('vit_tiny_capaboost_lora', num_masks=0)


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
@pytest.mark.parametrize('method', ['lora', 'adapter', 'prompt'])
def test_base_checkpoint_loads_and_state_dict_round_trip_is_bit_exact(make, method, tmp_path):
    own = {'lora': dict(rank=2), 'adapter': {}, 'prompt': dict(prompt_rank=2, prompt_length=2)}[method]
    cfg = dict(method=method, **own)
    base = make()
    model = apply_capaboost(copy.deepcopy(base), CapaBoostConfig(**cfg))
    # a base checkpoint loads into the adapted model: only CapaBoost keys are missing
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(is_capaboost_key(k) for k in missing)
    # the adapted state dict minus CapaBoost keys is a valid base checkpoint
    sd = model.state_dict()
    make().load_state_dict({k: v for k, v in sd.items() if not is_capaboost_key(k)})
    # train a step so the CapaBoost weights are not at init, then save/load into a model with other masks
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(-1).sum().backward()
    opt.step()
    torch.save(model.state_dict(), tmp_path / 'sd.pt')
    other = apply_capaboost(make(), CapaBoostConfig(seed=123, **cfg))
    other.load_state_dict(torch.load(tmp_path / 'sd.pt', weights_only=True))
    assert torch.equal(model.eval()(x), other.eval()(x))
