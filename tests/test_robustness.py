"""Nothing lost, nothing silently wrong: divergence, data problems, adapter files and the CLI's one-line errors.

CLI cases check the exit code, that stderr is one ``error:`` line, and that nothing was written or left behind. They
run ``cli.main`` (what the ``capaboost-vtab`` entry point calls) in this process, capturing its output, which is
some 3 s faster a case than a fresh interpreter; a case with its own environment (huggingface_hub reads it at
import) and the ones marked ``fresh=True`` run the real entry point in a subprocess, so that what an import or an
uncaught exception prints is seen too.
"""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import capaboost_vision as cv
from capaboost_vision.vtab import engine
from capaboost_vision.vtab.engine import train
from capaboost_vision.hub import AdapterError
from capaboost_vision.vtab.run_config import RunError, resolve_config
from test_vtab import TINY, make_task

ENTRY = [sys.executable, '-c', 'import sys, capaboost_vtab; sys.exit(capaboost_vtab.main())']


def cli(*argv, cwd=None, env=None, timeout=300, fresh=False):
    """(exit code, stdout, stderr) of the command line: the real entry point in a subprocess where ``env`` is given
    or ``fresh``, else ``cli.main`` in this process (in ``cwd`` if given)."""
    if env or fresh:
        out = subprocess.run([*ENTRY, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                             env=dict(os.environ, **(env or {})))
        return out.returncode, out.stdout, out.stderr.strip()
    from capaboost_vision.vtab import cli as cli_module
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr), contextlib.chdir(cwd or os.getcwd()):
        try:
            code = cli_module.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, stdout.getvalue(), stderr.getvalue().strip()


def one_line_error(code, err, *fragments):
    assert code == 2, err[-2000:]
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    make_task(root)
    return root


def files_under(path: Path):
    return sorted(p.relative_to(path) for p in path.rglob('*')) if path.exists() else []


# ---- 1. divergence ----

def _cfg(data, out, **kw):
    args = dict(task='toy', method='capaboost_lora', data_path=str(data), output=str(out), epochs=2, lr=5e-3,
                model='vit_tiny', pretrained=False, img_size=32, batch_size=100, workers=0, warmup_epochs=0)
    args.update(kw)
    cfg = resolve_config(args)
    return cfg


def test_weights_turning_nan_in_the_last_step_are_caught(data, tmp_path, monkeypatch):
    """Finite loss and gradients, but the last optimizer step writes NaN weights: the run must not finish."""
    real = engine.create_optimizer_v2
    calls = {'n': 0}

    def poisoning_optimizer(*args, **kwargs):
        opt = real(*args, **kwargs)
        step = opt.step

        def poisoned_step(*a, **k):
            out = step(*a, **k)
            calls['n'] += 1
            if calls['n'] == 4:  # the last step of epoch 2 (2 steps per epoch: 200 images, batch 100)
                with torch.no_grad():
                    opt.param_groups[0]['params'][0].fill_(float('nan'))
            return out
        opt.step = poisoned_step
        return opt
    monkeypatch.setattr(engine, 'create_optimizer_v2', poisoning_optimizer)
    cfg = _cfg(data, tmp_path)
    with pytest.raises(RunError, match=r'diverged at epoch 2: the weights became non-finite.*last finite checkpoint '
                                       r'\(epoch 1\)'):
        train(cfg)
    run_dir = engine.run_directory(cfg)
    assert not (run_dir / 'results.json').exists() and not (run_dir / 'adapter.safetensors').exists()
    ckpt = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    monkeypatch.setattr(engine, 'create_optimizer_v2', real)  # the kept checkpoint is real: resuming finishes
    cfg.resume = True
    assert train(cfg)['epochs'] == 2


def test_divergence_in_the_first_epoch_leaves_nothing(data, tmp_path):
    code, _, err = cli('train', '--task', 'toy', '--data-path', data, '--output', tmp_path / 'runs', '--epochs', 2,
                       '--lr', '100', '--method', 'full', *TINY)
    one_line_error(code, err, 'training diverged at epoch 1', 'No epoch finished', 'Rerun with a lower --lr')
    assert [p for p in files_under(tmp_path / 'runs') if not str(p).startswith('.cache')] == []


def test_non_finite_adapters_are_never_saved_pushed_or_loaded(tmp_path):
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)
    cv.save_adapter(model, tmp_path / 'good')
    with torch.no_grad():
        model.blocks[0].attn.qkv.lora_B.fill_(float('inf'))
    with pytest.raises(AdapterError, match='refusing to save an adapter with non-finite values'):
        cv.save_adapter(model, tmp_path / 'bad')
    assert not (tmp_path / 'bad').exists()
    with pytest.raises(AdapterError, match='refusing to push'):
        cv.push_adapter_to_hub(model, 'org/never')  # refused before any request
    state = load_file(str(tmp_path / 'good' / 'adapter.safetensors'))
    state['blocks.0.attn.qkv.lora_A'][0, 0] = float('nan')
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / 'good' / 'adapter.safetensors'), metadata={'format': 'capaboost'})
    fresh = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)
    with pytest.raises(AdapterError, match='non-finite values'):
        cv.load_adapter(fresh, tmp_path / 'good')


