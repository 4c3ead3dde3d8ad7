import pytest
import timm
import torch
from safetensors.torch import save_file

from capaboost_vision import parameter_report

NAMES = timm.list_models('*capaboost*')


def test_all_names_registered_with_pretrained_tags():
    expected = {f'{f}_capaboost_{m}' for f in ('vit_tiny', 'vit_small', 'vit_base', 'vit_large', 'vit_small_dinov2',
                                              'swin_tiny', 'swin_small', 'swin_base', 'vit_small_dinov3',
                                              'vit_small_dinov3_qkvb', 'vit_base_dinov3', 'vit_base_dinov3_qkvb',
                                              'eva02_tiny', 'eva02_small', 'eva02_base', 'vit_pe_core_tiny',
                                              'vit_pe_core_small', 'vit_pe_core_base')
                for m in ('lora', 'adapter', 'prompt')}
    assert set(NAMES) == expected
    tags = set(timm.list_pretrained('*capaboost*'))
    assert 'vit_base_capaboost_lora.orig_in21k' in tags
    assert 'vit_tiny_capaboost_prompt.augreg_in21k' in tags
    assert 'swin_base_capaboost_adapter.ms_in22k' in tags
    assert 'vit_small_dinov2_capaboost_lora.lvd142m' in tags
    assert 'vit_base_dinov3_capaboost_lora.lvd1689m' in tags and 'eva02_base_capaboost_prompt.mim_in22k' in tags
    assert 'vit_pe_core_tiny_capaboost_adapter.fb' in tags
    cfg = timm.models.get_pretrained_cfg('vit_base_capaboost_lora.orig_in21k')
    assert cfg.hf_hub_id == 'timm/vit_base_patch16_224.orig_in21k'
    cfg = timm.models.get_pretrained_cfg('eva02_base_capaboost_lora.mim_in22k')
    assert cfg.hf_hub_id == 'timm/eva02_base_patch14_224.mim_in22k' and 'arXiv:2303.11331' in cfg.paper_ids


def _small_kwargs(name):
    """Small images and few blocks (each name keeps its widths and heads): building a full ViT-L's 300M random
    weights costs seconds and proves nothing more about the entry point."""
    if name.startswith('swin'):
        return dict(img_size=32, window_size=4, num_classes=3, depths=(1, 1, 1, 1))
    if name.startswith(('eva02', 'vit_pe', 'vit_small_dinov3', 'vit_base_dinov3')):  # Eva: one block is enough here
        return dict(img_size=28 if 'eva02' in name else 32, num_classes=3, depth=1)
    return dict(img_size=28 if 'dinov2' in name else 32, num_classes=3, depth=2)


@pytest.mark.parametrize('name', NAMES)
def test_every_name_builds_and_runs_forward_backward(name):
    size = _small_kwargs(name)['img_size']
    form_kwargs = dict(prompt_rank=4) if name.endswith('_prompt') else {}  # another form's setting is refused
    model = timm.create_model(name, **form_kwargs, **_small_kwargs(name))
    out = model(torch.randn(2, 3, size, size))
    out.sum().backward()
    assert out.shape == (2, 3)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert parameter_report(model).capaboost > 0


def test_adapter_parameter_count_vit_base():
    with torch.device('meta'):  # counts only: no weights allocated
        model = timm.create_model('vit_base_capaboost_adapter', num_classes=100)
    assert parameter_report(model).capaboost == 12 * (768 * 8 + 8 + 8 * 768 + 768)  # 156,768: "Adapter 0.16M"


def test_settings_are_kwargs_and_recorded_in_model_args():
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3, rank=4, num_masks=3,
                              mask_density=0.25, seed=5, target_modules=['attn.qkv', 'mlp.fc1'])
    args = model._model_args
    assert args['rank'] == 4 and args['num_masks'] == 3 and args['mask_density'] == 0.25 and args['seed'] == 5
    assert list(args['target_modules']) == ['attn.qkv', 'mlp.fc1']
    assert args['lora_alpha'] == 8.0  # defaults are recorded too
    assert model.capaboost_config.num_masks == 3
    with pytest.raises(ValueError, match='method'):
        timm.create_model('vit_tiny_capaboost_lora', method='adapter')


def test_pretrained_cfg_overlay_file_loads_local_base_weights(tmp_path):
    base = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0)
    path = tmp_path / 'base.safetensors'
    save_file(base.state_dict(), str(path))
    model = timm.create_model('vit_tiny_capaboost_lora', pretrained=True, img_size=32, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.blocks[3].attn.qkv.weight, base.blocks[3].attn.qkv.weight)
    assert model.pretrained_cfg['architecture'] == 'vit_tiny_capaboost_lora'
    assert model.head.out_features == 7 and model.head.weight.requires_grad
    assert not model.blocks[3].attn.qkv.weight.requires_grad


def test_plain_vpt_via_create_model_kwarg():
    # 0 (not None, which timm's create_model drops) selects unfactorised VPT-deep prompts
    model = timm.create_model('vit_tiny_capaboost_prompt', img_size=32, num_classes=3, prompt_rank=0,
                              prompt_length=4)
    assert model.capaboost_prompt.banks[0].prompt.shape == (12 * 4, 192)
    assert model._model_args['prompt_rank'] == 0
