"""Run identity (a finished or checkpointed run is reused only with the same settings), atomic --overwrite, the
protocol-split report, --norm, and the learning-rate search."""
import json

import pytest
import torch
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN

from capaboost_vision.vtab import cli, engine
from capaboost_vision.vtab.report import summarize, to_markdown, write_report
from capaboost_vision.vtab.run_config import resolve_config
from capaboost_vision.vtab.search import SearchJob, search
from test_vtab import make_task

SMALL = ['--model', 'vit_tiny', '--no-pretrained', '--img-size', '32', '--batch-size', '20', '--workers', '0',
         '--warmup-epochs', '0', '--epochs', '1']


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('small')
    make_task(root, counts=(60, 30), n_test=30)
    return root


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def common(root, out, *extra):
    return ['train', '--task', 'toy', '--method', 'lora', '--data-path', root, '--output', out, *SMALL, *extra]


def test_val_then_final_reports_test_accuracy_in_separate_sections(small_root, tmp_path, capsys):
    assert run(capsys, *common(small_root, tmp_path, '--protocol', 'val'))[0] == 0
    code, out, _ = run(capsys, *common(small_root, tmp_path, '--protocol', 'final'))
    assert code == 0 and 'skip' not in out  # a final run is a new run, never the val run's number
    val = json.loads((tmp_path / 'vit_tiny/toy/val/lora/seed0/results.json').read_text())
    final = json.loads((tmp_path / 'vit_tiny/toy/final/lora/seed0/results.json').read_text())
    assert (val['eval_split'], final['eval_split']) == ('val200', 'test')
    md = write_report(tmp_path)['markdown'].read_text()
    test_part, val_part = md.split('## Validation accuracy')
    assert '## Test accuracy' in test_part and f'{final["top1"]:.1f}' in test_part
    assert f'{val["top1"]:.1f}' in val_part
    # --norm: ImageNet mean/std by default, recorded in results.json and in the adapter's config.json
    assert final['norm'] == 'imagenet' and final['mean'] == pytest.approx(list(IMAGENET_DEFAULT_MEAN))
    adapter_cfg = json.loads((tmp_path / 'vit_tiny/toy/final/lora/seed0/config.json').read_text())
    assert adapter_cfg['pretrained_cfg']['mean'] == pytest.approx(list(IMAGENET_DEFAULT_MEAN))
    assert '--norm imagenet' in (tmp_path / 'vit_tiny/toy/final/lora/seed0/README.md').read_text()


def test_changed_settings_are_refused_naming_the_fields(small_root, tmp_path, capsys):
    assert run(capsys, *common(small_root, tmp_path))[0] == 0
    results = tmp_path / 'vit_tiny/toy/final/lora/seed0/results.json'
    before = results.read_text()
    code, _, err = run(capsys, *common(small_root, tmp_path, '--lr', '3e-3', '--rank', '4'))
    assert code == 2 and err.startswith('error: ') and '\n' not in err
    assert 'lr: 0.001 -> 0.003' in err and 'capaboost.rank: 8 -> 4' in err
    assert '--name' in err and '--overwrite' in err
    assert results.read_text() == before
    code, out, _ = run(capsys, *common(small_root, tmp_path, '--workers', 2, '--eval-batch-size', 7))
    assert code == 0 and 'skip:' in out  # settings that do not change the numbers do not make another run
    assert run(capsys, *common(small_root, tmp_path, '--lr', '3e-3', '--name', 'lora_lr3e-3'))[0] == 0
    assert run(capsys, *common(small_root, tmp_path, '--lr', '3e-3', '--overwrite'))[0] == 0
    assert json.loads(results.read_text())['lr'] == 3e-3


def test_resume_refuses_a_checkpoint_with_another_lr(small_root, tmp_path, capsys):
    assert run(capsys, *common(small_root, tmp_path))[0] == 0
    (tmp_path / 'vit_tiny/toy/final/lora/seed0/results.json').unlink()  # as if killed after its last epoch
    code, _, err = run(capsys, *common(small_root, tmp_path, '--resume', '--lr', '1e-2'))
    assert code == 2 and 'checkpoint' in err and 'lr: 0.001 -> 0.01' in err


