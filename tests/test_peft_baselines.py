"""HF PEFT methods as baselines in the same engine: every shipped peft_*.yaml trains, resumes exactly and loads with
stock PEFT; bad PEFT blocks are one-line errors that write nothing; one parameter count for every row."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from capaboost_vision.vtab import cli, engine
from capaboost_vision.vtab.peft_baselines import apply_peft
from capaboost_vision.vtab.report import write_report
from capaboost_vision.vtab.run_config import CONFIG_DIR, RunError, resolve_config
from capaboost_vision.vtab.methods import stored_parameters
from conftest import tiny_vit
from test_vtab import make_task

peft = pytest.importorskip('peft')

PEFT_METHODS = sorted(p.stem for p in (CONFIG_DIR / 'methods').glob('peft_*.yaml'))
BASE = 'vit_tiny_patch16_224'  # what --model vit_tiny builds (timm's name, our weights file)
SMALL = ['--model', 'vit_tiny', '--img-size', '32', '--batch-size', '20', '--workers', '0', '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A tiny task and a random base checkpoint (stands in for pretrained weights: the PEFT folder holds none)."""
    root = tmp_path_factory.mktemp('peft')
    make_task(root, counts=(60, 30), n_test=30)
    torch.manual_seed(123)
    weights = root / 'base.safetensors'
    save_file(timm.create_model(BASE, img_size=32, num_classes=3).state_dict(), str(weights))
    return root, weights


def run(*argv):
    return cli.main([str(a) for a in argv])


def train_argv(setup, out, method, *extra):
    root, weights = setup
    return ['train', '--task', 'toy', '--method', method, '--data-path', root, '--output', out,
            '--weights', weights, *SMALL, *extra]


def test_shipped_peft_methods():
    assert PEFT_METHODS == ['peft_dora', 'peft_fourierft', 'peft_hira', 'peft_loha', 'peft_lokr', 'peft_lora',
                            'peft_randlora', 'peft_vera']


