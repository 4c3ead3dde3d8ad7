"""``report RUNS --compare A B [C ...]``: is the candidate A better than each baseline on these tasks?

Runs pair by (task, seed). Tasks, not runs, are the units: per task the mean difference over its seeds, then the
headline over tasks, so one collapsed run weighs as one task among n, not as one pair among tasks x seeds:

- a 95% t-interval on the per-task means (n = tasks),
- a bootstrap interval that resamples tasks, then seeds within each drawn task (10,000 draws, seeded),
- a sign test on the per-task means (wins, losses, ties; exact two-sided binomial p over wins and losses),
- the median per-task difference,

the same per VTAB group when the tasks are VTAB-1k's, the cost beside the accuracy (stored parameters, fixed
tensors, train step time from the runs' own throughput), and the learning-rate sensitivity of each method from its
search records. Only test numbers (``--protocol final`` runs) are compared; validation accuracies appear only as the
search's lr curves, in a section of their own. Pairs whose settings differ in anything but the method (epochs,
image size, model, ...) are refused.
"""
import csv
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._io import atomic_path, write_text_atomic
from .markdown import row
from .run_config import RunError, identity_settings
from .tasks import GROUPS, TASKS
from ..extras import install_hint

BOOTSTRAP_DRAWS = 10_000
# what may differ between the runs of a comparison: the method itself (and the rate its own search chose)
METHOD_SETTINGS = ('method', 'name', 'form', 'lr')
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}  # two-sided 95% Student-t quantiles; beyond 30 df the normal 1.96


def t975(df: int) -> float:
    """The two-sided 95% t quantile for ``df`` degrees of freedom (the tabulated one at or below it)."""
    return T975.get(df) or (T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96)