def test_interrupted_overwrite_never_resurrects_the_old_run(small_root, tmp_path, capsys):
    argv = common(small_root, tmp_path, '--epochs', 2)
    assert run(capsys, *argv)[0] == 0
    run_dir = tmp_path / 'vit_tiny/toy/final/lora/seed0'
    old_adapter = load_file(str(run_dir / 'adapter.safetensors'))
    old_written = (run_dir / 'adapter.safetensors').stat().st_mtime_ns

    def stop(epoch):
        raise KeyboardInterrupt
    cfg = resolve_config(dict(task='toy', method='lora', data_path=str(small_root), output=str(tmp_path),
                              epochs=2, batch_size=20, model='vit_tiny', pretrained=False, img_size=32, workers=0,
                              warmup_epochs=0, overwrite=True, capaboost={'seed': 0}))
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, on_epoch_end=stop)
    # only the new run's epoch-1 checkpoint is there: no old results, adapter or checkpoint
    assert not (run_dir / 'results.json').exists() and not (run_dir / 'adapter.safetensors').exists()
    assert not list(run_dir.parent.glob('.*overwritten'))
    code, _, err = run(capsys, *argv)
    assert code == 2 and 'unfinished run' in err
    code, out, _ = run(capsys, *argv, '--resume')
    assert code == 0 and 'resumed' in out and 'at epoch 1' in out
    # the adapter is the one the resumed run wrote (not the old file), and with the same settings it reproduces the
    # old run's tensors bit for bit (the files' bytes may differ: safetensors orders its metadata keys at random)
    assert (run_dir / 'adapter.safetensors').stat().st_mtime_ns > old_written
    new_adapter = load_file(str(run_dir / 'adapter.safetensors'))
    assert new_adapter.keys() == old_adapter.keys()
    assert all(torch.equal(new_adapter[k], old_adapter[k]) for k in new_adapter)


def _result(task, method, seed, top1, group='natural', protocol='final'):
    return dict(task=task, group=group, method=method, family='vit_base', seed=seed, top1=top1, lr=1e-3,
                trainable_params_excl_head=1000, protocol=protocol,
                eval_split='test' if protocol == 'final' else 'val200')


def test_report_marks_incomplete_rows_and_keeps_custom_tasks_apart():
    results = [_result('cifar', 'a', 0, 50.0), _result('cifar', 'a', 1, 52.0), _result('dtd', 'a', 0, 60.0),
               _result('dtd', 'a', 1, 62.0),
               _result('cifar', 'b', 0, 40.0), _result('cifar', 'b', 1, 42.0), _result('dtd', 'b', 0, 70.0),
               _result('toy', 'a', 0, 90.0, group='custom'), _result('toy', 'a', 1, 91.0, group='custom'),
               _result('cifar', 'a', 0, 99.0, protocol='val')]
    rows = {(r['protocol'], r['method']): r for r in summarize(results)}
    assert rows['final', 'a']['vtab_complete'] and rows['final', 'a']['mean_of_tasks']['mean'] == 56.0
    assert not rows['final', 'b']['vtab_complete'] and rows['final', 'b']['mean_of_tasks']['mean'] is None
    assert rows['final', 'a']['custom_mean']['mean'] == 90.5
    md = to_markdown(list(rows.values()))
    test_part, val_part = md.split('## Validation accuracy')
    assert 'incomplete' in test_part and 'Custom tasks' in test_part
    assert '99.0' not in test_part and '99.0' in val_part
    vtab_table = test_part.split('Custom tasks')[0]
    assert '90.5' not in vtab_table and '90.' not in vtab_table  # custom numbers never in the VTAB table


