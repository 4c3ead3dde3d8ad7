"""Every method kind and form gives the numbers recorded before the package was reorganised.

``fixtures/numbers_before.json`` holds, for a short seeded run of every method YAML (ViT, and the CapaBoost forms
on Swin): metrics.csv's deterministic columns, results.json's top-1 and a SHA-256 per saved tensor, recorded with
the code of main as it was before (``python tests/test_numbers_unchanged.py --record``). Float results depend on
the CPU's kernels, so they are compared bit for bit on the machine kind that recorded them (same torch version
and CPU capability) and to 1e-4 elsewhere (tensor hashes then cannot be compared).
"""
import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_vtab import TINY, make_task  # noqa: E402

FIXTURE = Path(__file__).parent / 'fixtures' / 'numbers_before.json'
RUNS = {  # name -> (method YAML, extra flags)
    **{m: (m, []) for m in ('capaboost_lora', 'capaboost_dora', 'capaboost_adapter', 'capaboost_prompt', 'lora',
                            'adapter', 'vpt', 'linear', 'full', 'peft_lora', 'peft_dora', 'peft_loha',
                            'peft_lokr', 'peft_vera', 'peft_fourierft', 'peft_hira', 'peft_randlora')},
    **{f'swin_{m}': (m, ['--model', 'swin_tiny_patch4_window7_224', '--img-size', '32'])
       for m in ('capaboost_lora', 'capaboost_adapter', 'capaboost_prompt')},
}
DETERMINISTIC = ('epoch', 'lr', 'train_loss', 'train_acc', 'eval_acc')  # images_per_s and epoch_s are timings


def machine() -> dict:
    return {'torch': torch.__version__, 'cpu_capability': torch.backends.cpu.get_cpu_capability()}


def run_numbers(name: str, data_root: Path, output: Path) -> dict:
    """Train one short run through the CLI and read back what must not change."""
    from capaboost_vision import cli
    method, extra = RUNS[name]
    argv = ['train', '--task', 'toy', '--method', method, '--data-path', str(data_root), '--output', str(output),
            '--epochs', '2', '--eval-interval', '1', '--name', name, *TINY, '--batch-size', '50', *extra,
            *(['--prompt-length', '2', '--prompt-rank', '2'] if method == 'capaboost_prompt' else []),
            *(['--prompt-length', '2'] if method == 'vpt' else [])]
    assert cli.main(argv) == 0, name
    run_dir = next(output.rglob(f'final/{name}/seed0'))
    results = json.loads((run_dir / 'results.json').read_text())
    with open(run_dir / 'metrics.csv') as f:
        metrics = [[row[k] for k in DETERMINISTIC] for row in csv.DictReader(f)]
    tensors = load_file(str(run_dir / results['adapter_file']))
    hashes = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(tensors.items())}
    return {'top1': results['top1'], 'metrics': metrics, 'tensors': hashes}


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('numbers')
    make_task(root, n_test=40, counts=(100, 40))
    return root


@pytest.mark.parametrize('name', list(RUNS))
def test_numbers_are_those_recorded_before(name, data_root, tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    expected = recorded['runs'][name]
    got = run_numbers(name, data_root, tmp_path)
    if recorded['machine'] == machine():  # the kernels that recorded them: bit for bit
        assert got == expected
        return
    assert got['top1'] == pytest.approx(expected['top1'], abs=1e-4)
    for row, want in zip(got['metrics'], expected['metrics']):
        assert [float(v or 0) for v in row] == pytest.approx([float(v or 0) for v in want], rel=1e-4, abs=1e-4)
    assert set(got['tensors']) == set(expected['tensors'])


if __name__ == '__main__' and sys.argv[1:] == ['--record']:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'data'
        make_task(root, n_test=40, counts=(100, 40))
        torch.manual_seed(0)
        runs = {name: run_numbers(name, root, Path(tmp) / 'runs') for name in RUNS}
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({'machine': machine(), 'runs': runs}, indent=1) + '\n')
    print(f'recorded {len(runs)} runs in {FIXTURE}')
