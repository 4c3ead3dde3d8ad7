"""Adapter repos: local round trips, a real HTTP round trip through huggingface_hub against a loopback Hub,
revision pinning, offline loading from the cache, PEFT export, merged checkpoints, and every bad input."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file, save, save_file

import capaboost_vision as cv
from capaboost_vision.hub import AdapterError
from conftest import BASE_REPO

SMALL = dict(img_size=32, num_classes=3)


def trained(name='vit_tiny_capaboost_lora', seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **SMALL, **kwargs)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # as if trained: nothing at its init value
    return model.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_round_trip_is_exact_and_adapter_only(tmp_path):
    model = trained()
    cv.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['README.md', 'adapter.safetensors', 'config.json']
    keys = load_file(str(tmp_path / 'adapter.safetensors')).keys()
    assert all(cv.is_capaboost_key(k) or k.startswith('head.') for k in keys)
    assert not any(k.endswith('attn.qkv.weight') for k in keys)  # never the frozen backbone
    torch.manual_seed(0)  # the same (random) backbone as trained(); other masks, since seed=99
    fresh = timm.create_model('vit_tiny_capaboost_lora', **SMALL, seed=99).eval()
    cv.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(X), model(X))
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_capaboost_lora' and config['num_classes'] == 3
    assert config['pretrained_cfg']['hf_hub_id'] == BASE_REPO  # where the BASE weights come from
    assert config['model_args']['num_masks'] == 2 and config['capaboost']['format_version'] == 1
    card = (tmp_path / 'README.md').read_text()
    assert 'library_name: timm' in card and '- capaboost' in card
    # what was actually loaded: a random backbone is never recorded as the registered weights
    assert config['capaboost']['base_weights'] == 'random-init' and 'base_model:' not in card
    assert fresh.capaboost_config.seed == 0  # the file's settings (masks and their seed) become the model's


def test_vit_base_adapter_size(tmp_path):
    """The literature's setting: ViT-B/16, LoRA r=8 on qkv, 100 classes: an adapter of ~1.5 MB, not 343 MB."""
    model = timm.create_model('vit_base_capaboost_lora', num_classes=100)
    state_dict = cv.hub.adapter_state_dict(model)
    params = sum(v.numel() for k, v in state_dict.items() if v.dtype.is_floating_point)
    masks = sum(v.numel() for k, v in state_dict.items() if v.dtype == torch.bool)
    assert params == 294_912 + 76_900 and masks == 12 * 2 * 8 * (768 + 2304)
    cv.save_adapter(model, tmp_path)
    size = (tmp_path / 'adapter.safetensors').stat().st_size
    assert size < 4 * params + masks / 8 + 16_000  # fp32 weights, masks packed 8 to a byte, a small header
    print(f'vit_base_capaboost_lora adapter: {size} bytes')


def test_create_model_adapter_kwarg_local_folder(tmp_path):
    model = trained()
    cv.save_adapter(model, tmp_path)
    torch.manual_seed(0)  # the same (random) backbone as trained()
    loaded = timm.create_model('vit_tiny_capaboost_lora', **SMALL, adapter=str(tmp_path)).eval()
    assert torch.equal(loaded(X), model(X))


EXPORT_BASES = {'vit_tiny_capaboost_lora': 'vit_tiny_patch16_224', 'swin_tiny_capaboost_lora': 'swin_tiny_patch4_window7_224',
                'eva02_base_capaboost_lora': 'eva02_base_patch14_224'}  # Eva: separate q/k/v, SwiGLU


@pytest.mark.parametrize('make', EXPORT_BASES)
def test_export_peft_loads_in_stock_peft(make, tmp_path):
    from peft import PeftModel
    kwargs = dict(window_size=4) if make.startswith('swin') else dict(depth=2, patch_size=8) if 'eva' in make else {}
    model = trained(make, target_modules=('attn.qkv', 'mlp.fc1'), rank=4, num_masks=3, **kwargs)
    cv.export_peft(model, tmp_path)
    base_name = EXPORT_BASES[make]
    plain = timm.create_model(base_name, **SMALL, **kwargs)
    base_state = {k: v for k, v in model.state_dict().items() if not cv.is_capaboost_key(k)}
    plain.load_state_dict(base_state)
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path)).eval()
    cfg = json.loads((tmp_path / 'adapter_config.json').read_text())
    assert cfg['r'] == 12 and cfg['lora_alpha'] == pytest.approx(2.0 * 12)
    assert (peft_model(X) - model(X)).abs().max() <= 1e-5


def test_export_peft_refuses_where_stock_peft_would_never_run(tmp_path):
    """EVA-02's attention reads qkv.weight in F.linear (q/v biases): a PEFT LoRA there would be silently dead."""
    model = trained('eva02_tiny_capaboost_lora', depth=1, patch_size=8)
    with pytest.raises(AdapterError, match='stock PEFT.s LoRA at attn.qkv would never run.*merge'):
        cv.export_peft(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_merged_checkpoint_loads_in_plain_timm(tmp_path):
    model = trained()
    save_file(cv.merge(model).state_dict(), str(tmp_path / 'merged.safetensors'))
    # num_classes in the overlay tells timm the file's head fits (else it re-initialises the classifier)
    plain = timm.create_model('vit_tiny_patch16_224', pretrained=True, num_classes=3, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'merged.safetensors'),
                                                          num_classes=3)).eval()
    assert (plain(X) - model(X)).abs().max() <= 1e-5


