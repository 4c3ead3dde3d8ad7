import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from capaboost_vision import CapaBoostConfig, apply_capaboost, merge, parameter_report
from capaboost_vision.hub import AdapterError, load_adapter, save_adapter
from capaboost_vision.lora import CapaBoostLoRALinear
from capaboost_vision.masks import pack_mask
from capaboost_vision.backbones import BACKBONES
from capaboost_vision.config import LORA_TARGETS
from conftest import tiny_eva, tiny_swin, tiny_vit
from reference import naive_lora_delta, naive_lora_forward


def _layer(dtype=torch.float64, **cfg):
    base = torch.nn.Linear(24, 40, dtype=dtype)
    layer = CapaBoostLoRALinear(base, CapaBoostConfig(**dict(dict(rank=4), **cfg)), 'blocks.0.attn.qkv')
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero B so the update is visible
    return layer


@pytest.mark.parametrize('cfg', [dict(), dict(num_masks=4, mask_density=0.3), dict(mask_type='nm'),
                                 dict(lora_alpha=3.0, num_masks=3)])
def test_batched_forward_equals_naive_branch_sum_float64(cfg):
    layer = _layer(**cfg)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    assert torch.allclose(layer(x), naive_lora_forward(layer, x), atol=1e-10, rtol=0)
    assert torch.allclose(layer.delta_weight(), naive_lora_delta(layer), atol=1e-10, rtol=0)


def test_one_full_mask_is_plain_lora_and_holds_no_masks(tmp_path):
    layer = _layer(num_masks=1, mask_density=1.0)
    x = torch.randn(4, 24, dtype=torch.float64)
    plain = F.linear(x, layer.weight, layer.bias) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    assert torch.allclose(layer(x), plain, atol=1e-12)
    assert not list(layer.buffers())  # nothing masked: no all-ones mask per factor
    # an adapter file written when plain LoRA still carried all-ones masks loads; another mask is refused
    torch.manual_seed(0)
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(rank=2, num_masks=1, mask_density=1.0)).eval()
    with torch.no_grad():
        model.blocks[0].attn.qkv.lora_B.normal_()
    save_adapter(model, tmp_path)
    state, shape = load_file(str(tmp_path / 'adapter.safetensors')), [2, 32]
    for bits, keep in ((torch.ones(shape, dtype=torch.bool), True), (torch.eye(2, 32, dtype=torch.bool), False)):
        extra = {'blocks.0.attn.qkv.lora_mask_A': pack_mask(bits)}
        save_file({**state, **extra}, str(tmp_path / 'adapter.safetensors'),
                  metadata={'format': 'capaboost', 'version': '1',
                            'packed_masks': json.dumps({'blocks.0.attn.qkv.lora_mask_A': [1, *shape]})})
        torch.manual_seed(0)  # the same backbone
        fresh = apply_capaboost(tiny_vit(), CapaBoostConfig(rank=2, num_masks=1, mask_density=1.0)).eval()
        if keep:
            load_adapter(fresh, tmp_path, check_base=False)
            assert torch.equal(fresh(torch.ones(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32)))
        else:
            with pytest.raises(AdapterError, match='unexpected'):
                load_adapter(fresh, tmp_path, check_base=False)


EVA_KINDS = {  # every attention / MLP layout of timm's Eva family
    'dinov3': lambda: tiny_eva('vit_small_patch16_dinov3'),  # fused qkv with its bias, Mlp, register tokens
    'dinov3_qkvb': lambda: tiny_eva('vit_small_patch16_dinov3_qkvb'),  # q/k/v biases: timm's F.linear trap
    'eva02': tiny_eva,  # q/v biases, GluMlp (packed fc1)
    'eva02_base': lambda: tiny_eva('eva02_base_patch14_224'),  # separate q/k/v projections, SwiGLU (fc1_g, fc1_x)
    'pe_core': lambda: tiny_eva('vit_pe_core_tiny_patch16_384'),  # AttentionRope
}
FAMILY_MODELS = {'vit': {'vit': tiny_vit}, 'swin': {'swin': tiny_swin}, 'eva': EVA_KINDS}


