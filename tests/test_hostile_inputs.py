"""Careless and hostile input: nothing silently wrong, nothing written outside --output, nothing trusted from a
remote repo. Each case is one that a fresh clone of the earlier code got wrong (a stale cache trained on, a raw
traceback, a file written outside --output, a local path read on a remote repo's say-so).

CLI cases check the exit code, one ``error:`` line naming the culprit, and nothing written or left behind, through
``test_robustness.cli`` (in this process, or the real entry point in a subprocess where the case needs one).
"""
import errno
import fcntl
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import capaboost_vision as cv
from capaboost_vision.vtab import cli as cli_module
from capaboost_vision._io import DiskFullError
from capaboost_vision.vtab.data import DataError, VTABDataset, load_resized, read_list
from capaboost_vision.vtab.data_cache import prepare_split
from capaboost_vision.vtab.engine import train
from capaboost_vision.vtab.launch import pending_runs
from capaboost_vision.vtab.run_folder import run_directory
from capaboost_vision.hub import AdapterError
from capaboost_vision.vtab.run_config import RunError, resolve_config
from capaboost_vision.vtab.tasks import Task
from test_robustness import ENTRY, cli, data, files_under, one_line_error  # noqa: F401  (data: a fixture)
from test_vtab import TINY, make_task

RUN = ['--task', 'toy', '--method', 'lora', '--epochs', '1', *TINY]


def tree(path: Path):
    """Every file under ``path`` with its size and modification time: what a refused command must leave as is."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob('*') if p.is_file()}


def results_of(out: Path, name: str) -> dict:
    return json.loads((out / 'vit_tiny' / 'toy' / 'final' / name / 'seed0' / 'results.json').read_text())


# ---- 1-2. the decode-once cache: stale entries and damaged files are never trained on ----

TOY = Task('toy', 3, 'custom')


def cached_pixels(folder: Path, cache_dir: Path) -> torch.Tensor:
    split = prepare_split(VTABDataset(folder.parent, TOY, 'test', 16), cache_dir, int(1e9), None, show_progress=False)
    return torch.from_numpy(np.array(split.images))


def decoded_pixels(folder: Path) -> torch.Tensor:
    dataset = VTABDataset(folder.parent, TOY, 'test', 16)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_an_image_replaced_in_place_is_decoded_again(tmp_path):
    folder = make_task(tmp_path / 'data', n_test=20)
    before = cached_pixels(folder, tmp_path / 'cache')
    for line in (folder / 'test.txt').read_text().splitlines()[:10]:  # the same names and lists, other pixels
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / line.split()[0])
    after = cached_pixels(folder, tmp_path / 'cache')
    assert torch.equal(after, decoded_pixels(folder)) and not torch.equal(after, before)
    assert not after[:10].any() and torch.equal(after[10:], before[10:])
    headers = [json.loads(p.read_text()) for p in (tmp_path / 'cache').glob('toy-test-*.json')]
    assert len(headers) == 2 and len({h['sources_sha256'] for h in headers}) == 2  # content hash recorded


def test_an_image_rewritten_with_the_same_size_and_time_is_decoded_again(tmp_path):
    """The cache key and the data fingerprint a run records are the images' content, never their stats."""
    folder = make_task(tmp_path / 'data', n_test=20)
    before, fingerprint = cached_pixels(folder, tmp_path / 'cache'), VTABDataset(folder.parent, TOY, 'test', 16)
    fingerprint = fingerprint.fingerprint()
    image = folder / (folder / 'test.txt').read_text().split()[0]
    stat, buffer = image.stat(), io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format='PNG')
    assert len(buffer.getvalue()) < stat.st_size
    image.write_bytes(buffer.getvalue().ljust(stat.st_size, b'\0'))  # PNG readers stop at IEND: same size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = cached_pixels(folder, tmp_path / 'cache')
    assert not after[0].any() and torch.equal(after[1:], before[1:]) and torch.equal(after, decoded_pixels(folder))
    assert VTABDataset(folder.parent, TOY, 'test', 16).fingerprint() != fingerprint


def _truncate(path, shape):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _empty(path, shape):
    path.write_bytes(b'')


def _float32(path, shape):
    np.save(path, np.zeros(shape, np.float32))


def _zeroed(path, shape):
    np.save(path, np.zeros(shape, np.uint8))


def _one_pixel(path, shape):
    images = np.load(path, mmap_mode='r+')
    images[0, 0, 0, 0] ^= 1
    images.flush()


def _no_header(path, shape):
    path.with_suffix('.json').unlink()