@pytest.fixture
def saved(tmp_path):
    cv.save_adapter(trained(), tmp_path / 'ad')
    return tmp_path / 'ad'


def _expect_untouched(model, source, match):
    before = state(model)
    with pytest.raises(AdapterError, match=match):
        cv.load_adapter(model, source)
    assert same_state(before, state(model))


def test_bad_adapters_leave_the_model_untouched(saved, tmp_path):
    _expect_untouched(trained('vit_tiny_capaboost_adapter'), saved,
                      "architecture 'vit_tiny_capaboost_lora', the model is 'vit_tiny_capaboost_adapter'")
    _expect_untouched(trained(rank=2), saved, 'rank: model has 2, adapter has 8')
    other_head = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=5)
    _expect_untouched(other_head, saved, 'adapter has num_classes=3, the model has 5')
    _expect_untouched(trained(), tmp_path / 'nowhere', 'config.json does not exist')

    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'config.json').write_text((saved / 'config.json').read_text())
    _expect_untouched(trained(), broken, 'adapter.safetensors does not exist')
    (broken / 'adapter.safetensors').write_bytes((saved / 'adapter.safetensors').read_bytes()[:5000])
    _expect_untouched(trained(), broken, 'not a readable safetensors file')

    config = json.loads((saved / 'config.json').read_text())
    config['capaboost']['format_version'] = 99
    (broken / 'config.json').write_text(json.dumps(config))
    _expect_untouched(trained(), broken, 'unknown capaboost format_version 99')

    weights = load_file(str(saved / 'adapter.safetensors'))
    weights['head.bias'] = torch.zeros(4)
    save_file(weights, str(broken / 'adapter.safetensors'))
    (broken / 'config.json').write_text((saved / 'config.json').read_text())
    _expect_untouched(trained(), broken, r'head.bias has shape \(4,\) \(torch.float32\), the model expects \(3,\)')
    weights.pop('blocks.3.attn.qkv.lora_A')
    save_file(weights, str(broken / 'adapter.safetensors'))
    (broken / 'config.json').write_text((saved / 'config.json').read_text())
    _expect_untouched(trained(), broken, r"missing \['blocks.3.attn.qkv.lora_A'\]")


# ---- a real HTTP round trip: huggingface_hub against a loopback Hub, each side in a fresh process ----

PUSH = """
import timm, torch, capaboost_vision as cv
from safetensors.torch import save_file
for seed, out in {outs!r}:  # each push moves main on
    torch.manual_seed(seed)
    m = timm.create_model('vit_tiny_capaboost_lora', pretrained=True, img_size=32, num_classes=3)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    url = cv.push_adapter_to_hub(m, 'org/vit-t-capaboost', results={{'task': 'toy', 'top1': 87.5, 'epochs': 3,
                                                                     'seed': 0}})
    print('COMMIT', url.rsplit('/', 1)[1])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_file({{'logits': m.eval()(x)}}, out)
"""

LOAD = """
import timm, torch, capaboost_vision
from safetensors.torch import save_file
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
for name, kwargs, out in {loads!r}:
    m = timm.create_model(name, pretrained=True, **kwargs).eval()
    save_file({{'logits': m(x)}}, out)
"""


def _run(code, env, check=True):
    out = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_push_then_load_in_a_fresh_process_pinned_and_offline(hub, tmp_path):
    """One process pushes two versions; another loads main, the first commit and main through adapter=; with the
    Hub gone, a third loads main from the cache."""
    server, env = hub
    out = _run(PUSH.format(outs=[(0, str(tmp_path / 'v1.st')), (1, str(tmp_path / 'v2.st'))]), env)
    assert 'hf_test_token_not_printed' not in out.stdout + out.stderr
    first = out.stdout.split('COMMIT ')[1].split()[0]
    files = server.store.files('org/vit-t-capaboost', 'main')[1]
    assert sorted(files) == ['README.md', 'adapter.safetensors', 'config.json']
    assert len(files['adapter.safetensors']) < 400_000  # adapter only: LoRA 295 kB + head + packed masks; the ViT is 22 MB
    card = files['README.md'].decode()  # a custom task ('toy', no VTAB group): no vtab-1k tag; the Hub base named
    assert '87.5' in card and 'vtab-1k' not in card and f'base_model: {BASE_REPO}' in card
    kw = dict(img_size=32, num_classes=3, adapter='hf-hub:org/vit-t-capaboost')  # adapter= on the registered name
    _run(LOAD.format(loads=[('hf-hub:org/vit-t-capaboost', {}, str(tmp_path / 'main.st')),
                            (f'hf-hub:org/vit-t-capaboost@{first}', {}, str(tmp_path / 'pinned.st')),
                            ('vit_tiny_capaboost_lora', kw, str(tmp_path / 'kw.st'))]), env)
    server.httpd.shutdown()  # the Hub goes away: the cache must be enough
    _run(LOAD.format(loads=[('hf-hub:org/vit-t-capaboost', {}, str(tmp_path / 'offline.st'))]),
         dict(env, HF_HUB_OFFLINE='1'))
    logits = {k: load_file(str(tmp_path / f'{k}.st'))['logits']
              for k in ('v1', 'v2', 'main', 'pinned', 'kw', 'offline')}
    assert torch.equal(logits['pinned'], logits['v1']) and not torch.equal(logits['v1'], logits['v2'])
    assert all(torch.equal(logits[k], logits['v2']) for k in ('main', 'kw', 'offline'))