DDP_NAN = """
import os, sys, torch
if os.environ['RANK'] == '1':  # only this rank's loss turns NaN
    forward = torch.nn.CrossEntropyLoss.forward
    torch.nn.CrossEntropyLoss.forward = lambda self, x, y: forward(self, x, y) * float('nan')
from capaboost_vision.vtab import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_nan_on_one_ddp_rank_stops_every_rank(data, tmp_path):
    script = tmp_path / 'nan_rank.py'
    script.write_text(DDP_NAN)
    make_task(tmp_path / 'small', n_test=20, counts=(160, 40))  # two ranks need little data to disagree on
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
           str(script), 'train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', str(tmp_path / 'small'),
           '--output', str(tmp_path / 'runs'), '--epochs', '1', *TINY]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode != 0
    assert out.stderr.count('training diverged at epoch 1: non-finite gradients') == 2, out.stderr[-3000:]


# ---- 2-4. where runs go, data checked before training, check ----

def test_task_given_as_a_folder_writes_under_output(data, tmp_path):
    code, _, err = cli('train', '--task', data / 'toy', '--method', 'linear', '--output', tmp_path / 'runs',
                       '--epochs', 1, *TINY)
    assert code == 0, err
    assert (tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'linear' / 'seed0' / 'results.json').is_file()
    assert not (data / 'toy' / 'vit_tiny').exists() and not list(data.rglob('results.json'))
    assert cli('report', tmp_path / 'runs')[0] == 0


@pytest.mark.parametrize('split, content, fragment', [
    ('test', '', 'test.txt lists no samples'),
    ('train800val200', '\n', 'train800val200.txt lists no samples'),
    ('test', 'images/0.png 1\n\xe9t\xe9.png 1\n', 'is not UTF-8 text'),
])
def test_bad_lists_fail_before_training_and_write_nothing(tmp_path, split, content, fragment):
    folder = make_task(tmp_path / 'data', n_test=5)
    (folder / f'{split}.txt').write_bytes(content.encode('latin-1'))
    code, out, err = cli('train', '--task', 'toy', '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs',
                         '--epochs', 3, *TINY)
    one_line_error(code, err, fragment, str(folder / f'{split}.txt'))
    assert 'epoch 1' not in out and not (tmp_path / 'runs').exists()


def test_check_custom_task_and_missing_root(tmp_path):
    make_task(tmp_path, counts=(80, 20), n_test=10)  # a custom task: no VTAB line counts
    code, out, _ = cli('check', '--data-path', tmp_path, '--tasks', 'toy')
    assert code == 0 and 'all tasks ok' in out
    code, out, err = cli('check', '--data-path', tmp_path / 'nowhere')
    one_line_error(code, err, 'nowhere does not exist')
    assert out == ''


# ---- 5-8. adapter files ----

def test_load_adapter_adopts_the_files_settings(tmp_path):
    src = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3, seed=7, mask_density=0.25)
    cv.save_adapter(src, tmp_path / 'a')
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)  # seed 0, density 0.5
    cv.load_adapter(model, tmp_path / 'a')
    assert model.capaboost_config == src.capaboost_config
    cv.save_adapter(model, tmp_path / 'b')
    saved = [json.loads((tmp_path / f / 'config.json').read_text())['capaboost']['config'] for f in 'ab']
    assert saved[0] == saved[1] and saved[1]['seed'] == 7 and saved[1]['mask_density'] == 0.25


def test_base_weights_record_what_was_loaded_and_warn_on_another_base(tmp_path):
    from safetensors.torch import save_file
    random_model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)
    assert cv.hub.base_weights_id(random_model) == 'random-init'
    base = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0)
    save_file(base.state_dict(), str(tmp_path / 'mybase.safetensors'))
    from_file = timm.create_model('vit_tiny_capaboost_lora', pretrained=True, img_size=32, num_classes=3,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / 'mybase.safetensors')))
    assert cv.hub.base_weights_id(from_file) == 'file:mybase.safetensors'
    cv.save_adapter(from_file, tmp_path / 'a')
    block = json.loads((tmp_path / 'a' / 'config.json').read_text())['capaboost']
    assert block['base_weights'] == 'file:mybase.safetensors' and len(block['base_fingerprint']) == 16
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        same = timm.create_model('vit_tiny_capaboost_lora', pretrained=True, img_size=32, num_classes=3,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / 'mybase.safetensors')))
        cv.load_adapter(same, tmp_path / 'a')  # same base: no warning
    with pytest.warns(UserWarning, match="trained on base weights 'file:mybase.safetensors'.*this model has "
                                         "'random-init'"):
        cv.load_adapter(random_model, tmp_path / 'a')


@pytest.mark.parametrize('content, match', [
    (b'[1, 2]', 'a JSON object is required, not list'),
    (b'\xff\xfe\x00binary', 'is not valid JSON text'),
    (None, 'a plain file name inside the adapter folder'),
    (b'{"capaboost": {"format_version": 1, "config": {"rank": "8"}}, "architecture": "x", "num_classes": 3}',
     'rank=.8. is invalid'),
])
def test_malformed_config_json_is_one_clear_error(tmp_path, content, match):
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)
    cv.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    if content is None:  # the weights field points outside the folder
        config['capaboost']['weights'] = '../../etc/passwd'
        content = json.dumps(config).encode()
    (tmp_path / 'config.json').write_bytes(content)
    with pytest.raises(AdapterError, match=match):
        cv.load_adapter(model, tmp_path)


def test_hub_errors_are_one_line_with_the_way_out(tmp_path):
    make_task(tmp_path / 'data')
    assert cli('train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', tmp_path / 'data',
               '--output', tmp_path / 'runs', '--epochs', 1, *TINY)[0] == 0
    run_dir = tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    offline = dict(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'empty_hf'))
    code, _, err = cli('rank', 'hf-hub:org/never-cached', env=offline)
    one_line_error(code, err, 'not in the local cache', 'HF_HUB_OFFLINE')
    no_network = dict(HF_HUB_OFFLINE='0', HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'),
                      HF_TOKEN='hf_x')  # port 9 (discard): nothing listens
    code, _, err = cli('push', run_dir, '--repo-id', 'org/x', env=no_network)
    one_line_error(code, err, 'cannot reach the Hugging Face Hub at http://127.0.0.1:9')
    from hub_server import HubServer
    server = HubServer()
    server.store.reject_tokens = True
    with server:
        code, _, err = cli('push', run_dir, '--repo-id', 'org/x',
                           env=dict(no_network, HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET='1'))
    one_line_error(code, err, 'refused the request (401)', 'HF_TOKEN', 'hf auth login')


# ---- 9-10. the CLI's one-line errors and settings that can only do nothing ----

@pytest.fixture(scope='module')
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    assert cli('train', '--task', 'toy', '--method', 'lora', '--data-path', data, '--output', out, '--epochs', 1,
               *TINY)[0] == 0
    return out


@pytest.mark.parametrize('extra, fragments', [
    (['--device', 'cuda'], ['--device cuda: no CUDA GPU is available here']),
    (['--img-size', '8'], ['--img-size 8 is invalid']),
    (['--mask-density', '1e-6'], ['mask_density=1e-06 keeps no entry of blocks.0.attn.qkv.lora_A']),
    (['--lora-alpha', '0'], ['lora_alpha=0.0 is invalid: must be > 0']),
    (['--mask-type', 'nm', '--mask-density', '0.5', '--rank', '6'],
     ['does not fit blocks.0.attn.qkv.lora_B', 'divisible by M=4', 'choose a rank']),
    (['--warmup-epochs', '5', '--epochs', '2'], ['--warmup-epochs 5 is longer than --epochs 2']),
])
def test_bad_flags_are_one_line_and_write_nothing(data, tmp_path, extra, fragments):
    code, _, err = cli('train', '--task', 'toy', '--data-path', data, '--output', tmp_path / 'runs', *TINY, *extra)
    one_line_error(code, err, *fragments)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('yaml_text, fragments', [
    ('epochs: "3"\n', ["epochs: '3' is a str, expected int"]),
    ('capaboost: 5\n', ['capaboost: 5 is a int, expected dict']),
    ('capaboost: {mask_density: abc}\n', ["mask_density='abc' is invalid: a number is required"]),
    ('- a list\n', ['must hold a mapping of settings, not a list']),
    ('epochs: [1\n', ['is not valid YAML']),
])
def test_bad_yaml_values_name_the_file(data, tmp_path, yaml_text, fragments):
    (tmp_path / 'bad.yaml').write_text(yaml_text)
    code, _, err = cli('train', '--task', 'toy', '--data-path', data, '--output', tmp_path / 'runs', *TINY,
                       '--config', tmp_path / 'bad.yaml')
    one_line_error(code, err, *fragments)
    assert not (tmp_path / 'runs').exists()


def test_bad_task_yaml_is_one_line(tmp_path):
    folder = make_task(tmp_path, n_test=5)
    for text, fragment, fresh in (('- 3\n', 'must hold a mapping', True), ('num_classes: [3\n', 'is not valid YAML',
                                                                         False)):
        (folder / 'task.yaml').write_text(text)
        code, _, err = cli('train', '--task', 'toy', '--data-path', tmp_path, '--output', tmp_path / 'runs', *TINY,
                           fresh=fresh)
        one_line_error(code, err, 'task.yaml', fragment)


def test_resume_errors_are_one_line(data, tmp_path):
    common = ['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', data, '--output', tmp_path,
              '--epochs', 3, *TINY]
    assert cli(*common, '--epochs', 1)[0] == 0
    run_dir = tmp_path / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    (run_dir / 'results.json').unlink()  # as if killed after epoch 1 of 3
    code, _, err = cli(*common, '--resume', '--rank', '4')  # the checkpoint has rank 8 and 1 epoch
    one_line_error(code, err, 'was made with other settings', 'capaboost.rank: 8 -> 4', 'epochs: 1 -> 3', '--name',
                   '--overwrite')
    ckpt = run_dir / 'checkpoint.pt'
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    code, _, err = cli(*common, '--resume')
    one_line_error(code, err, f'{ckpt} cannot be read as a checkpoint', '--overwrite')

    class Evil:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
    ckpt.write_bytes(pickle.dumps({'model': Evil()}))
    code, _, err = cli(*common, '--resume')
    one_line_error(code, err, f'{ckpt} cannot be read as a checkpoint')
    assert not (tmp_path / 'pwned').exists()
    code, _, err = cli(*common, '--resume', '--debug', fresh=True)
    assert code != 0 and 'Traceback' in err  # --debug shows the traceback


def test_broken_results_json_in_report_is_named(finished, tmp_path):
    bad = tmp_path / 'x' / 'results.json'
    bad.parent.mkdir()
    bad.write_text('{"task": ')
    code, _, err = cli('report', tmp_path)
    one_line_error(code, err, f'{bad} is not valid JSON')


# ---- 11-13. help, conventions, speed of the parser, progress ----

def test_help_shows_every_flag_with_help_default_and_choices():
    from capaboost_vision.vtab.cli import make_parser
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == 'command').choices
    for name, p in sub.items():
        for action in p._actions:
            if action.dest in ('help',):
                continue
            assert action.help, f'{name} {action.option_strings} has no help'
            if action.option_strings and action.default is None and not action.required and action.nargs != 0:
                assert '(default: ' in action.help, f'{name} {action.option_strings} shows no default'
    train_help = sub['train'].format_help()
    for closed in ('--mask-type {random,nm}', '--adapter-placement {parallel,sequential}', '--amp {bf16,fp16,none}',
                   '--protocol {final,val}', '-b BATCH_SIZE', '-j WORKERS'):
        assert closed in train_help.replace('--batch-size BATCH_SIZE, -b', '-b'), closed


def test_version_short_flags_equals_form_and_parser_without_torch(data, tmp_path):
    code = textwrap.dedent("""
        import sys, capaboost_vtab
        for argv in (['--version'], ['train', '--bogus'], ['--help']):
            sys.argv = ['capaboost-vtab', *argv]
            try:
                capaboost_vtab.main()
            except SystemExit:
                pass
        print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert 'capaboost-vtab 0.' in out.stdout and out.stdout.strip().endswith('NO-TORCH'), out.stdout + out.stderr
    code, out, err = cli('sweep', '--tasks=toy', '--methods=linear', '--data-path', data, '--output', tmp_path,
                         '--epochs', 1, '--model', 'vit_tiny', '--no-pretrained', '--img-size', 32, '-b', 100, '-j', 0,
                         '--warmup-epochs', 0)
    assert code == 0, err
    assert (tmp_path / 'vit_tiny' / 'toy' / 'final' / 'linear' / 'seed0' / 'results.json').is_file()


def test_warmup_from_a_yaml_is_clamped_with_a_note(data, tmp_path, capsys):
    cfg = resolve_config(dict(task='toy', method='capaboost_lora', data_path=str(data), epochs=3))
    assert cfg.warmup_epochs == 0
    err = capsys.readouterr().err
    assert 'warmup_epochs=10 (from the default) is longer than epochs=3; using 0' in err


def test_lr_is_logged_per_epoch_and_report_plot_is_never_blank(finished):
    run_dir = finished / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    header, row = (run_dir / 'metrics.csv').read_text().splitlines()[:2]
    assert header.split(',')[1] == 'lr' and float(row.split(',')[1]) > 0
    from PIL import Image
    from capaboost_vision.vtab.report import write_report
    out = write_report(finished)  # custom tasks only: their own panel
    img = Image.open(out['png']).convert('L')
    assert len(set(img.getdata())) > 20  # drawn points, text and axes, not a blank canvas
