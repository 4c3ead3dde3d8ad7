"""Every method kind and form gives the numbers recorded before the package was reorganised.

``fixtures/numbers_before.json`` holds, for a short seeded run of every method YAML (ViT, and the CapaBoost forms
on Swin): metrics.csv's deterministic columns, results.json's top-1 and a summary of every saved tensor, recorded
with the code of main as it was before the reorganisation (a7fc02a; ``python tests/test_numbers_unchanged.py
--record`` run in a checkout of that commit).

No comparison here depends on which CPU runs it. Two CPUs that both report ``get_cpu_capability() == 'AVX512'``
(an AMD EPYC, an Intel Xeon with AMX) run different oneDNN/MKL kernels, so every float differs in the last bits
and six optimizer steps carry that forward. So:

- bit for bit only what is bit-defined everywhere: the mask tensors (integer ``randperm`` from a seeded generator,
  stored as packed uint8) by SHA-256, tensor names, shapes and dtypes, the epoch and lr columns (the lr schedule is
  computed in Python floats from the config);
- float tensors through their float64 sum, L1 and L2 norms and a dot product with a fixed ±1 probe (sensitive to
  every entry); each may differ by ``TENSOR_TOL`` times the tensor's L1 norm (sum and probe are bounded by it);
- the train loss to ``LOSS_TOL`` relative; accuracies (whole images out of 140 train / 40 test) to one image.

One slice is left out: the key third of a fused ``attn.qkv.bias`` (trained only by ``full``). Softmax is invariant to
it, so its exact gradient is zero and its float gradient is rounding noise, which AdamW turns into lr-sized steps
in whatever direction the kernels round: measured, it alone moved by up to 1.1e-3 of L1 between kernel paths.

Measured on one Intel Xeon (2 cores, torch 2.14.1+cu130) against its own native kernels, all 20 runs, with
``python tests/test_numbers_unchanged.py --dump FILE`` under each setting and ``--deviation A B``: oneDNN and MKL
steered to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``): largest tensor deviation 1.0e-6 of L1,
loss 1.2e-6 relative; ``ATEN_CPU_CAPABILITY=avx2``: 1.1e-6 of L1, loss 2.1e-6; no accuracy moved. The tolerances
are about 50x those (the loss's also covers its 6-decimal rounding: 1e-6 on losses >= 0.07). A 1% larger
``lora_alpha`` moves capaboost_lora's tensors by 1.6e-4 of L1 and its loss by 1.8e-3: 3x and 18x past them
(``test_a_one_percent_change_is_caught``).
"""
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
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
N_TRAIN, N_TEST = 140, 40  # make_task(counts=(100, 40), n_test=40): the final protocol trains on train800val200
TENSOR_TOL = 5e-5  # of the tensor's L1 norm
LOSS_TOL = 1e-4  # relative


def summarize(name: str, tensor: torch.Tensor) -> dict:
    """What is compared of one saved tensor: its bytes' SHA-256 where they are bit-defined (not floating point),
    else float64 sums that any single changed entry moves (a fused qkv bias without its key third: see above)."""
    out = {'dtype': str(tensor.dtype), 'shape': list(tensor.shape)}
    if not tensor.dtype.is_floating_point:
        out['sha256'] = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
        return out
    if name.endswith('attn.qkv.bias'):
        tensor = tensor.view(3, -1)[[0, 2]]  # (q | k | v) -> (q | v)
    flat = tensor.detach().double().flatten()
    probe = torch.randint(0, 2, flat.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    out.update(sum=flat.sum().item(), l1=flat.abs().sum().item(), l2=flat.norm().item(),
               probe=(flat * probe).sum().item())
    return out


def run_numbers(name: str, data_root: Path, output: Path, *more: str) -> dict:
    """Train one short run through the CLI and read back what must not change."""
    from capaboost_vision import cli
    method, extra = RUNS[name]
    extra = [*extra, *more]
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
    return {'top1': results['top1'], 'metrics': metrics,
            'tensors': {k: summarize(k, v) for k, v in sorted(tensors.items())}}


def all_ones_packed(nbytes: int) -> set:
    """SHA-256 of every packed all-ones mask that takes ``nbytes`` bytes (8 * (nbytes - 1) + 1 to 8 * nbytes bits)."""
    from capaboost_vision.masks import pack_mask
    return {hashlib.sha256(pack_mask(torch.ones(n, dtype=torch.bool)).numpy().tobytes()).hexdigest()
            for n in range(8 * (nbytes - 1) + 1, 8 * nbytes + 1)}


def deviations(got: dict, want: dict) -> tuple:
    """(largest tensor deviation as a fraction of L1, largest relative loss deviation, largest accuracy deviation
    in images); the bit-defined parts must be equal. The plain forms (one branch at density 1) hold no masks since
    the recording: a recorded mask may be absent only where its bits were all ones (checked by its SHA-256)."""
    dropped = [k for k in want['tensors'] if k not in got['tensors']]
    for key in dropped:
        assert want['tensors'][key]['sha256'] in all_ones_packed(want['tensors'][key]['shape'][0]), key
    assert list(got['tensors']) == [k for k in want['tensors'] if k not in dropped]
    tensor_dev = 0.0
    for key, g in got['tensors'].items():
        w = want['tensors'][key]
        assert (g['dtype'], g['shape'], g.get('sha256')) == (w['dtype'], w['shape'], w.get('sha256')), key
        if 'l1' in w:
            scale = max(w['l1'], 1e-12)
            tensor_dev = max(tensor_dev, *(abs(g[s] - w[s]) / scale for s in ('sum', 'l1', 'l2', 'probe')))
    loss_dev, acc_dev = 0.0, 0.0
    assert len(got['metrics']) == len(want['metrics'])
    for g, w in zip(got['metrics'], want['metrics']):
        assert g[:2] == w[:2]  # epoch and lr
        loss_dev = max(loss_dev, abs(float(g[2]) - float(w[2])) / abs(float(w[2])))
        acc_dev = max(acc_dev, abs(float(g[3]) - float(w[3])) * N_TRAIN / 100,
                      abs(float(g[4] or 0) - float(w[4] or 0)) * N_TEST / 100)
    acc_dev = max(acc_dev, abs(got['top1'] - want['top1']) * N_TEST / 100)
    return tensor_dev, loss_dev, acc_dev


def make_data(root: Path) -> Path:
    make_task(root, n_test=N_TEST, counts=(100, 40))
    return root


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('numbers'))


