"""``report --compare``: statistics checked against hand computations on a synthetic runs folder, the settings
check, the command line, and a real tiny search."""
import json
import math
from pathlib import Path

import pytest

from capaboost_vision.vtab import cli
from capaboost_vision.vtab.compare import bootstrap_interval, compare, comparisons_markdown, sign_test, t_interval
from capaboost_vision.vtab.curve import curve_points, pairs
from capaboost_vision.vtab.report import collect
from capaboost_vision.vtab.run_config import RunError
from test_robustness import files_under
from test_run_identity import SMALL
from test_vtab import make_task

GROUP = {'cifar': 'natural', 'dtd': 'natural', 'eurosat': 'specialized', 'dsprites_loc': 'structured'}
BASE_TOP1 = {'cifar': 50.0, 'dtd': 40.0, 'eurosat': 80.0, 'dsprites_loc': 30.0}
GAIN = {'cifar': 1.0, 'dtd': 2.0, 'eurosat': 3.0, 'dsprites_loc': 6.0}  # per-task means 1, 2, 3, 6


def write_result(runs: Path, method: str, task: str, seed: int, top1: float, stored: int = 1000, **config) -> None:
    run_dir = runs / 'vit_tiny' / task / 'final' / method / f'seed{seed}'
    run_dir.mkdir(parents=True)
    settings = {**dict(task=task, method=method, seed=seed, model='vit_tiny', epochs=10, img_size=32, lr=1e-3,
                       form='lora', capaboost={'rank': 4}, peft=None, protocol='final'), **config}
    (run_dir / 'results.json').write_text(json.dumps(dict(
        task=task, group=GROUP[task], method=method, family='vit_tiny', seed=seed, top1=top1, protocol='final',
        trainable_params_excl_head=stored, fixed_params=2000 if method == 'cb' else 1000, lr=1e-3,
        train_images_per_s=50.0 if method == 'cb' else 100.0, config=settings)))


@pytest.fixture
def runs(tmp_path):
    for task, base in BASE_TOP1.items():
        for seed in (0, 1):
            write_result(tmp_path, 'base', task, seed, base + seed)
            write_result(tmp_path, 'cb', task, seed, base + seed + GAIN[task])
    return tmp_path


def test_statistics_by_hand():
    mean, half = t_interval([1, 2, 3, 6])  # stdev sqrt(14/3), t(3) = 3.182
    assert mean == 3 and half == pytest.approx(3.182 * math.sqrt(14 / 3) / 2)
    assert sign_test([1, 2, 3, 6]) == (4, 0, 0, 0.125)  # 2 * (1/2)^4
    assert sign_test([1, -2, 0, 3, 4]) == (3, 1, 1, pytest.approx(2 * (1 + 4) / 16))
    # two tasks, one seed each: the resampled mean is 1, 2 or 3 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_interval({'a': [1.0], 'b': [3.0]}) == (1.0, 3.0)
    assert bootstrap_interval({'a': [2.0, 2.0], 'b': [2.0]}) == (2.0, 2.0)
    assert math.isnan(t_interval([5.0])[1])


def test_compare_over_tasks_per_group_and_cost(runs):
    (c,) = compare(collect(runs), ['cb', 'base'])
    assert c.per_task == {t: [g, g] for t, g in GAIN.items()}
    s = c.overall
    assert (s.tasks, s.runs, s.mean, s.median, s.wins, s.losses, s.ties) == (4, 8, 3.0, 2.5, 4, 0, 0)
    assert s.t_half == pytest.approx(3.182 * math.sqrt(14 / 3) / 2) and s.sign_p == 0.125
    assert 1.0 <= s.bootstrap[0] < 3.0 < s.bootstrap[1] <= 6.0  # seeds agree within a task: only tasks vary
    natural = c.groups['natural']  # cifar 1, dtd 2: mean 1.5, t(1) = 12.706, stdev sqrt(1/2)
    assert (natural.tasks, natural.mean) == (2, 1.5) and natural.t_half == pytest.approx(12.706 * 0.5)
    assert set(c.groups) == {'natural', 'specialized', 'structured'} and math.isnan(c.groups['structured'].t_half)
    assert c.cost == {'stored': 1000, 'stored_baseline': 1000, 'fixed': 2000, 'fixed_baseline': 1000,
                      'step_time_ratio': 2.0}


def test_one_task_and_one_seed_have_no_interval(tmp_path):
    """Statistics that need n >= 2 say so, never a zero-width interval: one task, one seed."""
    write_result(tmp_path, 'base', 'cifar', 0, 50.0)
    write_result(tmp_path, 'cb', 'cifar', 0, 52.0)
    (c,) = compare(collect(tmp_path), ['cb', 'base'])
    assert all(math.isnan(v) for v in (c.overall.t_half, *c.overall.bootstrap))
    headline = comparisons_markdown([c]).splitlines()[2]
    assert headline.count('n = 1: no interval') == 2 and '[' not in headline


def test_pairs_with_other_settings_are_refused(runs):
    write_result(runs, 'longer', 'cifar', 0, 55.0, **{'epochs': 20})
    with pytest.raises(RunError, match=r"differ in more than the method \(epochs: 20 vs 10\)"):
        compare(collect(runs), ['longer', 'base'])
    with pytest.raises(RunError, match='--compare nothere: no test'):
        compare(collect(runs), ['cb', 'nothere'])
    with pytest.raises(RunError, match='at least one other row'):
        compare(collect(runs), ['cb'])


