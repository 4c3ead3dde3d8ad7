"""The decode-once data path: bit-identical pixels and batches, identical training, shared cache, early checks."""
import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform

from capaboost_vision.vtab import cli
from capaboost_vision.vtab.data import VTABDataset, load_resized, to_float_normalized
from capaboost_vision.vtab.data_cache import CachedLoader, DecodeLoader, prepare_split
from capaboost_vision.vtab.tasks import Task
from test_vtab import TINY, make_task

TOY = Task('toy', 3, 'custom')


def test_pixels_match_the_timm_eval_transform_bit_for_bit(tmp_path):
    """Independent reference: the timm transform the engine used before the cache (squash, bicubic, ToTensor,
    Normalize), on odd-sized RGB, RGBA and greyscale images."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (20, 31, 4), dtype=np.uint8), 'RGBA'),
              Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), 'L')]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = create_transform(input_size=(3, 24, 24), is_training=False, crop_pct=1.0, crop_mode='squash',
                                 interpolation='bicubic', mean=mean, std=std)
    for i, img in enumerate(images):
        img.save(tmp_path / f'{i}.png')
        ours = to_float_normalized(torch.from_numpy(load_resized(tmp_path / f'{i}.png', 24)), mean, std)
        with Image.open(tmp_path / f'{i}.png') as f:
            assert torch.equal(ours, reference(f.convert('RGB')))


def test_cached_batches_equal_decode_batches(tmp_path):
    folder = make_task(tmp_path, n_test=20)
    dataset = VTABDataset(folder.parent, TOY, 'train800val200', 16)
    cached = prepare_split(dataset, tmp_path / 'cache', int(1e9), torch.device('cpu'), show_progress=False)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3)).tolist()
    a = list(CachedLoader(cached, 96, order, torch.device('cpu'), (0.5,) * 3, (0.5,) * 3))
    b = list(DecodeLoader(dataset, 96, order, torch.device('cpu'), (0.5,) * 3, (0.5,) * 3, workers=0))
    assert len(a) == len(b) == 3  # 200 images in batches of 96
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    # the eval form: memory-mapped from the cache file, same pixels
    mapped = prepare_split(dataset, tmp_path / 'cache', int(1e9), None, show_progress=False)
    assert isinstance(mapped.images, np.memmap) or isinstance(mapped.images.base, np.memmap)
    c = list(CachedLoader(mapped, 96, order, torch.device('cpu'), (0.5,) * 3, (0.5,) * 3))
    assert all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def _run(data, out, *extra):
    assert cli.main(['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', str(data), '--output',
                     str(out), '--epochs', '2', '--lr', '5e-3', *TINY, *map(str, extra)]) == 0
    run = out / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    return json.loads((run / 'results.json').read_text()), load_file(str(run / 'adapter.safetensors'))


def test_training_is_identical_on_cached_streamed_and_decode_paths(tmp_path):
    make_task(tmp_path / 'data')
    cached, w_cached = _run(tmp_path / 'data', tmp_path / 'a')
    decoded, w_decoded = _run(tmp_path / 'data', tmp_path / 'b', '--no-data-cache')
    streamed, w_streamed = _run(tmp_path / 'data', tmp_path / 'c', '--cache-budget-gb', '1e-6')  # over budget
    assert cached['top1'] == decoded['top1'] == streamed['top1'] and cached['data_cache'] and not decoded['data_cache']
    assert all(torch.equal(w_cached[k], w_decoded[k]) and torch.equal(w_cached[k], w_streamed[k]) for k in w_cached)
    # one cache file per (task, split, size, resize) under <output>/.cache; streamed splits leave a stamp
    assert len(list((tmp_path / 'a' / '.cache').glob('*.npy'))) == 2
    assert len(list((tmp_path / 'c' / '.cache').glob('*.ok'))) == 2


def test_cache_is_shared_and_keyed_by_size(tmp_path):
    make_task(tmp_path / 'data')
    common = ['--cache-dir', tmp_path / 'cache']
    _run(tmp_path / 'data', tmp_path / 'a', *common)
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'cache').glob('*.npy')}
    _run(tmp_path / 'data', tmp_path / 'b', *common, '--seed', '0')  # another run of the sweep: reuses the cache
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'cache').glob('*.npy')} == files
    _run(tmp_path / 'data', tmp_path / 'c', *common, '--img-size', '16')
    assert len(list((tmp_path / 'cache').glob('*16px*.npy'))) == 2 and len(files) == 2


def test_bad_test_image_fails_before_training_and_leaves_nothing(tmp_path):
    folder = make_task(tmp_path / 'data')
    (folder / 'images' / '210.png').write_bytes(b'not a png')  # test.txt lists images 200-259
    (folder / 'images' / '220.png').unlink()
    out = subprocess.run([sys.executable, '-m', 'capaboost_vision.cli', 'train', '--task', 'toy', '--method', 'lora',
                          '--data-path', str(tmp_path / 'data'), '--output', str(tmp_path / 'runs'), '--epochs', '50',
                          *TINY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and 'epoch 1' not in out.stdout
    err = out.stderr.strip()
    assert err.startswith('error: ') and '\n' not in err and 'test.txt:11: image' in err and 'cannot be decoded' in err
    assert not (tmp_path / 'runs').exists()  # nothing written or left behind


def test_sweep_runs_two_at_once_sharing_one_cache(tmp_path):
    make_task(tmp_path / 'data')
    assert cli.main(['sweep', '--tasks', 'toy', '--methods', 'linear', 'lora', '--runs-per-gpu', '2',
                     '--data-path', str(tmp_path / 'data'), '--output', str(tmp_path / 'runs'), '--epochs', '1',
                     *TINY]) == 0
    assert len(list((tmp_path / 'runs').rglob('results.json'))) == 2
    assert len(list((tmp_path / 'runs' / '.cache').glob('*.npy'))) == 2  # built once, under a lock
