import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from capaboost_vision.vtab import cli
from capaboost_vision.vtab.engine import train
from capaboost_vision.vtab.run_config import resolve_config
from capaboost_vision.vtab.tasks import resolve_task

TINY = ['--model', 'vit_tiny', '--no-pretrained', '--img-size', '32', '--batch-size', '100', '--workers', '0',
        '--warmup-epochs', '0']


def make_task(root: Path, name='toy', num_classes=3, n_test=60, counts=(160, 40)):
    """A VTAB-format task of generated PNGs whose class is the dominant colour channel (learnable). The splits keep
    VTAB-1k's file names; ``counts`` (train, val) are small by default: what the tests check does not need 1,000
    images, and an epoch over them costs a second each time."""
    folder = root / name
    (folder / 'images').mkdir(parents=True)
    rng = np.random.default_rng(0)
    total = counts[0] + counts[1] + n_test
    lines = []
    for i in range(total):
        label = i % num_classes
        img = rng.integers(0, 80, size=(8, 8, 3), dtype=np.uint8)
        img[..., label] += 150
        Image.fromarray(img).save(folder / 'images' / f'{i}.png')
        lines.append(f'images/{i}.png {label}')
    tr, va = counts
    splits = {'train800': lines[:tr], 'val200': lines[tr:tr + va], 'train800val200': lines[:tr + va],
              'test': lines[tr + va:]}
    for split, ls in splits.items():
        (folder / f'{split}.txt').write_text('\n'.join(ls) + '\n')
    (folder / 'task.yaml').write_text(f'num_classes: {num_classes}\ngroup: custom\n')
    return folder


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('vtab')
    make_task(root)
    return root


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize('method', ['capaboost_lora', 'capaboost_adapter', 'capaboost_prompt'])
def test_the_eva_family_trains_through_the_cli(method, data_root, tmp_path):
    """timm's Eva class (here EVA-02, with RoPE and q/v biases) trains in every form from --model, its CapaBoost
    weights trained and saved."""
    tiny = ['--no-pretrained', '--batch-size', 100, '--workers', 0, '--warmup-epochs', 0]  # 28 px: 14-px patches
    assert run_cli('train', '--task', 'toy', '--method', method, '--data-path', data_root, '--output', tmp_path,
                   '--epochs', 1, '--model', 'eva02_tiny', '--img-size', 28,
                   *(['--prompt-length', 2] if method == 'capaboost_prompt' else []), *tiny) == 0
    run_dir = tmp_path / 'eva02_tiny' / 'toy' / 'final' / method / 'seed0'
    results = json.loads((run_dir / 'results.json').read_text())
    adapter = load_file(str(run_dir / results['adapter_file']))
    assert results['epochs'] == 1 and results['trainable_params_excl_head'] > 0 and 'head.weight' in adapter
    assert sum(v.numel() for k, v in adapter.items() if not k.startswith('head.') and 'mask' not in k) == \
        results['trainable_params_excl_head']


@pytest.mark.parametrize('method', ['capaboost_lora', 'lora', 'capaboost_dora', 'capaboost_adapter', 'adapter',
                                    'capaboost_prompt', 'vpt', 'linear', 'full'])
def test_one_epoch_of_every_method_config(method, data_root, tmp_path):
    prompt = ['--prompt-length', 2] if method in ('capaboost_prompt', 'vpt') else []  # others refuse it: unused
    assert run_cli('train', '--task', 'toy', '--method', method, '--data-path', data_root, '--output', tmp_path,
                   '--epochs', 1, *prompt, *TINY) == 0
    run_dir = tmp_path / 'vit_tiny' / 'toy' / 'final' / method / 'seed0'
    results = json.loads((run_dir / 'results.json').read_text())
    assert 0 <= results['top1'] <= 100 and results['epochs'] == 1 and results['eval_split'] == 'test'
    adapter = load_file(str(run_dir / results['adapter_file']))
    assert results['adapter_file'] == ('trainable.safetensors' if method in ('linear', 'full') else 'adapter.safetensors')
    assert 'head.weight' in adapter
    if method == 'capaboost_dora':  # LoRA r=8 on qkv plus one magnitude entry per qkv output
        assert results['trainable_params_excl_head'] == 12 * (8 * (192 + 3 * 192) + 3 * 192)
        assert any(k.endswith('lora_magnitude') for k in adapter)
    if method in ('lora', 'capaboost_lora'):
        assert results['trainable_params_excl_head'] == 12 * 8 * (192 + 3 * 192)  # LoRA r=8 on qkv, both
        assert results['max_rank'] == (16 if method == 'capaboost_lora' else 8)
        assert any(k.endswith('lora_mask_A') for k in adapter) == (method == 'capaboost_lora')  # plain: no masks
    if method == 'linear':
        assert results['trainable_params_excl_head'] == 0 and set(adapter) == {'head.weight', 'head.bias'}
    config = (run_dir / 'config.yaml').read_text()
    assert f'method: {method}' in config and 'epochs: 1' in config


