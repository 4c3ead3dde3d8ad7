"""The GPU subset (marked ``cuda``): run by scripts/gpu_check.sh on a lent GPU, skipped elsewhere.

The device is $CAPABOOST_TEST_DEVICE when set (gpu_check.sh --dry-run sets cpu, so every test here also runs in
``make test``'s dry run of the GPU check), else cuda when available. Only ``tmp_path`` is used, so the file also
runs without pytest (``python tests/test_cuda.py``) on a GPU machine that lacks it.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import timm
import torch

sys.path.insert(0, os.path.dirname(__file__))
import capaboost_vision as cv  # noqa: E402
from capaboost_vision import cli  # noqa: E402
from capaboost_vision.vtab.data import VTABDataset  # noqa: E402
from capaboost_vision.vtab.data_cache import CachedLoader, DecodeLoader, prepare_split  # noqa: E402
from capaboost_vision.vtab.tasks import Task  # noqa: E402

DEVICE = os.environ.get('CAPABOOST_TEST_DEVICE') or ('cuda' if torch.cuda.is_available() else None)
try:
    import pytest
    pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE is None, reason='no CUDA device')]
except ImportError:  # run directly on a GPU machine without pytest
    pytest = None

TINY = ['--model', 'vit_tiny', '--no-pretrained', '--img-size', '32', '--batch-size', '100', '--workers', '0',
        '--warmup-epochs', '0', '--device', str(DEVICE)]


def _task(root: Path) -> Path:
    """200 train+val, 40 test images: what these checks need (devices, dtypes, exactness), and quick on a CPU."""
    from test_vtab import make_task
    return make_task(root, n_test=40, counts=(160, 40))


def _train(tmp_path: Path, *extra) -> dict:
    data = tmp_path / 'data'
    if not data.exists():
        _task(data)
    assert cli.main(['train', '--task', 'toy', '--data-path', str(data), '--output', str(tmp_path / 'runs'),
                     *TINY, *map(str, extra)]) == 0
    return json.loads(next((tmp_path / 'runs').rglob('results.json')).read_text())


def test_bf16_autocast_keeps_capaboost_weights_fp32(tmp_path):
    r = _train(tmp_path, '--method', 'capaboost_lora', '--epochs', 2, '--amp', 'bf16', '--lr', '5e-3')
    assert r['device'].startswith(DEVICE) and 0 <= r['top1'] <= 100
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3).to(DEVICE)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_fp16_with_grad_scaler(tmp_path):
    r = _train(tmp_path, '--method', 'capaboost_adapter', '--epochs', 1, '--amp', 'fp16')
    assert 0 <= r['top1'] <= 100


def test_merge_on_device_matches_unmerged():
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    merged = cv.merge(model).eval()
    torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-4, atol=1e-4)


def test_prompts_on_device_follow_updates():
    model = timm.create_model('vit_tiny_capaboost_prompt', img_size=32, num_classes=3, prompt_length=2).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        first = model.eval()(x)
        again = model(x)
        for name, p in model.named_parameters():
            if 'capaboost_prompt' in name:  # only the prompts change: the output must follow
                p.add_(0.1)
        changed = model(x)
    assert torch.equal(first, again) and not torch.equal(first, changed)


def test_checkpoint_resume_is_bit_exact(tmp_path):
    args = ['--method', 'capaboost_lora', '--epochs', 3, '--lr', '5e-3']
    full = _train(tmp_path / 'a', *args)
    data = tmp_path / 'b' / 'data'
    _task(data)
    common = ['train', '--task', 'toy', '--data-path', str(data), '--output', str(tmp_path / 'b' / 'runs'), *TINY,
              *map(str, args)]
    from capaboost_vision.vtab import engine
    original = engine.train_epoch

    def stop_after_two(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(run, epoch)
    engine.train_epoch = stop_after_two
    try:
        assert cli.main(common) == 130
    finally:
        engine.train_epoch = original
    assert cli.main([*common, '--resume']) == 0
    resumed = json.loads(next((tmp_path / 'b' / 'runs').rglob('results.json')).read_text())
    assert resumed['top1'] == full['top1']


def test_cached_path_on_device_equals_decode_path(tmp_path):
    folder = _task(tmp_path)
    task = Task('toy', 3, 'custom')
    dataset = VTABDataset(folder.parent, task, 'train800val200', 32)
    device = torch.device(DEVICE)
    cached = prepare_split(dataset, tmp_path / 'cache', int(1e9), device, show_progress=False)
    assert cached.images.device.type == device.type
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    a = list(CachedLoader(cached, 64, order, device, (0.5,) * 3, (0.25,) * 3))
    b = list(DecodeLoader(dataset, 64, order, device, (0.5,) * 3, (0.25,) * 3, workers=0))
    assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_prepare_uses_fused_adamw_on_cuda(tmp_path):
    from capaboost_vision.vtab.engine import Distributed, prepare
    from capaboost_vision.vtab.run_config import resolve_config
    _task(tmp_path / 'data')
    cfg = resolve_config(dict(task='toy', method='capaboost_lora', data_path=str(tmp_path / 'data'),
                              output=str(tmp_path / 'runs'), model='vit_tiny', pretrained=False, img_size=32,
                              batch_size=100, warmup_epochs=0, epochs=1, device=DEVICE))
    run = prepare(cfg, Distributed(cfg.device))
    assert bool(run.optimizer.defaults.get('fused')) == DEVICE.startswith('cuda')
    assert isinstance(run.train_loader, CachedLoader)
    assert run.train_loader.split.images.device.type == torch.device(DEVICE).type  # the train split on the device


if __name__ == '__main__':
    if DEVICE is None:
        raise SystemExit('no CUDA device (set CAPABOOST_TEST_DEVICE=cpu to run on CPU)')
    failed = 0
    for name, fn in sorted((n, f) for n, f in globals().items() if n.startswith('test_') and callable(f)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fn(Path(tmp)) if fn.__code__.co_argcount else fn()
                print(f'PASSED {name}')
            except Exception as e:  # report every test, then fail
                failed += 1
                print(f'FAILED {name}: {type(e).__name__}: {e}')
    print(f'{failed} failed')
    sys.exit(1 if failed else 0)