EVA_BASE = 'timm/eva02_tiny_patch14_224.mim_in22k'
EVA = dict(img_size=32, patch_size=8, depth=2, num_classes=3)
EVA_PUSH = """
import timm, torch, capaboost_vision as cv
from safetensors.torch import save_file
torch.manual_seed(0)
m = timm.create_model('eva02_tiny_capaboost_lora', pretrained=True, **{eva!r})
with torch.no_grad():
    for p in m.parameters():
        if p.requires_grad:
            p.normal_(0, 0.05)
cv.push_adapter_to_hub(m.eval(), 'org/eva02-t-capaboost')
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
merged = cv.merge(m)
timm.models.push_to_hf_hub(merged, 'org/eva02-t-merged')
save_file({{'logits': m(x), 'merged': merged(x)}}, {out!r})
"""


def test_eva_adapter_round_trips_through_the_hub_and_merges_to_plain_timm(hub, tmp_path):
    """timm's Eva family (EVA-02: q/v biases, the F.linear trap; RoPE): a CapaBoost-LoRA adapter pushed, then loaded by
    timm's `hf-hub:` name in a fresh process; its merged model pushed with timm's own push_to_hf_hub loads as a plain
    timm EVA-02 in a process that never imports this package."""
    server, env = hub
    server.store.create(EVA_BASE)
    repo = server.store.repos[EVA_BASE]
    base = timm.create_model('eva02_tiny_patch14_224', **dict(EVA, num_classes=0))
    repo['commits'][repo['branches']['main']]['model.safetensors'] = save(base.state_dict())
    _run(EVA_PUSH.format(eva=EVA, out=str(tmp_path / 'pushed.st')), env)
    _run(LOAD.format(loads=[('hf-hub:org/eva02-t-capaboost', {}, str(tmp_path / 'loaded.st'))]), env)
    _run(LOAD.replace('capaboost_vision', 'sys').format(
        loads=[('hf-hub:org/eva02-t-merged', {}, str(tmp_path / 'plain.st'))]), env)
    pushed, loaded, plain = (load_file(str(tmp_path / f'{k}.st')) for k in ('pushed', 'loaded', 'plain'))
    assert torch.equal(loaded['logits'], pushed['logits'])
    assert (pushed['merged'] - pushed['logits']).abs().max() < 1e-5
    assert (plain['logits'] - pushed['merged']).abs().max() < 1e-6  # timm adds the q/v biases in F.linear


BAD_LOAD = """
import timm, torch, capaboost_vision as cv
m = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)
before = {{k: v.clone() for k, v in m.state_dict().items()}}
try:
    cv.load_adapter(m, {source!r})
except cv.hub.AdapterError as e:
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    print('ERROR', e)
"""


def test_missing_repo_and_no_network_without_cache(hub):
    server, env = hub
    out = _run(BAD_LOAD.format(source='hf-hub:org/does-not-exist'), env)
    assert 'ERROR adapter repo org/does-not-exist does not exist on the Hub' in out.stdout
    out = _run(BAD_LOAD.format(source='hf-hub:org/never-cached'), dict(env, HF_HUB_OFFLINE='1'))
    assert 'no network and not in the Hugging Face cache' in out.stdout and 'HF_HUB_OFFLINE' in out.stdout


def test_cli_push_of_a_finished_run(hub, tmp_path):
    from test_vtab import TINY, make_task
    from capaboost_vision import cli
    server, env = hub
    make_task(tmp_path / 'data')
    assert cli.main(['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', str(tmp_path / 'data'),
                     '--output', str(tmp_path / 'runs'), '--epochs', '1', *TINY]) == 0
    run_dir = tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    results = json.loads((run_dir / 'results.json').read_text())
    out = subprocess.run([sys.executable, '-m', 'capaboost_vision.cli', 'push', str(run_dir), '--repo-id', 'org/toy-run'],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    files = server.store.files('org/toy-run', 'main')[1]
    assert sorted(files) == ['README.md', 'adapter.safetensors', 'config.json']
    assert f'{results["top1"]:.2f}%' in files['README.md'].decode()
    from safetensors.torch import load
    pushed, local = load(files['adapter.safetensors']), load_file(str(run_dir / 'adapter.safetensors'))
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
