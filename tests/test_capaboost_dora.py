"""CapaBoost-DoRA: the masked-branch LoRA sum inside DoRA's magnitude x direction, against the naive d-branch
reference (float64), HF PEFT's own DoRA (through export_peft), and merge."""
import pytest
import torch

import capaboost_vision as cv
from capaboost_vision import CapaBoostConfig, apply_capaboost
from capaboost_vision.lora import CapaBoostLoRALinear
from conftest import tiny_swin, tiny_vit
from reference import naive_dora_forward


def trained_like(layer: CapaBoostLoRALinear) -> CapaBoostLoRALinear:
    """Non-zero B and a magnitude away from ||W0||, as after some training."""
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)
    return layer


@pytest.mark.parametrize('num_masks, density', [(1, 1.0), (2, 0.5), (4, 0.3)])
def test_forward_and_gradients_equal_the_naive_branch_sum_float64(num_masks, density):
    base = torch.nn.Linear(24, 40).double()
    cfg = CapaBoostConfig(rank=4, lora_alpha=6.0, num_masks=num_masks, mask_density=density, use_dora=True)
    layer = trained_like(CapaBoostLoRALinear(base, cfg, 'q').double())
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    ours, ref = layer(x), naive_dora_forward(layer, x)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    grads = []
    for out in (ours, ref):
        layer.zero_grad()
        (out ** 2).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude)])
    for g_ours, g_ref in zip(*grads):
        assert torch.allclose(g_ours, g_ref, atol=1e-10, rtol=0)


def test_starts_as_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    plain = tiny_vit().eval()
    model = apply_capaboost(tiny_vit().eval(), CapaBoostConfig(rank=4, use_dora=True))
    model.load_state_dict(plain.state_dict(), strict=False)
    for m in model.modules():  # the magnitude is ||W0||, read when the layer was built: rebuild it for these weights
        if isinstance(m, CapaBoostLoRALinear):
            m.lora_magnitude.data = m.weight.norm(dim=1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
        for m in model.modules():
            if isinstance(m, CapaBoostLoRALinear):
                trained_like(m)
        merged = cv.merge(model)
        assert not any(isinstance(m, CapaBoostLoRALinear) for m in merged.modules())
        assert torch.allclose(merged(x), model(x), atol=1e-5)


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
def test_export_peft_gives_stock_peft_dora_the_same_outputs(make, tmp_path):
    peft = pytest.importorskip('peft')
    torch.manual_seed(0)
    model = apply_capaboost(make().eval(), CapaBoostConfig(rank=4, num_masks=2, mask_density=0.5, use_dora=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CapaBoostLoRALinear):
                trained_like(m)
    cv.export_peft(model, tmp_path)
    plain = make().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not cv.is_capaboost_key(k)},
                          strict=False)
    loaded = peft.PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_dora_counts_its_magnitude_and_refuses_other_forms():
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(rank=4, use_dora=True))
    from capaboost_vision.vtab.methods import stored_parameters
    counts = stored_parameters(model)
    assert counts.trainable_excl_head == 2 * (4 * (32 + 96) + 96)  # A, B and one magnitude entry per qkv output
    with pytest.raises(ValueError, match='use_dora applies to the lora form only'):
        CapaBoostConfig(method='adapter', use_dora=True)


def test_jit_script_of_a_dora_model_equals_eager():
    model = apply_capaboost(tiny_vit().eval(), CapaBoostConfig(rank=4, use_dora=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CapaBoostLoRALinear):
                trained_like(m)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5)