@pytest.mark.parametrize('method', PEFT_METHODS)
def test_peft_method_trains_resumes_exactly_and_loads_in_stock_peft(method, setup, tmp_path, monkeypatch):
    args = train_argv(setup, tmp_path / 'a', method, '--epochs', 2, '--lr', '1e-2')
    finished = {}
    original_finish = engine.finish

    def keep_model(run, started):  # the trained model itself: the reference for the reloaded folder
        finished['model'] = run.model
        return original_finish(run, started)

    monkeypatch.setattr(engine, 'finish', keep_model)
    assert run(*args) == 0
    run_a = tmp_path / 'a' / 'vit_tiny' / 'toy' / 'final' / method / 'seed0'
    results = json.loads((run_a / 'results.json').read_text())
    assert results['form'] == 'peft' and results['peft']['type'] == json.loads(
        (run_a / 'adapter_config.json').read_text())['peft_type']
    assert results['adapter_file'] == 'adapter_model.safetensors'
    assert results['trainable_params_excl_head'] > 0 and results['head_params'] == 3 * 192 + 3

    # stock PEFT on the plain timm model with the same base weights: identical logits
    plain = timm.create_model(BASE, img_size=32, num_classes=3)
    plain.load_state_dict(load_file(str(setup[1])))
    loaded = peft.PeftModel.from_pretrained(plain, str(run_a)).eval()
    trained = finished['model'].eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))

    # killed after epoch 1, resumed: the same numbers as the uninterrupted run
    cfg = resolve_config(dict(task='toy', method=method, data_path=str(setup[0]), output=str(tmp_path / 'b'),
                              weights=str(setup[1]), model='vit_tiny', img_size=32, batch_size=20, workers=0,
                              warmup_epochs=0, epochs=2, lr=1e-2))

    def kill(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, on_epoch_end=kill)
    run_b = tmp_path / 'b' / 'vit_tiny' / 'toy' / 'final' / method / 'seed0'
    assert not (run_b / 'results.json').exists()
    assert run(*train_argv(setup, tmp_path / 'b', method, '--epochs', 2, '--lr', '1e-2', '--resume')) == 0
    resumed = json.loads((run_b / 'results.json').read_text())
    assert resumed['top1'] == results['top1']
    wa, wb = (load_file(str(d / 'adapter_model.safetensors')) for d in (run_a, run_b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize('method, yaml_text, fragments', [
    ('peft_lora', 'peft: {type: LOHAX, r: 4}\n', ['peft.type', "'LOHAX'", 'LOHA, LOKR']),
    ('peft_lora', 'peft: {target_modules: [qvk]}\n', ['peft.target_modules', "'qvk'"]),
    ('peft_lora', 'peft: {target_modules: [qkv, nope]}\n', ['peft.target_modules', "'nope'"]),
    ('peft_lora', 'peft: {rnak: 2}\n', ['peft.rnak', 'LoraConfig']),
    ('peft_lora', 'peft: {layers_pattern: x}\n', ['peft:', 'LoraConfig rejects', 'layers_to_transform']),
    ('peft_lora', 'peft: {r: four}\n', ['peft:', 'LoraConfig']),
])
def test_bad_peft_block_is_one_line_naming_the_file_and_key_and_writes_nothing(method, yaml_text, fragments, setup,
                                                                              tmp_path, capsys):
    config = tmp_path / 'method.yaml'
    config.write_text(yaml_text)
    out = tmp_path / 'out'
    assert run(*train_argv(setup, out, method, '--config', config)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and '\n' not in err, err
    assert f'peft_lora.yaml + {config}' in err, err  # the block merges the method YAML and --config
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize('method, yaml_text, fragment', [
    ('lora', 'form: peft\n', 'form peft needs one'),
    ('lora', 'form: lora\npeft: {type: LORA}\n', 'a peft block goes with form peft'),
])
def test_form_and_peft_block_must_agree(method, yaml_text, fragment, setup, tmp_path, capsys):
    config = tmp_path / 'method.yaml'
    config.write_text(yaml_text)
    assert run(*train_argv(setup, tmp_path / 'out', method, '--config', config)) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and '\n' not in err and not (tmp_path / 'out').exists()


def test_peft_args_override_the_yaml_and_name_the_flag(setup, tmp_path, capsys):
    out = tmp_path / 'out'
    assert run(*train_argv(setup, out, 'peft_loha', '--peft-args', 'r=9x')) == 2
    err = capsys.readouterr().err.strip()
    assert 'peft_loha.yaml + command line' in err and '\n' not in err and not out.exists()
    assert run(*train_argv(setup, out, 'peft_loha', '--peft-args', 'r')) == 2
    assert 'expected KEY=VALUE' in capsys.readouterr().err
    cfg = resolve_config(dict(task='toy', method='peft_loha', data_path=str(setup[0]), peft={'r': 2, 'alpha': 4}))
    assert cfg.peft == {'type': 'LOHA', 'r': 2, 'alpha': 4, 'target_modules': ['qkv']}
    with pytest.raises(RunError, match='CapaBoost settings'):
        resolve_config(dict(task='toy', method='peft_loha', data_path=str(setup[0]), capaboost={'rank': 2}))


def test_changed_peft_argument_is_refused_by_name_and_sweep_passes_peft_args(setup, tmp_path, capsys):
    assert run(*train_argv(setup, tmp_path, 'peft_hira', '--epochs', 1, '--peft-args', 'r=2')) == 0
    code = run(*train_argv(setup, tmp_path, 'peft_hira', '--epochs', 1, '--peft-args', 'r=4'))
    err = capsys.readouterr().err
    assert code == 2 and 'peft.r: 2 -> 4' in err
    args = cli.make_parser().parse_args(['sweep', '--tasks', 'toy', '--methods', 'peft_hira', '--data-path', 'x',
                                         '--peft-args', 'r=2', 'target_modules=[qkv,proj]'])
    cfg = cli.build_run_config(args, 'toy', 'peft_hira', 0)  # what the sweep's run config.yaml records
    assert cfg.peft['r'] == 2 and cfg.peft['target_modules'] == ['qkv', 'proj']


def test_report_shows_peft_and_capaboost_rows_with_one_parameter_count(setup, tmp_path):
    for method in ('peft_lora', 'lora', 'capaboost_lora', 'peft_vera'):
        assert run(*train_argv(setup, tmp_path, method, '--epochs', 1)) == 0
    md = write_report(tmp_path)['markdown'].read_text()
    rows = {line.split(' | ')[1]: line.split(' | ') for line in md.splitlines() if line.startswith('| vit_tiny')}
    assert set(rows) == {'peft_lora', 'lora', 'capaboost_lora', 'peft_vera'}
    lora_params = f'{12 * 8 * (192 + 3 * 192) / 1e6:.3f}'  # rank 8 on qkv: the same count three ways
    assert rows['peft_lora'][2] == rows['lora'][2] == rows['capaboost_lora'][2] == lora_params
    # fixed: PEFT LoRA and our plain LoRA none (nothing masked, no masks held), CapaBoost d=2 masks per factor
    assert rows['peft_lora'][3] == rows['lora'][3] == '0.000'
    assert rows['capaboost_lora'][3] == f'{2 * 12 * 8 * (192 + 3 * 192) / 1e6:.3f}'
    # VeRA: 12 x (r + out) trainable, and its shared random bases counted once (256 x 192 + 576 x 256)
    assert rows['peft_vera'][2] == f'{12 * (256 + 576) / 1e6:.3f}'
    assert rows['peft_vera'][3] == f'{(256 * 192 + 576 * 256) / 1e6:.3f}'


def test_stored_parameters_counts_capaboost_and_peft_alike():
    from capaboost_vision import CapaBoostConfig, apply_capaboost
    lora = stored_parameters(apply_peft(tiny_vit(), {'type': 'LORA', 'r': 4, 'target_modules': ['qkv']}, 'head'))
    ours = stored_parameters(apply_capaboost(tiny_vit(), CapaBoostConfig(rank=4, num_masks=2, mask_density=0.5)))
    assert lora.trainable_excl_head == ours.trainable_excl_head == 2 * 4 * (32 + 96)
    assert lora.head == ours.head == 5 * 32 + 5 and lora.fixed == 0
    assert ours.fixed == 2 * 2 * 4 * (32 + 96)  # d masks per factor, never trained
    # RandLoRA's random bases are shared by every layer: counted once (named_buffers lists a shared tensor once)
    assert not list(tiny_vit().named_buffers())
    model = apply_peft(tiny_vit(), {'type': 'RANDLORA', 'r': 8, 'target_modules': ['qkv']}, 'head')
    unique = sum(b.numel() for _, b in model.named_buffers())
    every_layer = sum(b.numel() for _, b in model.named_buffers(remove_duplicate=False))
    assert stored_parameters(model).fixed == unique < every_layer


def test_core_package_imports_and_trains_without_peft(setup, tmp_path):
    code = ('import sys; sys.modules["peft"] = None\n'  # as if peft were not installed
            'import timm, capaboost_vision\n'
            'm = timm.create_model("vit_tiny_capaboost_lora", pretrained=False, img_size=32, num_classes=3)\n'
            'from capaboost_vision import cli\n'
            f'sys.exit(cli.main(["train", "--task", "toy", "--method", "peft_lora", "--data-path", '
            f'{str(setup[0])!r}, "--output", {str(tmp_path)!r}, "--no-pretrained", *{SMALL!r}]))\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ('error: an HF PEFT method needs the peft package: '
                                                    'pip install "capaboost-vision[peft]"'), proc.stderr