def t_interval(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, half-width of its 95% t-interval); the half-width is nan for a single value (n = 1: no interval)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float('nan')
    return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def bootstrap_interval(per_task: Dict[str, List[float]], draws: int = BOOTSTRAP_DRAWS,
                       seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of the mean of per-task means, resampling tasks, then each drawn task's seeds."""
    rng = random.Random(seed)
    tasks = sorted(per_task)
    means = []
    for _ in range(draws):
        drawn = [per_task[rng.choice(tasks)] for _ in tasks]
        means.append(statistics.fmean(statistics.fmean(rng.choice(d) for _ in d) for d in drawn))
    means.sort()
    return means[int(0.025 * draws)], means[min(draws - 1, int(math.ceil(0.975 * draws)) - 1)]


def sign_test(differences: Sequence[float]) -> Tuple[int, int, int, float]:
    """(wins, losses, ties, exact two-sided binomial p over wins and losses, ties left out)."""
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    n = wins + losses
    if n == 0:
        return wins, losses, len(differences), 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return wins, losses, len(differences) - n, min(1.0, 2 * tail)


@dataclass
class Summary:
    """The statistics of one candidate - baseline comparison over a set of tasks."""
    tasks: int
    runs: int
    mean: float
    t_half: float
    bootstrap: Tuple[float, float]
    median: float
    wins: int
    losses: int
    ties: int
    sign_p: float


def summarize_differences(per_task: Dict[str, List[float]]) -> Summary:
    """``per_task``: task -> the candidate-minus-baseline top-1 differences of its seeds."""
    task_means = [statistics.fmean(per_task[t]) for t in sorted(per_task)]
    mean, half = t_interval(task_means)
    # tasks are the units: one task has no interval (its seeds alone would give a seed interval under this name)
    boot = bootstrap_interval(per_task) if len(task_means) > 1 else (float('nan'), float('nan'))
    return Summary(len(task_means), sum(len(v) for v in per_task.values()), mean, half, boot,
                   statistics.median(task_means), *sign_test(task_means))


def _by_method(results: List[Dict[str, Any]], names: Sequence[str]) -> Dict[str, Dict[Tuple[str, int], Dict]]:
    """name -> {(task, seed): results} over the final (test) runs; RunError naming a missing or ambiguous row."""
    out: Dict[str, Dict[Tuple[str, int], Dict]] = {}
    for name in names:
        runs = [r for r in results if r['method'] == name and r.get('protocol', 'final') == 'final']
        if not runs:
            known = sorted({r['method'] for r in results if r.get('protocol', 'final') == 'final'})
            raise RunError(f'--compare {name}: no test (protocol final) results of that name; rows: '
                           f'{", ".join(known) or "none"}')
        families = sorted({r['family'] for r in runs})
        if len(families) > 1:
            raise RunError(f'--compare {name}: its runs use {len(families)} models ({", ".join(families)}); compare '
                           f'one model at a time (report a folder holding one)')
        out[name] = {(r['task'], r['seed']): r for r in runs}
    return out


def check_same_settings(first: Dict[str, Any], second: Dict[str, Any]) -> None:
    """RunError naming what differs between two paired runs beyond the method (``METHOD_SETTINGS`` and the method's
    own capaboost/peft block); runs without a recorded config cannot be checked and are refused."""
    if not isinstance(first.get('config'), dict) or not isinstance(second.get('config'), dict):
        raise RunError(f'{first["method"]} vs {second["method"]} on {first["task"]} seed {first["seed"]}: a result '
                       f'without its recorded settings (config) cannot be compared')
    a, b = identity_settings(first['config']), identity_settings(second['config'])
    keys = {k for k in set(a) | set(b) if k not in METHOD_SETTINGS and not k.startswith(('capaboost.', 'peft.'))}
    diff = sorted(k for k in keys if a.get(k, '<unset>') != b.get(k, '<unset>'))
    if diff:
        shown = '; '.join(f'{k}: {a.get(k, "<unset>")!r} vs {b.get(k, "<unset>")!r}' for k in diff[:4])
        raise RunError(f'{first["method"]} vs {second["method"]} on {first["task"]} seed {first["seed"]} differ in '
                       f'more than the method ({shown}): compare runs made with the same settings')


@dataclass
class Comparison:
    candidate: str
    baseline: str
    per_task: Dict[str, List[float]]  # task -> differences over the paired seeds
    overall: Summary
    groups: Dict[str, Summary]
    cost: Dict[str, Optional[float]]


def _mean_of(runs: List[Dict[str, Any]], key: str) -> Optional[float]:
    values = [r.get(key) for r in runs]
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def compare(results: List[Dict[str, Any]], names: Sequence[str], check_settings: bool = True) -> List[Comparison]:
    """The candidate ``names[0]`` against each baseline in ``names[1:]``, over the (task, seed) pairs both have.
    ``check_settings=False`` only for results that no longer hold their config (a study's summary file, made by
    one command)."""
    if len(names) < 2 or len(set(names)) < len(names):
        raise RunError(f'--compare {" ".join(names)}: give the candidate and at least one other row, each once')
    runs = _by_method(results, names)
    candidate = names[0]
    out = []
    for baseline in names[1:]:
        keys = sorted(set(runs[candidate]) & set(runs[baseline]))
        if not keys:
            raise RunError(f'--compare: {candidate} and {baseline} share no (task, seed) run')
        per_task: Dict[str, List[float]] = defaultdict(list)
        for key in keys:
            a, b = runs[candidate][key], runs[baseline][key]
            if check_settings:
                check_same_settings(a, b)
            per_task[key[0]].append(a['top1'] - b['top1'])
        groups = {}
        if all(t in TASKS for t in per_task):
            for group in GROUPS:
                members = {t: d for t, d in per_task.items() if TASKS[t].group == group}
                if members:
                    groups[group] = summarize_differences(members)
        a_runs, b_runs = [runs[candidate][k] for k in keys], [runs[baseline][k] for k in keys]
        a_speed, b_speed = _mean_of(a_runs, 'train_images_per_s'), _mean_of(b_runs, 'train_images_per_s')
        cost = {'stored': _mean_of(a_runs, 'trainable_params_excl_head'),
                'stored_baseline': _mean_of(b_runs, 'trainable_params_excl_head'),
                'fixed': _mean_of(a_runs, 'fixed_params'), 'fixed_baseline': _mean_of(b_runs, 'fixed_params'),
                'step_time_ratio': b_speed / a_speed if a_speed and b_speed else None}
        out.append(Comparison(candidate, baseline, dict(per_task), summarize_differences(per_task), groups, cost))
    return out


def _interval(low: float, high: float) -> str:
    return 'n = 1: no interval' if math.isnan(low) or math.isnan(high) else f'[{low:+.2f}, {high:+.2f}]'


def _summary_cells(s: Summary) -> List[str]:
    return [f'{s.mean:+.2f}', _interval(s.mean - s.t_half, s.mean + s.t_half), _interval(*s.bootstrap),
            f'{s.median:+.2f}', f'{s.wins}/{s.losses}/{s.ties}', f'{s.sign_p:.3g}', f'{s.tasks} ({s.runs})']


SUMMARY_HEADER = ['mean of task means', '95% t-interval (tasks)', '95% bootstrap (tasks, then seeds)',
                  'median task', 'tasks ahead/behind/tied', 'sign test p', 'n tasks (runs)']


def _count(value: Optional[float]) -> str:
    return '–' if value is None else f'{value:,.0f}'


def comparisons_markdown(comparisons: List[Comparison]) -> str:
    """The headline table, the per-group table (VTAB tasks), per-task differences and the cost table."""
    lines = [row(['candidate - baseline', *SUMMARY_HEADER]), '|---|' + '---|' * len(SUMMARY_HEADER)]
    for c in comparisons:
        lines.append(row([f'{c.candidate} - {c.baseline}', *_summary_cells(c.overall)]))
    if any(c.groups for c in comparisons):
        lines += ['', 'Per VTAB-1k group (the same statistics over the group\'s tasks):', '',
                  '| candidate - baseline | group | ' + ' | '.join(SUMMARY_HEADER) + ' |',
                  '|---|---|' + '---|' * len(SUMMARY_HEADER)]
        for c in comparisons:
            for group, s in c.groups.items():
                lines.append(row([f'{c.candidate} - {c.baseline}', group, *_summary_cells(s)]))
    tasks = sorted({t for c in comparisons for t in c.per_task}, key=lambda t: (t not in TASKS, list(TASKS).index(t)
                                                                               if t in TASKS else 0, t))
    lines += ['', 'Per task: mean difference over the paired seeds (seeds):', '',
              row(['candidate - baseline', *tasks]), '|---|' + '---|' * len(tasks)]
    for c in comparisons:
        cells = [f'{statistics.fmean(c.per_task[t]):+.1f} ({len(c.per_task[t])})' if t in c.per_task else '–'
                 for t in tasks]
        lines.append(row([f'{c.candidate} - {c.baseline}', *cells]))
    if all(v is None for c in comparisons for v in c.cost.values()):  # results that do not record their cost
        return '\n'.join(lines) + '\n'
    lines += ['', 'Cost (means over the paired runs; step time from each run\'s own last-epoch throughput, a rough '
                  'guide where runs shared the machine; `scripts/bench_speed.py` measures it interleaved):', '',
              '| candidate - baseline | stored params (excl. head) | fixed tensors | train step time, candidate / '
              'baseline |', '|---|---|---|---|']
    for c in comparisons:
        ratio = '–' if c.cost['step_time_ratio'] is None else f'{c.cost["step_time_ratio"]:.2f}x'
        lines.append(row([f'{c.candidate} - {c.baseline}',
                          f'{_count(c.cost["stored"])} vs {_count(c.cost["stored_baseline"])}',
                          f'{_count(c.cost["fixed"])} vs {_count(c.cost["fixed_baseline"])}', ratio]))
    return '\n'.join(lines) + '\n'


def comparisons_csv(comparisons: List[Comparison], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['candidate', 'baseline', 'group', 'tasks', 'runs', 'mean', 't_low', 't_high', 'boot_low',
                    'boot_high', 'median', 'wins', 'losses', 'ties', 'sign_p'])
        for c in comparisons:
            for group, s in [('all', c.overall), *c.groups.items()]:
                bounds = [s.mean - s.t_half, s.mean + s.t_half, *s.bootstrap]  # empty: n = 1, no interval
                w.writerow([c.candidate, c.baseline, group, s.tasks, s.runs, f'{s.mean:.4f}',
                            *('' if math.isnan(b) else f'{b:.4f}' for b in bounds), f'{s.median:.4f}', s.wins,
                            s.losses, s.ties, f'{s.sign_p:.4g}'])


def lr_sensitivity(records: List[Dict[str, Any]], names: Sequence[str]) -> Dict[str, Dict[str, Dict]]:
    """method -> task -> its search record (val200 accuracy per rate, the chosen rate)."""
    out: Dict[str, Dict[str, Dict]] = defaultdict(dict)
    for r in records:
        if r['method'] in names:
            out[r['method']][r['task']] = r
    return dict(out)


def lr_markdown(curves: Dict[str, Dict[str, Dict]]) -> str:
    """val200 top-1 per rate for each method and task; the chosen rate in bold."""
    lines = ['| method | task | val200 top-1 by lr (chosen in bold) |', '|---|---|---|']
    for method, by_task in curves.items():
        for task, r in sorted(by_task.items()):
            cells = [(f'**{lr}: {acc:.1f}**' if float(lr) == r['chosen_lr'] else f'{lr}: {acc:.1f}')
                     for lr, acc in r['val_top1'].items()]
            lines.append(f'| {method} | {task} | {", ".join(cells)} |')
    return '\n'.join(lines) + '\n'


def lr_plot(curves: Dict[str, Dict[str, Dict]], path: Path) -> bool:
    """One panel per task: val200 top-1 vs lr (log) per method, the chosen rate marked; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'note: matplotlib is not installed, so no lr plot was written ({install_hint("matplotlib")})')
        return False
    tasks = sorted({t for by_task in curves.values() for t in by_task})
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for method, by_task in curves.items():
            if task not in by_task:
                continue
            r = by_task[task]
            lrs = [float(lr) for lr in r['val_top1']]
            line, = ax.plot(lrs, list(r['val_top1'].values()), marker='o', label=method)
            ax.plot([r['chosen_lr']], [r['val_top1'][f'{r["chosen_lr"]:g}']], marker='*', markersize=14,
                    color=line.get_color())
        ax.set_xscale('log')
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7)
    fig.suptitle('val200 top-1 vs learning rate (star: the chosen rate)', fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)
    return True


def write_comparison(comparisons: List[Comparison], records: List[Dict[str, Any]], prefix: Path,
                     pairing: str = '') -> Dict[str, Path]:
    """``<prefix>_compare.{md,csv,png}``: the comparisons (``compare``'s), then the lr sensitivity of their methods
    (validation numbers, apart). ``pairing``: how the pairs were chosen (``curve.PAIRINGS``), said in the title."""
    names = list(dict.fromkeys(n for c in comparisons for n in (c.candidate, c.baseline)))
    title = f'Pairs at {pairing}' if pairing else f'{names[0]} vs {", ".join(names[1:])}'
    md = (f'## {title}: test top-1 differences (train800val200 -> test)\n\n' + comparisons_markdown(comparisons))
    curves = lr_sensitivity(records, names)
    out = {'compare_markdown': Path(f'{prefix}_compare.md'), 'compare_csv': Path(f'{prefix}_compare.csv')}
    if curves:
        md += ('\n## Learning-rate sensitivity (train800 -> val200, the search runs; validation numbers only)\n\n'
               + lr_markdown(curves))
        if lr_plot(curves, Path(f'{prefix}_compare_lr.png')):
            out['compare_lr_png'] = Path(f'{prefix}_compare_lr.png')
    write_text_atomic(out['compare_markdown'], md)
    comparisons_csv(comparisons, out['compare_csv'])
    print(md)
    return out