def test_search_extends_the_grid_at_an_edge_and_marks_limits(tmp_path):
    """With a stand-in trainer whose val accuracy peaks at lr 0.1, the grid [1e-3, 1e-2] grows upward."""
    runs = []

    def run_all(requests):
        runs.extend(requests)
        return []

    def results_of(request):
        return {'top1': 100 - abs(__import__('math').log10(request['lr']) + 1) * 10}
    job = SearchJob('toy', 'm', [1e-3, 1e-2])
    limited = SearchJob('toy', 'n', [1e-5, 1e-4])
    records = search([job, limited], [0, 1], 0, 2, run_all, results_of, lambda j: tmp_path)
    assert records['m@toy']['grid'] == [1e-3, 1e-2, 0.1, 1.0] and records['m@toy']['chosen_lr'] == 0.1
    assert not records['m@toy']['at_limit']
    assert records['n@toy']['chosen_lr'] == 0.01 and records['n@toy']['at_limit']  # 2 steps up, still the edge
    finals = [r for r in runs if r['protocol'] == 'final']
    assert len(finals) == 4 and {r['lr'] for r in finals if r['method'] == 'm'} == {0.1}
    assert json.loads((tmp_path / 'm.json').read_text())['chosen_lr'] == 0.1


def test_search_command_end_to_end(small_root, tmp_path, capsys):
    code, out, err = run(capsys, 'search', '--tasks', 'toy', '--methods', 'lora', '--lrs', '1e-3', '1e-2',
                         '--max-extensions', '1', '--seeds', 0, 1, '--data-path', small_root, '--output', tmp_path,
                         *SMALL)
    assert code == 0, err
    record = json.loads((tmp_path / 'vit_tiny/toy/search/lora.json').read_text())
    assert len(record['grid']) == 3  # one extension at the winning edge
    assert len(list((tmp_path / 'vit_tiny/toy/val').glob('lora_lr*/seed0/results.json'))) == 3
    for seed in (0, 1):
        final = json.loads((tmp_path / f'vit_tiny/toy/final/lora/seed{seed}/results.json').read_text())
        assert final['lr'] == record['chosen_lr'] and final['eval_split'] == 'test'
    assert 'chosen lr' in out
    assert 'Learning-rate search' in write_report(tmp_path)['markdown'].read_text()
    # a second search reuses every finished run
    code, out, _ = run(capsys, 'search', '--tasks', 'toy', '--methods', 'lora', '--lrs', '1e-3', '1e-2',
                       '--max-extensions', '1', '--seeds', 0, 1, '--data-path', small_root, '--output', tmp_path,
                       *SMALL)
    assert code == 0 and out.count('skip:') == 5


def test_train_accepts_a_plain_timm_model_name(small_root, tmp_path, capsys):
    code, out, err = run(capsys, 'train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', small_root,
                         '--output', tmp_path, *SMALL, '--model', 'vit_small_patch16_224')
    assert code == 0, err
    results = json.loads((tmp_path / 'vit_small_patch16_224/toy/final/capaboost_lora/seed0/results.json').read_text())
    assert results['max_rank'] == 16 and results['trainable_params_excl_head'] == 12 * 8 * (384 + 3 * 384)
    code, _, err = run(capsys, 'train', '--task', 'toy', '--data-path', small_root, '--output', tmp_path, *SMALL,
                       '--model', 'resnet18')
    assert code == 2 and 'not a timm VisionTransformer/SwinTransformer' in err


def test_a_custom_folder_named_like_a_vtab_task_stays_custom(tmp_path):
    from capaboost_vision.vtab.report import collect
    from capaboost_vision.vtab.tasks import resolve_task
    folder = make_task(tmp_path, name='dsprites_loc', num_classes=3, counts=(10, 5), n_test=5)
    (folder / 'task.yaml').write_text('num_classes: 3\ngroup: structured-like\n')  # VTAB's has 16 classes
    task = resolve_task('dsprites_loc', tmp_path)
    assert (task.num_classes, task.group) == (3, 'structured-like')
    run_dir = tmp_path / 'runs' / 'm'
    run_dir.mkdir(parents=True)
    (run_dir / 'results.json').write_text(json.dumps(_result('dsprites_loc', 'm', 0, 50.0, group='structured-like')))
    assert collect(tmp_path / 'runs')[0]['task'] == 'dsprites_loc (custom)'