def test_report_compare_command(runs, capsys):
    assert cli.main(['report', str(runs), '--compare', 'cb', 'base']) == 0
    md = (runs / 'report_compare.md').read_text()
    assert '| cb - base | +3.00 |' in md and 'natural' in md and '2.00x' in md
    assert (runs / 'report_compare.csv').read_text().count('\n') == 1 + 4  # all + three groups
    before = files_under(runs)
    assert cli.main(['report', str(runs), '--compare', 'cb', 'missing']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: --compare missing: no test') and '\n' not in err
    assert files_under(runs) == before  # refused before anything is written


def test_compare_on_a_real_tiny_search(tmp_path, capsys):
    make_task(tmp_path / 'data', counts=(60, 30), n_test=30)
    assert cli.main(['search', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora', '--lrs', '1e-3', '1e-2',
                     '--max-extensions', '0', '--seeds', '0', '1', '--data-path', str(tmp_path / 'data'),
                     '--output', str(tmp_path / 'runs'), *SMALL]) == 0
    assert cli.main(['report', str(tmp_path / 'runs'), '--compare', 'capaboost_lora', 'lora']) == 0
    md = (tmp_path / 'runs' / 'report_compare.md').read_text()
    assert '| capaboost_lora - lora |' in md and '1 (2)' in md  # one task, two paired seeds
    validation = md.split('## Learning-rate sensitivity')[1]
    assert '| capaboost_lora | toy |' in validation and '**' in validation  # the chosen rate marked
    assert (tmp_path / 'runs' / 'report_compare_lr.png').stat().st_size > 0


# ---- the accuracy-per-stored-parameter curve: known points, their front and both pairings ----

CURVE = {  # row: (form, CapaBoost settings, stored params, test top-1 on cifar, on dtd)
    'linear': ('linear', {}, 0, 30.0, 30.0),
    'lora_r1': ('lora', dict(rank=1, num_masks=1, mask_density=1.0), 100, 50.0, 50.0),
    'lora_r2': ('lora', dict(rank=2, num_masks=1, mask_density=1.0), 200, 60.0, 60.0),
    'lora_r4': ('lora', dict(rank=4, num_masks=1, mask_density=1.0), 400, 62.0, 62.0),
    'cb_r1': ('lora', dict(rank=1, num_masks=2, mask_density=0.5), 100, 54.0, 56.0),
    'cb_r2': ('lora', dict(rank=2, num_masks=2, mask_density=0.5), 200, 58.0, 58.0),
}


@pytest.fixture
def curve_runs(tmp_path):
    for method, (form, capaboost, stored, *top1) in CURVE.items():
        for task, acc in zip(('cifar', 'dtd'), top1):
            write_result(tmp_path, method, task, 0, acc, stored, form=form, capaboost=capaboost)
    return tmp_path


def test_the_curve_finds_families_sizes_and_the_pareto_front(curve_runs):
    points, left_out = curve_points(collect(curve_runs))
    assert left_out == []
    by_row = {p.method: p for p in points}
    assert {m: (p.family, p.size, p.rank) for m, p in by_row.items()} == {
        'linear': ('linear', None, None), 'lora_r1': ('LoRA', 1, 1), 'lora_r2': ('LoRA', 2, 2),
        'lora_r4': ('LoRA', 4, 4), 'cb_r1': ('CapaBoost-LoRA d=2', 1, 2), 'cb_r2': ('CapaBoost-LoRA d=2', 2, 4)}
    assert by_row['cb_r1'].mean == 55.0 and by_row['cb_r1'].spread == (54.0, 56.0)
    assert {m for m, p in by_row.items() if p.front} == {'linear', 'cb_r1', 'lora_r2', 'lora_r4'}
    assert pairs(points, 'equal-params') == [('cb_r1', 'lora_r1'), ('cb_r2', 'lora_r2')]
    assert pairs(points, 'equal-rank') == [('cb_r1', 'lora_r2'), ('cb_r2', 'lora_r4')]


def test_report_draws_the_curve_and_compares_at_the_pairing_it_names(curve_runs, capsys):
    write_result(curve_runs, 'lora_r8', 'cifar', 0, 70.0, 800, form='lora',
                 capaboost=dict(rank=8, num_masks=1, mask_density=1.0))  # one task short: listed, not drawn
    assert cli.main(['report', str(curve_runs), '--compare-pairing', 'equal-rank']) == 0
    report = (curve_runs / 'report.md').read_text()
    table = report.split('## Accuracy per stored parameter (test)')[1]
    assert '| CapaBoost-LoRA d=2 | 1 | cb_r1 | 100 |' in table and '- lora_r8: no test result on dtd' in table
    assert (curve_runs / 'report_curve.png').stat().st_size > 0
    compared = (curve_runs / 'report_compare.md').read_text()
    assert compared.startswith('## Pairs at equal rank of the update: CapaBoost-LoRA (d masks, rank r) vs LoRA rank '
                               'd*r')
    assert '| cb_r1 - lora_r2 | -5.00 |' in compared and '| cb_r2 - lora_r4 | -4.00 |' in compared
    capsys.readouterr()
    assert cli.main(['report', str(curve_runs), '--compare-pairing', 'equal-params', '--compare', 'cb_r1',
                     'lora_r1']) == 2
    assert 'pass one of them' in capsys.readouterr().err