def test_resume_after_a_kill_equals_uninterrupted(data_root, tmp_path):
    args = ['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', data_root, '--epochs', 3,
            '--lr', '5e-3', *TINY]
    assert run_cli(*args, '--output', tmp_path / 'a') == 0

    cfg = resolve_config(dict(task='toy', method='capaboost_lora', data_path=str(data_root),
                              output=str(tmp_path / 'b'), epochs=3, lr=5e-3, model='vit_tiny', pretrained=False,
                              img_size=32, batch_size=100, workers=0, warmup_epochs=0))

    def kill(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch_end=kill)
    run_b = tmp_path / 'b' / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    assert not (run_b / 'results.json').exists() and (run_b / 'checkpoint.pt').exists()
    assert run_cli(*args, '--output', tmp_path / 'b') == 2  # unfinished run: refuses without --resume
    assert run_cli(*args, '--output', tmp_path / 'b', '--resume') == 0

    run_a = tmp_path / 'a' / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    ra, rb = (json.loads((d / 'results.json').read_text()) for d in (run_a, run_b))
    assert ra['top1'] == rb['top1']
    wa, wb = (load_file(str(d / 'adapter.safetensors')) for d in (run_a, run_b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def metrics(d):  # every column but the timing ones
        return [line.split(',')[:5] for line in (d / 'metrics.csv').read_text().splitlines()]
    assert metrics(run_a) == metrics(run_b) and len(metrics(run_a)) == 4


def test_finished_run_is_skipped_unless_overwrite(data_root, tmp_path, capsys):
    args = ['train', '--task', 'toy', '--method', 'linear', '--data-path', data_root, '--output', tmp_path,
            '--epochs', 1, *TINY]
    assert run_cli(*args) == 0
    assert run_cli(*args) == 0
    assert 'already holds this finished run' in capsys.readouterr().out
    assert run_cli(*args, '--overwrite') == 0


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    """200 train+val and 20 test images: enough for two ranks to split and agree on."""
    root = tmp_path_factory.mktemp('small')
    make_task(root, n_test=20, counts=(160, 40))
    return root


@pytest.mark.parametrize('method', ['peft_loha'])  # capaboost_lora: test_launchers' torchrun run checks the same
def test_ddp_two_processes_gloo_agree(method, small_root, tmp_path):
    if method.startswith('peft_'):
        pytest.importorskip('peft')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
           '-m', 'capaboost_vision.cli', 'train', '--task', 'toy', '--method', method, '--data-path',
           str(small_root), '--output', str(tmp_path), '--epochs', '1', *TINY]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    sums = [line.split()[-1] for line in out.stdout.splitlines() if 'trainable checksum' in line]
    assert len(sums) == 2 and sums[0] == sums[1]
    results = json.loads((tmp_path / 'vit_tiny' / 'toy' / 'final' / method / 'seed0' / 'results.json').read_text())
    assert results['world_size'] == 2


def _result(task, group, method, seed, top1, params=0.3e6):
    return dict(task=task, group=group, method=method, family='vit_base', seed=seed, top1=top1,
                trainable_params_excl_head=params)


def test_report_standard_averages_by_hand(tmp_path):
    from capaboost_vision.vtab.report import summarize, write_report
    from capaboost_vision.vtab.tasks import TASKS
    for seed in (0, 1):
        for i, task in enumerate(TASKS.values()):
            r = _result(task.name, task.group, 'capaboost_lora', seed, 50.0 + i + 2 * seed)
            d = tmp_path / task.name / f'seed{seed}'
            d.mkdir(parents=True)
            (d / 'results.json').write_text(json.dumps(r))
    rows = summarize([json.loads(p.read_text()) for p in tmp_path.rglob('results.json')])
    (row,) = rows
    # seed 0: natural tasks are i = 0..6, specialized 7..10, structured 11..18 (accuracy 50 + i)
    nat, spe, stru = 50 + 3.0, 50 + 8.5, 50 + 14.5
    by_hand_groups = (nat + spe + stru) / 3
    by_hand_tasks = 50 + 9.0
    assert row['natural']['mean'] == pytest.approx(nat + 1)  # mean over the two seeds (+0, +2)
    assert row['mean_of_groups']['mean'] == pytest.approx(by_hand_groups + 1)
    assert row['mean_of_tasks']['mean'] == pytest.approx(by_hand_tasks + 1)
    assert row['mean_of_groups']['std'] == pytest.approx(2 ** 0.5)  # stdev of (x, x + 2)
    assert row['task']['cifar']['mean'] == pytest.approx(51.0) and row['params_M'] == pytest.approx(0.3)
    out = write_report(tmp_path)
    md = out['markdown'].read_text()
    assert 'Mean (3 groups)' in md and f'{by_hand_groups + 1:.1f} ± 1.4' in md
    assert out['csv'].read_text().count('\n') == 2
    assert out['png'].read_bytes()[:4] == b'\x89PNG'


def test_check_reports_problems_with_file_and_line(tmp_path, capsys):
    folder = make_task(tmp_path, name='dtd', counts=(800, 200))
    (folder / 'task.yaml').unlink()  # a VTAB task as NOAH prepares it (no task.yaml): line counts are checked
    assert run_cli('check', '--data-path', tmp_path, '--tasks', 'dtd') == 0
    lines = (folder / 'train800.txt').read_text().splitlines()
    lines[4] = 'images/missing.png 1'
    lines[6] = 'images/7.png 99'
    lines[8] = 'no-label-here'
    (folder / 'train800.txt').write_text('\n'.join(lines[:-1]) + '\n')
    (folder / 'images' / '850.png').write_bytes(b'not a png')
    capsys.readouterr()
    assert run_cli('check', '--data-path', tmp_path, '--tasks', 'dtd') == 1
    out = capsys.readouterr().out
    assert 'train800.txt:5: image' in out and 'is missing' in out
    assert 'train800.txt:7: label 99 is outside [0, 46]' in out
    assert 'train800.txt:9: line does not parse' in out
    assert '799 lines, expected 800' in out
    assert 'val200.txt:51: image' in out and 'unreadable' in out


def test_user_errors_are_one_line_with_nonzero_exit(data_root, tmp_path, capsys):
    def err(*argv):
        code = run_cli(*argv)
        return code, capsys.readouterr().err.strip()

    code, msg = err('train', '--task', 'cifra', '--data-path', data_root, *TINY)
    assert code == 2 and "unknown task 'cifra'; did you mean 'cifar'?" in msg and '\n' not in msg
    code, msg = err('train', '--task', 'cifar', '--data-path', tmp_path / 'nowhere', *TINY)
    assert code == 2 and 'does not exist' in msg
    code, msg = err('train', '--task', 'toy', '--method', 'lorra', '--data-path', data_root, *TINY)
    assert code == 2 and "unknown method 'lorra'" in msg
    code, msg = err('train', '--task', 'toy', '--data-path', data_root, *TINY, '--model', 'resnet50')
    assert code == 2 and 'not a timm VisionTransformer/SwinTransformer' in msg
    code, msg = err('train', '--task', 'toy', '--data-path', data_root, '--num-masks', '0', *TINY,
                    '--output', tmp_path)
    assert code == 2 and 'num_masks=0 is invalid' in msg
    bad = make_task(tmp_path / 'bad', name='toy2')
    (bad / 'test.txt').write_text('images/0.png 7\n')
    code, msg = err('train', '--task', 'toy2', '--data-path', tmp_path / 'bad', '--output', tmp_path, '--epochs', 1,
                    *TINY)
    assert code == 2 and 'test.txt:1: label 7 is outside [0, 2]' in msg
    code, msg = err('train', '--task', 'toy', '--data-path', data_root, '--output', tmp_path, '--epochs', 1,
                    '--lr', '100', '--method', 'full', *TINY)
    assert code == 2 and 'training diverged at epoch 1' in msg and 'Rerun with a lower --lr' in msg


def test_sweep_runs_grid_and_skips_finished(data_root, tmp_path, capsys):
    args = ['sweep', '--tasks', 'toy', '--methods', 'linear', 'lora', '--seeds', '0', '1', '--data-path', data_root,
            '--output', tmp_path, '--epochs', 1, *TINY]
    assert run_cli(*args) == 0
    assert len(list(tmp_path.rglob('results.json'))) == 4
    capsys.readouterr()
    assert run_cli(*args) == 0  # everything already done: skipped without starting a run
    assert capsys.readouterr().out.count('skip:') == 4
    assert run_cli('report', tmp_path) == 0
    assert (tmp_path / 'report.md').is_file()


def test_task_registry_and_aliases(tmp_path):
    assert resolve_task('cifar100').name == 'cifar' and resolve_task('oxford_pet').num_classes == 37
    assert resolve_task('clevr_count_all').group == 'structured'
    (tmp_path / 'cifar100').mkdir()
    from capaboost_vision.vtab.tasks import task_dir
    assert task_dir(tmp_path, 'cifar') == tmp_path / 'cifar100'
    from capaboost_vision.vtab.tasks import expand_tasks
    # sweep/search name runs by the canonical task (what results.json records), whatever alias was given
    assert expand_tasks(['cifar100', 'pets', 'hfds/org/x'], tmp_path) == ['cifar', 'oxford_iiit_pet', 'hfds/org/x']


def test_demo_data_builder_on_real_mnist(tmp_path):
    from offline_data import build_task
    folder = build_task('mnist', tmp_path, test_size=1000)
    counts = {s: len((folder / f'{s}.txt').read_text().splitlines()) for s in
              ('train800', 'val200', 'train800val200', 'test')}
    assert counts == {'train800': 800, 'val200': 200, 'train800val200': 1000, 'test': 1000}
    train_imgs = {l.split()[0] for l in (folder / 'train800val200.txt').read_text().splitlines()}
    test_imgs = {l.split()[0] for l in (folder / 'test.txt').read_text().splitlines()}
    assert not train_imgs & test_imgs  # held out
    labels = [int(l.split()[1]) for l in (folder / 'test.txt').read_text().splitlines()]
    assert set(labels) == set(range(10))
    assert Image.open(folder / sorted(test_imgs)[0]).size == (28, 28)
    assert run_cli('check', '--data-path', tmp_path, '--tasks', 'mnist') == 0