def test_a_sweep_run_is_its_config_yaml(small_root, tmp_path, capsys):
    """sweep writes each run's resolved config.yaml and starts `train --run` on it: the file alone reruns the
    run (reused as finished), resolves to the same RunConfig, and records the typed CapaBoost block of its form
    only."""
    import yaml
    from capaboost_vision.vtab.run_config import RunConfig
    code, out, _ = run(capsys, 'sweep', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora', '--seeds', 0, 1,
                       '--data-path', small_root, '--output', tmp_path, '--rank', 4, *SMALL)
    assert code == 0
    for method in ('lora', 'capaboost_lora'):
        for seed in (0, 1):
            config_file = tmp_path / f'vit_tiny/toy/final/{method}/seed{seed}/config.yaml'
            recorded = yaml.safe_load(config_file.read_text())
            assert recorded['capaboost']['rank'] == 4 and recorded['capaboost']['seed'] == seed  # mask seed = run's
            assert not {'adapter_scale', 'prompt_length'} & set(recorded['capaboost'])  # the LoRA form's only
            planned = RunConfig.from_dict(recorded)
            resolved = resolve_config({}, str(config_file))
            assert resolved == planned and resolved.capaboost.num_masks == (1 if method == 'lora' else 2)
            for how in ('--config', '--run'):
                code, out, _ = run(capsys, 'train', how, config_file)
                assert code == 0 and 'skip:' in out
    # a changed setting in the config file is a different run: refused, naming it
    config_file = tmp_path / 'vit_tiny/toy/final/lora/seed0/config.yaml'
    config_file.write_text(config_file.read_text().replace('rank: 4', 'rank: 2'))
    code, _, err = run(capsys, 'train', '--config', config_file)
    assert code == 2 and 'capaboost.rank: 4 -> 2' in err


def test_a_planned_run_is_exactly_its_file_resolved_once(small_root, tmp_path, capsys, monkeypatch):
    """A planned run's config.yaml is what its job runs: editing the method YAML after planning changes nothing, and
    the method's block is checked (a meta-device model build for peft_*) once per run, when it is planned."""
    import shutil
    import yaml
    from capaboost_vision.vtab import launch, methods, run_config
    configs = tmp_path / 'configs'
    shutil.copytree(run_config.CONFIG_DIR, configs)
    monkeypatch.setattr(run_config, 'CONFIG_DIR', configs)
    checks = []
    real_check = methods.PeftKind.check
    monkeypatch.setattr(methods.PeftKind, 'check', lambda self, cfg, where: checks.append(cfg.method) or
                        real_check(self, cfg, where))
    code, _, err = run(capsys, 'sweep', '--tasks', 'toy', '--methods', 'peft_lora', '--data-path', small_root,
                       '--output', tmp_path / 'swept', *SMALL)
    assert code == 0 and checks == ['peft_lora'], (err, checks)  # resolved once, at planning
    args = cli.make_parser().parse_args(['train', '--task', 'toy', '--method', 'peft_lora', '--data-path',
                                         str(small_root), '--output', str(tmp_path / 'planned'), *SMALL])
    [planned] = launch.pending_runs([cli.build_run_config(args, 'toy', 'peft_lora', 0)])
    method = configs / 'methods' / 'peft_lora.yaml'  # edited after planning: r and a key the plan does not hold
    method.write_text(method.read_text().replace('r: 8', 'r: 2').replace('}', ', lora_dropout: 0.5}'))
    assert cli.main(launch.train_command(planned)) == 0
    results = json.loads((planned.parent / 'results.json').read_text())
    assert results['config'] == yaml.safe_load(planned.read_text())  # exactly the planned file
    assert results['config']['peft']['r'] == 8 and 'lora_dropout' not in results['config']['peft']
    # the same file given with other settings is refused in one line: --run runs it as planned
    code, _, err = run(capsys, 'train', '--run', planned, '--lr', '0.1')
    assert code == 2 and err.startswith('error: --run runs') and 'lr' in err
