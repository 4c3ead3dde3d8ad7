"""Several adapters on one backbone (``capaboost_vision.multi``): loaded by name, switched, disabled, deleted, saved
one at a time, and mixed in one batch, for every form on ViT, Swin and the Eva family; the mixed batch checked in
float64 against each sample run alone with its adapter set."""
import copy

import pytest
import timm
import torch
from safetensors.torch import load_file

import capaboost_vision as cv
from capaboost_vision import multi
from conftest import tiny_eva, tiny_swin, tiny_vit

FAMILIES = {'vit': tiny_vit, 'swin': tiny_swin, 'eva': tiny_eva}
FORMS = {'lora': dict(method='lora', rank=2, target_modules=('attn.qkv', 'mlp.fc2')),
         'dora': dict(method='lora', rank=2, use_dora=True),
         'adapter': dict(method='adapter', adapter_bottleneck=4),
         'prompt': dict(method='prompt', prompt_length=2, prompt_rank=2)}


def _adapters(make, form, folder, num_classes=(5, 5, 5)):
    """The base model and one saved adapter per class count: same base, own masks (seed), random weights."""
    base = make()
    for i, classes in enumerate(num_classes):
        model = cv.apply_capaboost(copy.deepcopy(base), cv.CapaBoostConfig(seed=i, **FORMS[form]))
        if classes != model.num_classes:
            model.reset_classifier(classes)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2 if cv.is_capaboost_key(name) else 0.5)
        cv.save_adapter(model, folder / f'a{i}')
    return base


def _serving(base, form, folder, count=3):
    """One backbone with adapter a0 active and the others loaded beside it by name."""
    model = cv.apply_capaboost(copy.deepcopy(base), cv.CapaBoostConfig(**FORMS[form]))
    for i in range(count):
        multi.load_adapter(model, folder / f'a{i}', adapter_name=f'a{i}')
    multi.set_adapter(model, 'a0')
    multi.delete_adapter(model, 'default')  # the untrained one apply_capaboost made
    return model


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('form', FORMS)
def test_a_mixed_batch_equals_each_sample_alone_with_its_adapter_float64(family, form, tmp_path):
    base = _adapters(FAMILIES[family], form, tmp_path)
    model = _serving(base, form, tmp_path).double().eval()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    names = ['a2', 'a0', 'a1', 'a2', 'a0']
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        alone = []
        for i, name in enumerate(names):
            multi.set_adapter(model, name)
            alone.append(model(x[i:i + 1]))
        multi.set_adapter(model, 'a0')
        before = model(x)
        assert torch.allclose(model(x, adapter_names=['a0'] * 5), before, atol=1e-10, rtol=0)
        assert torch.equal(model(x), before)  # after a mixed batch, every layer runs its own class again
    assert torch.allclose(mixed, torch.cat(alone), atol=1e-10, rtol=0), (mixed - torch.cat(alone)).abs().max()
    assert len({tuple(a.flatten().tolist()) for a in alone[:3]}) == 3  # three adapters, three different outputs


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('form', FORMS)
def test_disabled_adapters_give_exactly_the_base_models_features(family, form, tmp_path):
    base = _adapters(FAMILIES[family], form, tmp_path, num_classes=(5,))
    model = _serving(base, form, tmp_path, count=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model.forward_features(x)
        with multi.disable_adapters(model):
            assert torch.equal(model.forward_features(x), base.eval().forward_features(x))
        assert torch.equal(model.forward_features(x), adapted)


def test_adapters_of_other_class_counts_switch_save_and_refuse_to_mix(tmp_path):
    tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, rank=2)
    for i, classes in enumerate((5, 7)):  # (an hf-hub: source: docs/python_api.md's block, run by test_packaging)
        torch.manual_seed(0)  # one random-init base for both (then a head of the adapter's own class count)
        trained = timm.create_model('vit_tiny_capaboost_lora', num_classes=5, seed=i, **tiny)
        trained.reset_classifier(classes)
        with torch.no_grad():
            for p in trained.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
        cv.save_adapter(trained, tmp_path / f'a{i}')
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_capaboost_lora', num_classes=5, **tiny)
    multi.load_adapter(model, tmp_path / 'a0')
    multi.load_adapter(model, tmp_path / 'a1', adapter_name='seven')
    assert multi.list_adapters(model) == ['default', 'seven'] and multi.active_adapter(model) == 'default'
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 5)
    multi.set_adapter(model, 'seven')
    assert model(x).shape == (3, 7) and model.num_classes == 7
    with pytest.raises(ValueError, match='different class counts'):
        model(x, adapter_names=['default', 'seven', 'seven'])
    with pytest.raises(ValueError, match="no adapter named 'cars'"):
        model(x, adapter_names=['cars'] * 3)
    with pytest.raises(ValueError, match='is the active adapter'):
        multi.delete_adapter(model, 'seven')
    with multi.using_adapter(model, 'default'):  # saving one named adapter: the one active in the block
        cv.save_adapter(model, tmp_path / 'again')
    assert multi.active_adapter(model) == 'seven'
    saved, original = load_file(tmp_path / 'again' / 'adapter.safetensors'), load_file(tmp_path / 'a0' /
                                                                                       'adapter.safetensors')
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    multi.set_adapter(model, 'default')
    multi.delete_adapter(model, 'seven')
    assert multi.list_adapters(model) == ['default'] and not any('adapter_bank' in k for k in model.state_dict())


def test_an_adapter_that_cannot_sit_beside_the_others_is_refused_and_changes_nothing(tmp_path):
    base = _adapters(tiny_vit, 'lora', tmp_path, num_classes=(5,))
    other = cv.apply_capaboost(copy.deepcopy(base), cv.CapaBoostConfig(method='lora', rank=4, target_modules=('attn.qkv', 'mlp.fc2')))
    cv.save_adapter(other, tmp_path / 'rank4')
    model = _serving(base, 'lora', tmp_path, count=1)
    with pytest.raises(ValueError, match='rank: model has 2, adapter has 4'):
        multi.load_adapter(model, tmp_path / 'rank4', adapter_name='r4')
    with pytest.raises(ValueError, match='already loaded'):
        multi.load_adapter(model, tmp_path / 'a0', adapter_name='a0')
    assert multi.list_adapters(model) == ['a0']
    # several at once (load_classifier([...]), predict A B C): all or nothing, the first one loaded is taken back
    with pytest.raises(ValueError, match='rank: model has 2, adapter has 4'):
        multi.load_together(model, ['a0', tmp_path / 'a0', tmp_path / 'rank4'])
    with pytest.raises(ValueError, match='is given twice'):
        multi.load_together(model, ['a0', tmp_path / 'a0', tmp_path / 'a0'])
    assert multi.list_adapters(model) == ['a0']