@pytest.mark.parametrize('damage', [_truncate, _empty, _float32, _zeroed, _one_pixel, _no_header])
def test_a_damaged_cache_file_is_rebuilt_not_used(damage, tmp_path, capsys):
    folder = make_task(tmp_path / 'data', n_test=20)
    good = cached_pixels(folder, tmp_path / 'cache')
    cache_file, = (tmp_path / 'cache').glob('toy-test-*.npy')
    damage(cache_file, tuple(good.shape))
    capsys.readouterr()
    assert torch.equal(cached_pixels(folder, tmp_path / 'cache'), good)
    err = capsys.readouterr().err
    assert f'note: cache file {cache_file} cannot be used' in err and 'rebuilding it' in err
    capsys.readouterr()
    assert torch.equal(cached_pixels(folder, tmp_path / 'cache'), good)  # rebuilt: used as it is from now on
    assert capsys.readouterr().err == ''


def test_a_task_folder_of_the_same_name_with_other_images_is_another_run(tmp_path):
    """A run's identity covers the data it read (SHA-256 of its lists and images), not only the folder name the run
    folder is named after: A/dups and B/dups share a run folder, and B is reused only while its data is A's."""
    a = make_task(tmp_path / 'A', name='dups', n_test=20, counts=(30, 10))
    b = tmp_path / 'B' / 'dups'
    shutil.copytree(a, b)
    out = tmp_path / 'runs'
    argv = ['train', '--method', 'lora', '--epochs', '1', *TINY, '--output', out, '--task']
    assert cli(*argv, a)[0] == 0
    code, stdout, _ = cli(*argv, b)  # the same bytes: the same run
    assert code == 0 and 'skip:' in stdout
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b / 'images' / '45.png')  # one test image of B differs
    before = tree(out)
    code, _, err = cli(*argv, b)
    one_line_error(code, err, 'final/lora/seed0 read other data (it read ', str(a), 'split test was ')
    cfg = resolve_config(dict(task=str(b), output=str(out), model='vit_tiny', method='lora', epochs=1, img_size=32,
                              batch_size=100, pretrained=False, warmup_epochs=0))
    with pytest.raises(RunError, match='read other data'):  # a sweep's planner, too
        pending_runs([cfg])
    assert tree(out) == before


# ---- 3-4. run folders stay under --output; list paths stay in the task folder ----

@pytest.mark.parametrize('extra, fragment', [
    (['--task', '../../../data/toy'], "--task '../../../data/toy' is invalid: a plain name is required"),
    (['--task', 'toy', '--name', '../../../../escaped_name'], "--name '../../../../escaped_name' is invalid"),
    (['--task', 'toy', '--name', 'a/b'], "--name 'a/b' is invalid"),
])
def test_run_folders_never_leave_output(data, tmp_path, extra, fragment):
    before = tree(tmp_path.parent)
    code, _, err = cli('train', '--data-path', data, '--output', tmp_path / 'runs', *TINY, *extra, cwd=tmp_path)
    one_line_error(code, err, fragment)
    assert tree(tmp_path.parent) == before


def test_a_run_folder_that_resolves_outside_output_is_refused(data, tmp_path):
    (tmp_path / 'runs').mkdir()
    (tmp_path / 'runs' / 'vit_tiny').symlink_to(tmp_path / 'elsewhere', target_is_directory=True)
    cfg = resolve_config(dict(task='toy', data_path=str(data), output=str(tmp_path / 'runs'), model='vit_tiny'))
    with pytest.raises(RunError, match='resolves to .*outside --output'):
        run_directory(cfg)


def test_list_paths_outside_the_task_folder_are_refused(tmp_path, capsys):
    folder = make_task(tmp_path / 'data', n_test=5)
    bad = ['/tmp/secret.png', '../../outside.png', 'images/../../outside.png', 'C:/secret.png']
    (folder / 'test.txt').write_text('images/0.png 0\n' + ''.join(f'{path} 1\n' for path in bad))
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs')
    one_line_error(code, err, f"{folder / 'test.txt'}:2: image path '/tmp/secret.png' leaves the task folder")
    assert not (tmp_path / 'runs').exists()
    capsys.readouterr()
    assert cli_module.main(['check', '--data-path', str(tmp_path / 'data'), '--tasks', 'toy']) == 1
    out = capsys.readouterr().out
    for lineno, path in enumerate(bad, 2):  # check names every one
        assert f'test.txt:{lineno}: image path {path!r} leaves the task folder' in out


# ---- 5-6. every number has a range; every error names its real culprit ----

