"""timm's model APIs on CapaBoost models, ViT, Swin and Eva (EVA-02), in every form, against the plain base model."""
import copy

import pytest
import timm
import torch
from timm.layers import Format

import capaboost_vision as cv
from conftest import tiny_swin, tiny_vit

KW = {'vit': dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5),
      'swin': dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                   num_classes=5)}
KW['eva02'] = KW['vit']  # timm's Eva class (EVA-02: RoPE, q/v biases, GluMlp)
BASE = {'vit': 'vit_tiny_patch16_224', 'swin': 'swin_tiny_patch4_window7_224', 'eva02': 'eva02_tiny_patch14_224'}
FORMS = {'lora': {}, 'adapter': {}, 'prompt': dict(prompt_length=2, prompt_rank=2)}
CASES = [(family, form) for family in KW for form in FORMS]


def capaboost(family, form, **kwargs):
    """A CapaBoost model whose update is non-zero (B, up-projections randomised), so every check sees it."""
    model = timm.create_model(f'{family}_tiny_capaboost_{form}', **dict(KW[family], **FORMS[form], **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('lora_B', 'up_weight')):
                p.normal_(0, 0.5)
        if family == 'eva02':  # Eva's head starts at 1/1000 of ViT's scale (head_init_scale): outputs of ViT's scale
            model.head.weight.mul_(1000)
    return model


def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('family, form', CASES)
@pytest.mark.parametrize('out_indices', [None, (0, 1)])
def test_features_only_has_the_base_models_shapes(family, form, out_indices):
    extra = {} if out_indices is None else dict(out_indices=out_indices)
    kw = {k: v for k, v in KW[family].items() if k != 'num_classes'}
    base = timm.create_model(BASE[family], features_only=True, **kw, **extra)
    model = timm.create_model(f'{family}_tiny_capaboost_{form}', features_only=True, **kw, **FORMS[form], **extra)
    assert [f.shape for f in model(x())] == [f.shape for f in base(x())]
    assert model.feature_info.channels() == base.feature_info.channels()
    assert Format(model.output_fmt) == Format(base.output_fmt)  # what necks and timm's feature tests permute by
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(cv.tuner.is_capaboost_key(n) for n in trainable)  # the backbone stays frozen


@pytest.mark.parametrize('family, form', CASES)
def test_forward_intermediates_shapes_and_values(family, form):
    model, base = capaboost(family, form).eval(), timm.create_model(BASE[family], **KW[family]).eval()
    fmts = ['NCHW', 'NLC'] if family != 'swin' else ['NCHW']
    for fmt in fmts:
        for kwargs in (dict(indices=2), dict(indices=[0]), dict(indices=1, stop_early=True)):
            ours = model.forward_intermediates(x(), output_fmt=fmt, intermediates_only=True, **kwargs)
            theirs = base.forward_intermediates(x(), output_fmt=fmt, intermediates_only=True, **kwargs)
            assert [t.shape for t in ours] == [t.shape for t in theirs], (fmt, kwargs)
    final, intermediates = model.forward_intermediates(x(), indices=1)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(final), model(x()), atol=1e-5)  # the same pass as forward()


@pytest.mark.parametrize('family, form', CASES)
def test_prune_intermediate_layers(family, form):
    model, base = capaboost(family, form).eval(), timm.create_model(BASE[family], **KW[family]).eval()
    full = model.forward_intermediates(x(), indices=[0], intermediates_only=True)[0]
    model.prune_intermediate_layers(indices=[0])
    base.prune_intermediate_layers(indices=[0])
    pruned = model.forward_intermediates(x(), indices=[0], intermediates_only=True)[0]
    assert pruned.shape == base.forward_intermediates(x(), indices=[0], intermediates_only=True)[0].shape
    assert torch.allclose(pruned, full, atol=1e-6)


@pytest.mark.parametrize('family, form', CASES)
def test_grad_checkpointing_equals_plain_backward(family, form):
    model = capaboost(family, form).train()
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(0)
        model(x()).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize('family, form', CASES)
