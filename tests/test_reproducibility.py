"""Provenance in every result and model card, and the reproducibility contract: the same command on the same
machine gives bit-identical results in a fresh process (also with decode workers)."""
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

import capaboost_vision
from capaboost_vision.vtab import cli
from test_run_identity import SMALL
from test_vtab import make_task

ROOT = Path(__file__).resolve().parent.parent


def _train(data, out, method, *extra):
    return cli.main(['train', '--task', 'toy', '--method', method, '--data-path', str(data), '--output', str(out),
                     *SMALL, *extra])


def _data_sha256(folder: Path, split: str) -> str:
    """By hand: SHA-256 of the list file's bytes followed by the SHA-256 of every listed image's bytes."""
    listing = (folder / f'{split}.txt').read_bytes()
    images = hashlib.sha256()
    for line in listing.decode().split('\n'):
        if line:
            images.update((folder / line.split()[0]).read_bytes())
    return hashlib.sha256(listing + images.digest()).hexdigest()


def test_results_and_model_cards_record_their_provenance(tmp_path):
    folder = make_task(tmp_path / 'data', counts=(60, 30), n_test=30)
    assert _train(tmp_path / 'data', tmp_path / 'runs', 'capaboost_lora') == 0
    assert _train(tmp_path / 'data', tmp_path / 'runs', 'peft_lora', '--peft-args', 'r=2') == 0
    run_dir = tmp_path / 'runs/vit_tiny/toy/final/capaboost_lora/seed0'
    block = json.loads((run_dir / 'results.json').read_text())['provenance']
    versions = block['versions']
    assert versions['capaboost-vision'] == capaboost_vision.__version__ and versions['torch'] == torch.__version__
    assert versions['timm'] == timm.__version__ and versions['safetensors'] and versions['python']
    assert 'peft' not in versions  # only where the method uses it
    peft_block = json.loads((tmp_path / 'runs/vit_tiny/toy/final/peft_lora/seed0/results.json').read_text())
    assert peft_block['provenance']['versions']['peft']
    hardware = block['hardware']
    assert hardware['cpu_capability'] == torch.backends.cpu.get_cpu_capability() and hardware['cpu']
    assert hardware['threads'] == torch.get_num_threads() and hardware['amp'] is None and hardware['device'] == 'cpu'
    assert block['data_sha256'] == {split: _data_sha256(folder, split) for split in ('train800val200', 'test')}
    head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout
    assert block['git_commit'] is None or block['git_commit'].split('-')[0] == head.strip()
    card = (run_dir / 'README.md').read_text()
    assert '## Provenance' in card and f'torch {torch.__version__}' in card and block['data_sha256']['test'][:16] in card
    # rows made with other versions are named in the report
    results_file = tmp_path / 'runs/vit_tiny/toy/final/peft_lora/seed0/results.json'
    other = json.loads(results_file.read_text())
    other['provenance']['versions']['torch'] = '0.0.1'
    results_file.write_text(json.dumps(other))
    assert cli.main(['report', str(tmp_path / 'runs')]) == 0
    provenance = (tmp_path / 'runs' / 'report.md').read_text().split('## Provenance')[1]
    assert f'versions.torch: 0.0.1, {torch.__version__}' in provenance


def _train_argv(data: Path, out: Path, *extra: str) -> list:
    return ['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', str(data), '--output', str(out),
            *map(str, SMALL), '--epochs', '2', '--eval-interval', '1', *extra]


def _fresh_process_runs(*commands: list) -> None:
    """The commands one after another in one fresh process: the first starts fresh, the next after a run."""
    code = f'import sys; from capaboost_vision.vtab import cli; sys.exit(max(cli.main(a) for a in {commands!r}))'
    subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, cwd=ROOT)


def _numbers(run_dir: Path):
    with open(run_dir / 'metrics.csv') as f:  # images_per_s and epoch_s are timings
        metrics = [[row[k] for k in ('epoch', 'lr', 'train_loss', 'train_acc', 'eval_acc')] for row in csv.DictReader(f)]
    results = json.loads((run_dir / 'results.json').read_text())
    kept = {k: v for k, v in results.items() if k not in ('run_seconds', 'train_images_per_s', 'config', 'provenance')}
    return metrics, kept, load_file(str(run_dir / 'adapter.safetensors'))


def test_the_same_command_in_fresh_processes_is_bit_identical(tmp_path):
    """Each command (cached; decode path with 2 workers) runs in two processes: first in one, after the other
    command in the other, so neither a fresh process nor what an earlier run leaves behind changes a bit."""
    data = tmp_path / 'data'
    make_task(data, counts=(60, 30), n_test=30)
    commands = {extra: [_train_argv(data, tmp_path / f'{p}{len(extra)}', *extra) for p in 'ab']
                for extra in ((), ('--no-data-cache', '--workers', '2'))}
    cached, decoded = commands.values()
    _fresh_process_runs(cached[0], decoded[0])
    _fresh_process_runs(decoded[1], cached[1])
    for extra in commands:
        first, second = (_numbers(tmp_path / f'{p}{len(extra)}' / 'vit_tiny/toy/final/capaboost_lora/seed0')
                         for p in 'ab')
        assert first[0] == second[0] and first[1] == second[1]
        assert first[2].keys() == second[2].keys() and all(torch.equal(first[2][k], second[2][k]) for k in first[2])