@pytest.mark.parametrize('extra, fragment', [
    (['--lr', '1e300'], '--lr 1e+300 is invalid: must lie in (0, 100]'),
    (['--drop-path', '1.5'], '--drop-path 1.5 is invalid: must lie in [0, 1)'),
    (['--label-smoothing', '1.5'], '--label-smoothing 1.5 is invalid: must lie in [0, 1)'),
    (['--weight-decay', 'nan'], '--weight-decay nan is invalid'),
    (['--clip-grad', 'nan'], '--clip-grad nan is invalid: must be >= 0 and finite'),
    (['--lora-alpha', 'nan'], '--lora-alpha: lora_alpha=nan is invalid: must be > 0 and finite'),
    (['--lora-alpha', 'inf'], '--lora-alpha: lora_alpha=inf is invalid'),
    (['--method', 'capaboost_adapter', '--adapter-scale', 'nan'], '--adapter-scale: adapter_scale=nan is invalid'),
    (['--seed', '-1'], '--seed -1 is invalid: an integer >= 0 is required'),
])
def test_numbers_outside_their_range_are_refused_naming_the_flag(data, tmp_path, extra, fragment):
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', tmp_path / 'runs', *extra)
    one_line_error(code, err, fragment)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('argv, fragment', [
    (['train', *RUN, '--nm', '1', '4'], '--nm: nm applies to mask_type="nm" only; with mask_type=\'random\''),
    (['train', *RUN, '--adapter-bottleneck', '16'], '--adapter-bottleneck: adapter_bottleneck applies to the adapter '
                                                    "form only; this method has form 'lora'"),
    (['train', *RUN, '--method', 'capaboost_prompt', '--rank', '4'], '--rank: rank applies to the lora form only'),
    (['search', '--tasks', 'toy', '--methods', 'lora', '--max-extensions', '-1', *TINY],
     '--max-extensions -1 is invalid: an integer in [0, 100]'),
    (['search', '--tasks', 'toy', '--methods', 'lora', '--lrs', '1e-3', 'inf', *TINY], '--lrs inf is invalid'),
    # the same runs planned twice (a search's jobs would overwrite each other's record)
    (['search', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora', 'lora', *TINY],
     '--methods: lora is given twice'),
    (['search', '--tasks', 'toy', 'toy', '--methods', 'lora', *TINY], '--tasks: toy is given twice'),
    (['sweep', '--tasks', 'toy', '--methods', 'lora', '--seeds', '0', '1', '0', *TINY], '--seeds: 0 is given twice'),
])
def test_settings_meaningless_together_are_refused(data, tmp_path, argv, fragment):
    """A setting is checked against its meaning: one the method would ignore, or a search that cannot be run."""
    code, _, err = cli(*argv, '--data-path', data, '--output', tmp_path / 'runs')
    one_line_error(code, err, fragment)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('text, fragment', [
    ('lr: .nan\n', 'bad.yaml: lr nan is invalid'),
    ('capaboost: {lora_alpha: .inf}\n', 'bad.yaml: capaboost.lora_alpha: lora_alpha=inf is invalid'),
    ('capaboost: {mask_densty: 0.5}\n', "bad.yaml: capaboost.mask_densty: unknown CapaBoost setting 'mask_densty' "
                                        "(did you mean 'mask_density'?)"),
])
def test_bad_yaml_numbers_and_typos_name_the_file_before_any_run(data, tmp_path, text, fragment):
    (tmp_path / 'bad.yaml').write_text(text)
    for command in (['train', *RUN], ['sweep', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora',
                                      '--epochs', '1', *TINY],
                    ['search', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora', '--epochs', '1', *TINY]):
        code, _, err = cli(*command, '--data-path', data, '--output', tmp_path / 'runs', '--config',
                           tmp_path / 'bad.yaml')
        one_line_error(code, err, fragment)
        assert not (tmp_path / 'runs').exists()


def test_every_image_mode_converts_faithfully_or_is_refused_by_check_and_training(tmp_path, capsys):
    """16-bit grey is scaled to 8 bits, not clipped to white; a mode without a fixed range (32-bit float) is one
    problem line in check and one error line in training, both naming the file and its mode."""
    folder = make_task(tmp_path / 'data', n_test=6, counts=(6, 3))
    grey16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    Image.fromarray(grey16).save(folder / 'images' / '0.png')
    assert Image.open(folder / 'images' / '0.png').mode in ('I;16', 'I')
    expected = ((grey16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert all(np.array_equal(channel, expected) for channel in load_resized(folder / 'images' / '0.png', 8))
    Image.fromarray(np.ones((8, 8), np.float32)).save(folder / 'images' / '1.png', format='TIFF')
    fragment = f":2: image {folder / 'images' / '1.png'} has mode F, which has no faithful"
    capsys.readouterr()
    assert cli_module.main(['check', '--data-path', str(tmp_path / 'data'), '--tasks', 'toy']) == 1
    assert f"train800.txt{fragment}" in capsys.readouterr().out
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs')
    one_line_error(code, err, f"train800val200.txt{fragment}")


def test_a_degenerate_task_and_leakage_between_splits_are_warned_about_by_check_and_training(tmp_path, capsys):
    folder = make_task(tmp_path / 'data', n_test=6, counts=(6, 3))
    lines = (folder / 'test.txt').read_text().splitlines()
    (folder / 'images' / 'copy.png').write_bytes((folder / 'images' / '0.png').read_bytes())  # a train image ...
    (folder / 'test.txt').write_text('\n'.join(['images/copy.png 0', *lines[1:]]) + '\n')  # ... in test, renamed
    leak = f"1 of 6 images of {folder / 'test.txt'} are byte-identical to images of {folder / 'train800val200.txt'} " \
           f"(e.g. images/copy.png = images/0.png)"
    capsys.readouterr()
    assert cli_module.main(['check', '--data-path', str(tmp_path / 'data'), '--tasks', 'toy']) == 0
    assert f'warning: {leak}' in capsys.readouterr().out
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs')
    assert code == 0 and err.count('warning: ') == 1 and f'warning: {leak}' in err
    (folder / 'task.yaml').write_text('num_classes: 1\n')
    for split in ('train800', 'val200', 'train800val200', 'test'):  # every label 0
        text = (folder / f'{split}.txt').read_text()
        (folder / f'{split}.txt').write_text(re.sub(r' \d+$', ' 0', text, flags=re.M))
    one_class = 'warning: the task has 1 class: every prediction is right, and top-1 says nothing'
    assert cli_module.main(['check', '--data-path', str(tmp_path / 'data'), '--tasks', 'toy']) == 0
    assert one_class in capsys.readouterr().out
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs', '--name', 'one')
    assert code == 0 and one_class in err


def test_labels_are_ascii_integers(tmp_path):
    folder = make_task(tmp_path / 'data', n_test=5)
    (folder / 'test.txt').write_text('images/0.png 0\nimages/1.png ²\n')
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs')
    one_line_error(code, err, f'{folder / "test.txt"}:2: line does not parse', 'ASCII digits')
    for label in ('١', '1.0', '+1', '1e0'):  # '١' is a digit to str.isdigit(), and int() reads it as 1
        (folder / 'test.txt').write_text(f'images/0.png 0\nimages/1.png {label}\n')
        with pytest.raises(DataError, match='test.txt:2: line does not parse'):
            read_list(folder / 'test.txt', 3)


def test_task_yaml_sizes_and_missing_data_paths_name_the_culprit(tmp_path):
    folder = make_task(tmp_path / 'data', n_test=5)
    (folder / 'task.yaml').write_text('num_classes: 1000000000000\n')
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs')
    one_line_error(code, err, f'{folder / "task.yaml"}: num_classes 1000000000000 is invalid')
    code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'nowhere', '--output', tmp_path / 'runs')
    one_line_error(code, err, f'--data-path {tmp_path / "nowhere"} does not exist')
    code, _, err = cli('train', *RUN, '--task', 'my_task', '--data-path', tmp_path / 'data', '--output',
                       tmp_path / 'runs')
    one_line_error(code, err, "unknown task 'my_task'", f'{tmp_path / "data" / "my_task"} is not a folder holding')
    for text, fragment in (('num_classes: 3\nlable_names: [a, b, c]\n', "unknown key 'lable_names' (did you mean "
                                                                          "'label_names'?)"),
                           ('num_classes: 3\nlabel_names: [a, b, a]\n', "label_names repeats 'a'"),
                           ('num_classes: 3\nlabel_names: abc\n', 'label_names must be a list of 3 non-empty')):
        (folder / 'task.yaml').write_text(text)
        code, _, err = cli('train', *RUN, '--data-path', tmp_path / 'data', '--output', tmp_path / 'runs')
        one_line_error(code, err, f'{folder / "task.yaml"}: {fragment}')
    assert not (tmp_path / 'runs').exists()


def test_each_error_names_its_real_culprit(data, tmp_path):
    """The flag, file or argument at fault, not a neighbour it upsets."""
    out = tmp_path / 'runs'
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', out, '--epochs', '-1')
    one_line_error(code, err, '--epochs -1 is invalid')
    other = tmp_path / 'small.safetensors'  # base weights of another architecture
    save_file(timm.create_model('vit_small_patch16_224', num_classes=0).state_dict(), str(other))
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', out, '--weights', other)
    one_line_error(code, err, f'--weights {other} does not fit --model vit_tiny (another architecture?)', 'size')
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', out, '--task', 'hfds/')
    one_line_error(code, err, "--task 'hfds/' names no dataset")
    assert not out.exists()
    assert cli_module.main(['train', *RUN, '--data-path', str(data), '--output', str(out)]) == 0
    results = out / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0' / 'results.json'
    results.write_text(results.read_text()[:-20])  # damaged
    code, _, err = cli('eval', results.parent)
    one_line_error(code, err, f'{results} is not valid JSON')
    with pytest.raises(ValueError, match='config must be a CapaBoostConfig'):
        cv.apply_capaboost(timm.create_model('vit_tiny_patch16_224', img_size=32), None)


def test_leftovers_of_a_killed_write_are_removed_by_the_next_command_that_takes_their_lock(data, tmp_path):
    """A SIGKILL between an atomic write and its rename leaves its temp file (named as ``atomic_path`` names it),
    and one during --overwrite half of the old folder; the next run of that folder, or the next build of that cache
    file, removes them under the lock and says so."""
    out = tmp_path / 'runs'
    assert cli_module.main(['train', *RUN, '--data-path', str(data), '--output', str(out)]) == 0
    run_dir = out / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    left = [Path(tempfile.mkstemp(dir=run_dir, prefix=f'.{name}.', suffix='.tmp')[1])
            for name in ('checkpoint.pt', 'config.yaml')]
    (run_dir.parent / '.seed0.overwritten' / 'splits').mkdir(parents=True)
    cache = next((out / '.cache').glob('toy-train800val200-*.npy'))
    cache_left = Path(tempfile.mkstemp(dir=cache.parent, prefix=f'.{cache.name}.', suffix='.tmp')[1])
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', out)  # skips the finished run
    assert code == 0 and f'note: removed what an interrupted command left in {run_dir}: ' in err
    assert not any(p.exists() for p in left) and not (run_dir.parent / '.seed0.overwritten').exists()
    assert cache_left.exists()  # not this command's lock: a concurrent build could own it
    cache.unlink()  # the next build of that cache file takes its lock
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', out, '--name', 'again')
    assert code == 0 and f'note: removed what an interrupted command left in {cache.parent}: {cache_left.name}' in err
    assert not cache_left.exists()


# ---- 7. a full disk: one line, the previous checkpoint kept ----

@pytest.fixture
def small_disk(tmp_path):
    """A factory of small tmpfs mounts (root only; skipped elsewhere, or where mounting is not allowed)."""
    if os.geteuid() != 0 or not shutil.which('mount'):
        pytest.skip('the full-disk cases mount a small tmpfs, which needs root')
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f'disk{len(mounts)}'
        folder.mkdir()
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f'cannot mount a tmpfs here: {done.stderr.decode().strip()}')
        mounts.append(folder)
        return folder
    yield mount
    for folder in mounts:
        subprocess.run(['umount', '-l', str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the disk is full."""
    filler = folder / 'filler'
    with open(filler, 'wb', buffering=0) as f:  # unbuffered: closing it has nothing left to write
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_at_the_first_checkpoint_is_one_line(data, tmp_path, small_disk):
    disk = small_disk('256k')  # the run folder's config fits, LoRA r=8's checkpoint (~0.9 MB) does not
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', disk / 'runs', '--cache-dir',
                       tmp_path / 'cache')
    run_dir = disk / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    one_line_error(code, err, f'cannot write {run_dir / "checkpoint.pt"}: no space left on the device', 'MB free')
    assert not [p for p in files_under(disk) if p.name.endswith('.tmp')]


def test_a_file_size_limit_at_the_first_checkpoint_is_one_line(data, tmp_path):
    """ulimit -f (EFBIG, or torch's bare 'file write failed' under it) is named as such, in one line."""
    limit = 256 * 1024  # config.yaml fits, LoRA r=8's checkpoint (~0.9 MB) does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = subprocess.run([*ENTRY, 'train', *RUN, '--data-path', str(data), '--output', str(tmp_path / 'runs'),
                          '--no-data-cache'], capture_output=True, text=True, timeout=300, preexec_fn=limited)
    run_dir = tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    one_line_error(out.returncode, out.stderr.strip(), f'cannot write {run_dir / "checkpoint.pt"}: it exceeds this '
                                                      f"process's file-size limit (ulimit -f: 0.3 MB)")
    assert not [p for p in files_under(tmp_path) if p.name.endswith('.tmp')]


def test_a_full_disk_later_keeps_the_last_checkpoint_and_resumes(data, tmp_path, small_disk):
    disk = small_disk('1m')  # room for two LoRA r=1 checkpoints (~0.13 MB each), until the filler takes it
    cfg = resolve_config(dict(task='toy', method='lora', data_path=str(data), output=str(disk / 'runs'),
                              cache_dir=str(tmp_path / 'cache'), epochs=3, model='vit_tiny', pretrained=False,
                              img_size=32, batch_size=100, workers=0, warmup_epochs=0, capaboost=dict(rank=1)))
    run_dir = run_directory(cfg)
    fillers = []
    with pytest.raises(DiskFullError, match=f'cannot write {run_dir / "checkpoint.pt"}: no space left .* the '
                                            f'previous checkpoint.pt is unchanged'):
        train(cfg, on_epoch_end=lambda epoch: fillers.append(fill(disk)) if epoch == 1 else None)
    kept = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    assert kept['epoch'] == 1 and not [p for p in files_under(disk) if p.name.endswith('.tmp')]
    fillers.pop().unlink()
    cfg.resume = True  # the adapter write at the end meets a full disk too: the same one line
    with pytest.raises(DiskFullError, match=f'cannot write {run_dir / "adapter.safetensors"}'):
        train(cfg, on_epoch_end=lambda epoch: fillers.append(fill(disk)) if epoch == 3 else None)
    fillers.pop().unlink()
    assert not (run_dir / 'results.json').exists()
    assert train(cfg)['epochs'] == 3  # the last checkpoint (epoch 3) finishes the run


# ---- 8. SIGTERM and SIGINT stop after the current step and say how to resume ----

@pytest.mark.parametrize('sig, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_naming_the_checkpoint(data, tmp_path, sig, code):
    out = tmp_path / 'runs'
    argv = [*ENTRY, 'train', *RUN[:4], '--epochs', '200', *TINY, '--data-path', str(data), '--output', str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # epoch 2 is checkpointed: the run is well inside its loop
        if line.startswith('epoch 2/200'):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    run_dir = out / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    assert proc.returncode == code, err[-2000:]
    one_line_error(2, err.strip(), f'stopped by {sig.name} ', f'the last checkpoint is {run_dir}/checkpoint.pt',
                   'rerun the same command with --resume')
    # mid-epoch after a step, or "after epoch N" when it lands after the epoch's last step (evaluation, checkpoint)
    assert re.search(rf'stopped by {sig.name} (at epoch \d+, step \d+ of \d+|after epoch \d+);', err), err
    epoch = torch.load(run_dir / 'checkpoint.pt', weights_only=True)['epoch']
    assert f'(epoch {epoch} of 200)' in err and epoch >= 2
    assert not [p for p in files_under(out) if p.name.endswith('.tmp')]


# ---- 9. a busy run folder is refused before any preparation ----

def test_a_busy_run_folder_is_refused_before_model_and_data(data, tmp_path):
    run_dir = tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    run_dir.parent.mkdir(parents=True)
    with open(run_dir.parent / '.seed0.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run holds the folder
        code, out, err = cli('train', *RUN, '--data-path', data, '--output', tmp_path / 'runs')
    one_line_error(code, err, f'{run_dir} is being written by another run')
    assert 'trainable' not in out and not (tmp_path / 'runs' / '.cache').exists()  # no model, no data read


# ---- 10. report: malformed results are skipped, named, and counted ----

def test_report_skips_malformed_results_naming_them(data, tmp_path):
    out = tmp_path / 'runs'
    assert cli_module.main(['train', *RUN, '--data-path', str(data), '--output', str(out)]) == 0
    good = out / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0' / 'results.json'
    top1 = json.loads(good.read_text())['top1']
    bad = {}
    for i, value in enumerate(['"abc"', 'null', 'NaN', '1e400', '-5']):
        bad[value] = out / 'vit_tiny' / 'toy' / 'final' / f'broken{i}' / 'seed0' / 'results.json'
        bad[value].parent.mkdir(parents=True)
        bad[value].write_text(good.read_text().replace(f'"top1": {top1}', f'"top1": {value}'))
    folder = out / 'vit_tiny' / 'toy' / 'final' / 'folder' / 'seed0' / 'results.json'
    folder.mkdir(parents=True)  # a results.json that is a folder: skipped, named, like the others
    evil = out / 'vit_tiny' / 'toy' / 'final' / 'evil' / 'seed0' / 'results.json'  # a name that would break a table
    evil.parent.mkdir(parents=True)
    evil.write_text(json.dumps(dict(json.loads(good.read_text()), method='a|b\nc')))
    code, _, err = cli('report', out)
    assert code == 0, err
    expected = {str(bad[v]): f'note: skipped {bad[v]}: top1 {json.loads(v)!r} is not a finite accuracy in [0, 100]'
                for v in bad}
    expected[str(folder)] = f'note: skipped {folder} cannot be read (Is a directory)'
    assert err.splitlines() == [expected[k] for k in sorted(expected)]
    report = (out / 'report.md').read_text()
    tables, skipped = report.split('## Skipped results')
    assert '| lora |' in tables and 'broken' not in tables and '| a\\|b c |' in tables
    assert '6 malformed results.json file(s) are not in the tables above' in skipped
    assert all(str(path) in skipped for path in [*bad.values(), folder])
    code, _, err = cli('train', *RUN, '--data-path', data, '--output', out, '--name', 'a|b')
    one_line_error(code, err, "--name 'a|b' is invalid: a plain name is required (printable, no path separators")


# ---- 11. a remote repo's config.json is data: checked before anything is built ----

def _deeply_nested(config):
    config['model_args']['rank'] = json.loads('[' * 500 + ']' * 500)  # written below as 100,000 levels
    config['deep'] = True


# hostile config.json edits -> the fragment every entry point's one-line refusal names
HOSTILE = {
    'local adapter path': (lambda c: c['model_args'].update(adapter='/some/local/path'),
                           '"model_args.adapter" is not allowed'),
    'overlay': (lambda c: c['model_args'].update(pretrained_cfg_overlay={'file': '/etc/passwd'}),
                '"model_args.pretrained_cfg_overlay" is not allowed'),
    'checkpoint path': (lambda c: c['model_args'].update(checkpoint_path='/etc/passwd'),
                        '"model_args.checkpoint_path" is not allowed'),
    'unknown model arg': (lambda c: c['model_args'].update(no_such_arg=1), '"model_args.no_such_arg" is not allowed'),
    'weights file': (lambda c: c['pretrained_cfg'].update(file='/etc/passwd'), '"pretrained_cfg.file" is not allowed'),
    'tag': (lambda c: c['pretrained_cfg'].update(tag='../../x'),
            '"pretrained_cfg.tag" \'../../x\' is not a pretrained tag'),
    'plain architecture': (lambda c: c.update(architecture='vit_tiny_patch16_224'), "'vit_tiny_patch16_224'"),
    'huge head': (lambda c: (c.update(num_classes=10 ** 12), c['model_args'].update(num_classes=10 ** 12)),
                  '"num_classes" 1000000000000 is outside [1, 1,000,000]'),
    'huge rank': (lambda c: c['model_args'].update(rank=10 ** 9), 'rank=1000000000 is invalid'),
    'label names text': (lambda c: c.update(label_names='abc'), '"label_names" must be a list of 3 non-empty strings'),
    'label names too many': (lambda c: c.update(label_names=['a', 'b', 'c', 'd']), '"label_names" must be a list of 3'),
    'label names repeated': (lambda c: c.update(label_names=['a', 'b', 'a']), '"label_names" repeats \'a\''),
    'unknown key': (lambda c: c.update(lable_names=['a', 'b', 'c']), 'unknown key "lable_names"'),
    'deeply nested': (_deeply_nested, 'nested too deeply'),
}


def _repo_variant(tmp_path, name, edit):
    model = timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3)
    folder = tmp_path / name
    cv.save_adapter(model, folder)
    config = json.loads((folder / 'config.json').read_text())
    edit(config)
    text = json.dumps(config)
    if config.pop('deep', False):
        text = text.replace('[' * 500, '[' * 100_000).replace(']' * 500, ']' * 100_000)
    (folder / 'config.json').write_text(text)
    return folder


# Every way into our code from an adapter repo, run in one fresh process against the loopback Hub. timm's own
# create_model('hf-hub:'/'local-dir:') reads the file before our entry point runs: of a plain architecture it builds
# that plain timm model (our code is never called); a nesting too deep for Python's json fails inside timm; and a
# pretrained_cfg_overlay in model_args collides with timm's own argument (TypeError) before our code is called.
WALK = """
import json, sys, timm, capaboost_vision as cv
from huggingface_hub import snapshot_download
sys.path.insert(0, {tests!r})
from test_robustness import cli
data, image, folders, out = {data!r}, {image!r}, {folders!r}, {out!r}
def api(call):
    try:
        call()
        return 0, 'accepted'
    except cv.hub.AdapterError as e:
        return 2, f'error: {{e}}'
    except Exception as e:
        return 1, f'{{type(e).__name__}}: {{e}}'[:300]
tiny = lambda **kw: timm.create_model('vit_tiny_capaboost_lora', img_size=32, num_classes=3, **kw)
seen = {{}}
for case, folder in folders.items():
    src = 'hf-hub:tester/' + case.replace(' ', '-')
    seen[case] = {{
        'create_model(hf-hub:)': api(lambda: timm.create_model(src, pretrained=True)),
        'create_model(local-dir:)': api(lambda: timm.create_model('local-dir:' + folder, pretrained=True)),
        'create_model(adapter=)': api(lambda: tiny(adapter=src)),
        'load_adapter': api(lambda: cv.load_adapter(tiny(), src)),
        'load_classifier': api(lambda: cv.load_classifier(src)),
        'eval': cli('eval', src, '--task', 'toy', '--data-path', data)[::2],
        'predict': cli('predict', src, image)[::2],
        'rank': cli('rank', src)[::2],
        'push_folder_to_hub of a download': api(lambda: cv.hub.push_folder_to_hub(
            snapshot_download(src[7:], local_dir=out + '/' + case), 'tester/copy')),
    }}
print(json.dumps(seen))
"""
NOT_OURS = {('plain architecture', 'create_model(hf-hub:)'), ('plain architecture', 'create_model(local-dir:)'),
            ('deeply nested', 'create_model(hf-hub:)'), ('deeply nested', 'create_model(local-dir:)'),
            ('overlay', 'create_model(hf-hub:)'), ('overlay', 'create_model(local-dir:)')}


def test_every_entry_point_refuses_every_hostile_repo_config(hub, data, tmp_path):
    """A remote config.json is data: create_model ('hf-hub:', 'local-dir:', adapter=), load_adapter,
    load_classifier, eval, predict, rank and push of a downloaded folder all run the one schema check, and each
    refuses each hostile file in one line naming the key, before anything is built or read from it."""
    server, env = hub
    folders = {}
    for case, (edit, _) in HOSTILE.items():
        folders[case] = str(_repo_variant(tmp_path, case.replace(' ', '_'), edit))
        repo = 'tester/' + case.replace(' ', '-')
        server.store.create(repo)
        files = server.store.repos[repo]['commits'][server.store.repos[repo]['branches']['main']]
        files.update({p.name: p.read_bytes() for p in Path(folders[case]).iterdir()})
    image = tmp_path / 'one.png'
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    code = WALK.format(tests=str(Path(__file__).parent), data=str(data), image=str(image), folders=folders,
                       out=str(tmp_path / 'downloads'))
    run = subprocess.run([sys.executable, '-c', code], env=dict(env, HF_HUB_OFFLINE='0'), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert 'tester/copy' not in server.store.repos  # nothing was pushed
    wrong = {}
    for case, (_, fragment) in HOSTILE.items():
        for entry, (code, err) in seen[case].items():
            if (case, entry) in NOT_OURS:
                continue
            if code != 2 or not err.startswith('error: ') or '\n' in err or fragment not in err:
                wrong[f'{case} / {entry}'] = (code, err[:300])
    assert not wrong, json.dumps(wrong, indent=1)


def test_no_command_writes_into_a_run_folder_or_over_a_file_unasked(data, tmp_path):
    """predict's --output and report's --prefix never land in a run (or adapter) folder, whatever the file name; an
    existing --output is replaced only with --overwrite. Each refusal is one line and changes nothing."""
    out = tmp_path / 'runs'
    assert cli_module.main(['train', *RUN, '--data-path', str(data), '--output', str(out)]) == 0
    run_dir = out / 'vit_tiny' / 'toy' / 'final' / 'lora' / 'seed0'
    image = data / 'toy' / 'images' / '0.png'
    before = tree(out)
    for target in ('results.json', 'adapter.safetensors', 'new.csv', 'splits/x.csv'):
        code, _, err = cli('predict', run_dir, image, '--output', run_dir / target, '--overwrite')
        one_line_error(code, err, f'--output {run_dir / target} is inside {run_dir.resolve()}, a run or adapter folder')
    code, _, err = cli('report', out, '--prefix', run_dir / 'report')
    one_line_error(code, err, f'--prefix {run_dir / "report"} is inside {run_dir.resolve()}')
    code, _, err = cli('report', run_dir)  # its default prefix is <runs_dir>/report: here, inside the run
    one_line_error(code, err, 'a run or adapter folder')
    assert tree(out) == before
    preds = tmp_path / 'preds.csv'
    preds.write_text('keep me')
    code, _, err = cli('predict', run_dir, image, '--output', preds)
    one_line_error(code, err, f'--output {preds} exists: pass --overwrite to replace it')
    assert preds.read_text() == 'keep me'
    code, _, err = cli('predict', run_dir, image, '--output', tmp_path)
    one_line_error(code, err, f'--output {tmp_path} is a folder')
    assert cli('predict', run_dir, image, '--output', preds, '--overwrite')[0] == 0 and preds.read_text() != 'keep me'


def test_search_refuses_the_same_task_and_method_twice_before_any_run(tmp_path):
    """A script calling ``search`` with a method listed twice (scripts/offline_suite.py does) is one error up front,
    not a KeyError after the first round of runs."""
    from capaboost_vision.vtab.search import SearchJob, search
    ran = []
    jobs = [SearchJob('toy', 'lora', [1e-3]), SearchJob('toy', 'capaboost_lora', [1e-3]), SearchJob('toy', 'lora', [1e-3])]
    with pytest.raises(RunError, match='method lora is searched twice on task toy'):
        search(jobs, [0], 0, 0, lambda requests: ran.extend(requests) or [], lambda request: {'top1': 1.0},
               lambda job: tmp_path)
    assert ran == [] and list(tmp_path.iterdir()) == []