def test_fx_trace_compile_fullgraph_and_export(family, form):
    model = capaboost(family, form)
    for train in (True, False):
        model.train(train)
        traced = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            if not train:
                assert torch.allclose(traced(x()), model(x()), atol=1e-6)
    model.eval()
    with torch.no_grad():
        expected = model(x())
        compiled = torch.compile(model, fullgraph=True, backend='eager')
        assert torch.allclose(compiled(x()), expected, atol=1e-5)
    model.train()
    torch.compile(model, fullgraph=True, backend='eager')(x()).sum().backward()
    exported = torch.export.export(model.eval(), (x(),))
    assert torch.allclose(exported.module()(x()), expected, atol=1e-5)


@pytest.mark.parametrize('family, form', CASES + [(f, 'adapter-sequential') for f in KW])
def test_jit_script_equals_eager_saves_and_trains(family, form, tmp_path):
    extra = dict(adapter_placement='sequential') if form == 'adapter-sequential' else {}
    model = capaboost(family, form.split('-')[0], **extra).eval()
    keys = list(model.state_dict())
    scripted = torch.jit.script(model)
    assert list(model.state_dict()) == keys  # scripting leaves the eager model as it was
    expected = model(x())
    assert torch.allclose(scripted(x()), expected, atol=1e-5)
    torch.jit.save(scripted, tmp_path / 'scripted.pt')
    assert torch.allclose(torch.jit.load(tmp_path / 'scripted.pt')(x()), expected, atol=1e-5)
    grads = []  # the scripted model trains the same (shared) parameters with the same gradients
    for m in (model, scripted):
        model.zero_grad()
        m(x()).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize('make', [tiny_vit, tiny_swin])
@pytest.mark.parametrize('method', list(FORMS))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_adapters_stay_fp32_on_a_half_precision_base(make, method, dtype):
    model = cv.apply_capaboost(make().to(dtype), cv.CapaBoostConfig(method=method, **FORMS[method]))
    for name, p in model.named_parameters():
        if cv.tuner.is_capaboost_key(name):
            assert p.dtype == torch.float32, name
        elif not name.startswith('head'):
            assert p.dtype == dtype, name
    out = model(x().to(dtype))
    assert out.dtype == dtype and out.isfinite().all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in model.named_parameters()
               if cv.tuner.is_capaboost_key(n))
    off = cv.apply_capaboost(make().to(dtype), cv.CapaBoostConfig(method=method, autocast_adapter_dtype=False,
                                                                   **FORMS[method]))
    assert all(p.dtype == dtype for p in off.parameters())


@pytest.mark.parametrize('family, form', CASES)
def test_outputs_follow_every_kind_of_weight_change(family, form):
    """Masked weights are recomputed every pass: no edit path can leave a stale result."""
    model = capaboost(family, form).eval()
    name = next(n for n, p in model.named_parameters() if cv.tuner.is_capaboost_key(n) and p.dim() == 2)
    param = model.get_parameter(name)

    def out():
        with torch.no_grad():
            return model(x())
    before = out()
    param.data.mul_(2)  # loralib's idiom: invisible to autograd's version counter
    assert not torch.allclose(out(), before)
    state = copy.deepcopy(model.state_dict())
    state[name] = state[name] / 2
    model.load_state_dict(state)
    assert torch.allclose(out(), before, atol=1e-6)
    mask = next(b for n, b in model.named_buffers() if cv.tuner.is_capaboost_key(n))
    mask.logical_not_()  # an edited mask buffer
    assert not torch.allclose(out(), before)
    mask.logical_not_()
    model.train()
    model.eval()
    assert torch.allclose(out(), before, atol=1e-6)
    model.double()  # .to(): the recomputed weights follow the new dtype
    with torch.no_grad():
        assert torch.allclose(model(x().double()).float(), before, atol=1e-4)