def test_every_lora_linear_of_every_family_is_on_the_forward_path():
    """For every registered family (a new one fails here until it has a case) and every LoRA target: each layer
    CapaBoost installs changes the logits once its B is non-zero. A layer the block never calls (timm's Eva computes
    F.linear(x, qkv.weight, q/k/v biases) where it has q_bias) would leave them exactly equal."""
    assert FAMILY_MODELS.keys() == BACKBONES.keys()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for family, kinds in FAMILY_MODELS.items():
        for kind, make in kinds.items():
            model = apply_capaboost(make(), CapaBoostConfig(rank=2, target_modules=LORA_TARGETS)).eval()
            layers = {n: m for n, m in model.named_modules() if isinstance(m, CapaBoostLoRALinear)}
            assert len(layers) >= len(LORA_TARGETS) * 2, (kind, list(layers))  # 2 blocks (Swin: 4)
            with torch.no_grad():
                base = model(x)
                for name, layer in layers.items():
                    layer.lora_B.normal_()
                    assert not torch.equal(model(x), base), f'{kind}: {name} is never called'
                    layer.lora_B.zero_()


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin, tiny_eva, EVA_KINDS['eva02_base']])
def test_merge_equals_unmerged_and_is_plain_timm(make):
    model = apply_capaboost(make(), CapaBoostConfig(rank=4, target_modules=('attn.qkv', 'mlp.fc2')))
    for m in model.modules():
        if isinstance(m, CapaBoostLoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    plain = merge(model)
    assert not any(isinstance(m, CapaBoostLoRALinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(make().state_dict())
    assert (plain(x) - model(x)).abs().max() <= 1e-5
    # the merged checkpoint loads strictly into a fresh plain timm model
    fresh = make().eval()
    fresh.load_state_dict(plain.state_dict())
    assert (fresh(x) - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
def test_lora_output_equals_base_at_init(make):
    base = make().eval()
    model = apply_capaboost(copy.deepcopy(base), CapaBoostConfig(target_modules=('attn.qkv', 'attn.proj',
                                                                                 'mlp.fc1', 'mlp.fc2'), rank=4))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), base(x))


def _train_delta(identical_masks: bool, d=2, r=3):
    torch.manual_seed(0)
    layer = CapaBoostLoRALinear(torch.nn.Linear(16, 20), CapaBoostConfig(rank=r, num_masks=d), 'l')
    if identical_masks:
        layer.lora_mask_A[:] = layer.lora_mask_A[0].clone()
        layer.lora_mask_B[:] = layer.lora_mask_B[:, :1].clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    for _ in range(5):
        x = torch.randn(32, 16)
        loss = (layer(x) - torch.randn(32, 20)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.double().delta_weight().detach()  # float64 product: rank not blurred by float32 rounding


def test_rank_reaches_d_times_r_after_training():
    assert torch.linalg.matrix_rank(_train_delta(False, d=2, r=3)) == 6
    assert torch.linalg.matrix_rank(_train_delta(False, d=4, r=3)) == 12
    assert torch.linalg.matrix_rank(_train_delta(True, d=2, r=3)) == 3  # identical masks: only rank r


def test_shared_gradient_equals_sum_of_tied_copy_gradients():
    """Official semantics: d physical copies, each masked, gradients summed onto the shared weights."""
    layer = _layer(num_masks=3, mask_density=0.5)
    x, target = torch.randn(6, 24, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()

    copies_a = [layer.lora_A.detach().clone().requires_grad_() for _ in range(3)]
    copies_b = [layer.lora_B.detach().clone().requires_grad_() for _ in range(3)]
    out = F.linear(x, layer.weight.detach(), layer.bias.detach())
    for i in range(3):  # each copy multiplied by its mask (so its gradient is masked too)
        out = out + layer.scaling * (x @ (copies_a[i] * layer.lora_mask_A[i]).t()) @ \
            (copies_b[i] * layer.lora_mask_B[:, i]).t()
    (out - target).pow(2).sum().backward()
    assert torch.allclose(layer.lora_A.grad, sum(c.grad for c in copies_a), atol=1e-10)
    assert torch.allclose(layer.lora_B.grad, sum(c.grad for c in copies_b), atol=1e-10)
    for i in range(3):  # per-branch gradients are masked
        assert torch.all(copies_a[i].grad[~layer.lora_mask_A[i]] == 0)


def test_parameter_counts_vit_base():
    lora = apply_capaboost(timm.create_model('vit_base_patch16_224', num_classes=100),
                           CapaBoostConfig(rank=8, num_masks=1, mask_density=1.0))
    capa = apply_capaboost(timm.create_model('vit_base_patch16_224', num_classes=100),
                           CapaBoostConfig(rank=8, num_masks=2, mask_density=0.5))
    assert parameter_report(lora).capaboost == 294_912
    assert parameter_report(capa).capaboost == 294_912  # same stored parameters as LoRA r=8
    assert parameter_report(capa).head == 768 * 100 + 100
    assert parameter_report(capa).max_rank == 16 and parameter_report(lora).max_rank == 8
    trainable = sum(p.numel() for p in capa.parameters() if p.requires_grad)
    assert trainable == 294_912 + 76_900
    # optimizer state is that of one rank-r LoRA: AdamW holds 2 tensors per trainable parameter
    opt = torch.optim.AdamW([p for p in capa.parameters() if p.requires_grad])
    capa(torch.randn(1, 3, 224, 224)).sum().backward()
    opt.step()
    state = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != 'step')
    assert state == 2 * trainable