@pytest.mark.parametrize('name', list(RUNS))
def test_numbers_are_those_recorded_before(name, data_root, tmp_path):
    expected = json.loads(FIXTURE.read_text())['runs'][name]
    tensor_dev, loss_dev, acc_dev = deviations(run_numbers(name, data_root, tmp_path), expected)
    assert tensor_dev <= TENSOR_TOL and loss_dev <= LOSS_TOL and acc_dev <= 1.01, (tensor_dev, loss_dev, acc_dev)


def test_a_one_percent_change_is_caught(data_root, tmp_path):
    """The comparison can fail: lora_alpha 8 -> 8.08 (the update's scale, 1%) is outside the tolerance."""
    expected = json.loads(FIXTURE.read_text())['runs']['capaboost_lora']
    tensor_dev, loss_dev, _ = deviations(run_numbers('capaboost_lora', data_root, tmp_path, '--lora-alpha', '8.08'),
                                         expected)
    assert tensor_dev > 2 * TENSOR_TOL and loss_dev > 10 * LOSS_TOL, (tensor_dev, loss_dev)


STEERED = {'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}  # what .ci/run also runs us under
PROBE = """
import timm, torch
torch.manual_seed(0)
m = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=3)
x = torch.randn(8, 3, 32, 32)
m(x).sum().backward()
print(torch.backends.cpu.get_cpu_capability(), m.blocks[0].attn.qkv.weight.grad.double().sum().item())
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != 'AVX512', reason='steering imitates one AVX-512 CPU '
                    'on another; this CPU has no AVX-512 kernels to steer away from')
@pytest.mark.skipif(any(os.environ.get(k) for k in (*STEERED, 'ATEN_CPU_CAPABILITY')),
                    reason='this run is itself steered (make test-kernels); make test checks the steering')
def test_steered_kernels_imitate_another_cpu():
    """The imitation .ci/run relies on is real here: with oneDNN and MKL held to AVX2 the capability string stays
    AVX512 (so nothing keyed on it can tell) and a ViT's gradients differ in the last bits."""
    here = io.StringIO()
    with redirect_stdout(here):  # this process: its native kernels (skipped above when it is itself steered)
        exec(PROBE, {})
    native = here.getvalue().split()
    steered = subprocess.run([sys.executable, '-c', PROBE], env={**os.environ, **STEERED}, capture_output=True,
                             text=True, check=True).stdout.split()
    assert native[0] == steered[0] == 'AVX512' and native[1] != steered[1]


def _all_runs() -> dict:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp) / 'data')
        torch.manual_seed(0)
        return {name: run_numbers(name, root, Path(tmp) / 'runs') for name in RUNS}


if __name__ == '__main__':
    # --record [FILE]: write the fixture (run in a checkout of the recorded commit); --dump FILE: the same numbers
    # for measuring; --deviation A B: the largest deviations between two such files, per run and overall
    if sys.argv[1] in ('--record', '--dump'):
        target = Path(sys.argv[2]) if len(sys.argv) > 2 else FIXTURE
        machine = {'torch': torch.__version__, 'cpu_capability': torch.backends.cpu.get_cpu_capability()}
        target.write_text(json.dumps({'machine': machine, 'runs': _all_runs()}, indent=1) + '\n')
        print(f'wrote {len(RUNS)} runs to {target}')
    elif sys.argv[1] == '--deviation':
        a, b = (json.loads(Path(f).read_text())['runs'] for f in sys.argv[2:4])
        worst = [0.0, 0.0, 0.0]
        for name in RUNS:
            devs = deviations(a[name], b[name])
            worst = [max(w, d) for w, d in zip(worst, devs)]
            print(f'{name:24s} tensor {devs[0]:.2e} of L1, loss {devs[1]:.2e}, accuracy {devs[2]:.0f} images')
        print(f'{"largest":24s} tensor {worst[0]:.2e} of L1, loss {worst[1]:.2e}, accuracy {worst[2]:.0f} images')