def test_merge_returns_what_create_model_returns():
    model = capaboost('vit', 'lora')
    merged = cv.merge(model)
    base = timm.create_model(BASE['vit'], **KW['vit'])
    assert all(p.requires_grad for p in merged.parameters())
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in base.named_parameters()]


def test_any_timm_vit_or_swin_name_and_a_clear_error_for_other_blocks():
    for name in ('deit_tiny_patch16_224', 'vit_small_patch14_reg4_dinov2', 'swin_tiny_patch4_window7_224'):
        kw = dict(img_size=28 if 'patch14' in name else 32, num_classes=3)
        kw.update(dict(window_size=4) if 'swin' in name else dict(depth=2))
        model = cv.apply_capaboost(timm.create_model(name, **kw), cv.CapaBoostConfig(method='adapter'))
        assert model(torch.randn(1, 3, kw['img_size'], kw['img_size'])).shape == (1, 3)
    odd = timm.create_model('vit_small_patch16_18x2_224', img_size=32, depth=2)
    with pytest.raises(ValueError, match='not supported: ParallelThingsBlock'):
        cv.apply_capaboost(odd, cv.CapaBoostConfig())
    assert cv.backbones.backbone_of(odd).name == 'vit' and not hasattr(odd, 'capaboost_config')  # left untouched


def test_entry_points_document_themselves_and_their_weights():
    for name in timm.list_models('*_capaboost_*'):
        fn = timm.models.model_entrypoint(name)
        assert fn.__doc__ and len(fn.__doc__.splitlines()) == 1, name
        cfg = timm.models.get_pretrained_cfg(name)
        assert 'arXiv:2407.01320' in cfg.paper_ids and cfg.license and 'base weights: timm/' in cfg.notes[0]


def test_timm_scripts_run_through_the_wrapper_and_their_checkpoint_becomes_an_adapter(tmp_path, monkeypatch, capsys):
    """timm's scripts build models with create_model(args.model, ..., **args.model_kwargs): through
    ``python -m capaboost_vision.timm_script`` a stand-in train.py trains exactly the CapaBoost weights and the head
    and saves train.py's checkpoint; ``from-checkpoint`` turns it into an adapter that reproduces the model the
    stand-in validate.py loads from the checkpoint."""
    import sys
    from pathlib import Path
    from safetensors.torch import save_file
    from capaboost_vision import timm_script
    from capaboost_vision.vtab import cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    script = str(Path(__file__).parent / 'fixtures' / 'timm_train_standin.py')
    args = ['--model', 'vit_tiny_capaboost_lora', '--model-kwargs', 'img_size=32', 'rank=4']
    assert timm_script.main([script, *args]) == 0
    assert 'trained 37443 of' in capsys.readouterr().out  # 36,864 LoRA + 579 head parameters: nothing else
    assert cli.main(['from-checkpoint', 'checkpoint-0.pth.tar', '--output', 'adapter']) == 0
    assert (tmp_path / 'adapter' / 'adapter.safetensors').stat().st_size < 200_000  # the checkpoint: 22 MB + Adam
    assert timm_script.main([script, *args, '--checkpoint', 'checkpoint-0.pth.tar']) == 0
    state = torch.load('checkpoint-0.pth.tar', weights_only=False)['state_dict']
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3, rank=4)
    model.load_state_dict({k: v for k, v in state.items() if not cv.is_capaboost_key(k)}, strict=False)  # its base
    cv.load_adapter(model, 'adapter')
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.eval()(x), torch.load('validate_logits.pt'))
    save_file(timm.create_model('vit_tiny_patch16_224', img_size=32).state_dict(), 'plain.safetensors')
    assert cli.main(['from-checkpoint', 'plain.safetensors', '--output', 'other']) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: plain.safetensors: model None is not a registered CapaBoost model (pass model_name= / --model; "
        'timm.list_models("*_capaboost_*"))']
    assert not (tmp_path / 'other').exists()
