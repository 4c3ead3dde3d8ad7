"""Aggregate ``results.json`` files into the standard VTAB-1k table (Markdown, CSV) and a params-vs-accuracy plot.

Results are split by protocol (final: train800val200 -> test; val: train800 -> val200) into separate sections:
validation and test numbers never meet in one table. Custom tasks get their own table and are never averaged into
the VTAB means. A row that misses a task or a seed that others in its table have is marked incomplete and gets
no average. Averages, as the literature reports them: the mean of each group (Natural, Specialized,
Structured), the mean of the three group means (VPT, NOAH, FacT) and the plain mean over tasks (SSF, V-PETL). Each is computed per seed and
reported as mean ± std over seeds. Trainable parameters exclude the classifier head, as the literature counts; the
fixed column counts the non-trainable tensors a method needs beside the backbone (CapaBoost masks, VeRA/RandLoRA
random bases). Both come from ``tuner.stored_parameters``, the same function for CapaBoost and HF PEFT rows.
"""
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._io import atomic_path, write_text_atomic
from ..config import in_range
from .curve import curve_markdown, curve_points, plot_curve
from .markdown import row
from .provenance import differing_fields
from .tasks import GROUPS, TASKS
from ..extras import install_hint, require


SECTIONS = {'final': 'Test accuracy (train800val200 -> test; other task sources: train+val -> test)',
            'val': 'Validation accuracy (train800 -> val200; other task sources: train -> val)'}
REQUIRED_KEYS = ('task', 'group', 'method', 'family', 'seed', 'top1', 'trainable_params_excl_head')


def read_results(path: Path) -> Dict[str, Any]:
    """One results.json; ValueError naming the file when it is not one (not JSON, a missing key, a value of the
    wrong type, a top-1 that is not a finite number in [0, 100])."""
    try:
        result = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f'{path} is not valid JSON ({type(e).__name__}); delete it or rerun that run') from None
    except OSError as e:  # a folder, or unreadable
        raise ValueError(f'{path} cannot be read ({e.strerror or type(e).__name__})') from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f'{path} is not a run result: missing {", ".join(missing)}')
    for key in ('task', 'group', 'method', 'family'):
        if not isinstance(result[key], str):
            raise ValueError(f'{path}: {key} {result[key]!r} is not a string')
    if isinstance(result['seed'], bool) or not isinstance(result['seed'], int):
        raise ValueError(f'{path}: seed {result["seed"]!r} is not an integer')
    if not in_range(result['top1'], '[0, 100]'):
        raise ValueError(f'{path}: top1 {result["top1"]!r} is not a finite accuracy in [0, 100]')
    if result.get('top5') is not None and not in_range(result['top5'], '[0, 100]'):
        raise ValueError(f'{path}: top5 {result["top5"]!r} is not a finite accuracy in [0, 100]')
    if not in_range(result['trainable_params_excl_head'], '[0, inf)'):
        raise ValueError(f'{path}: trainable_params_excl_head {result["trainable_params_excl_head"]!r} is not a '
                         f'parameter count')
    if result.get('protocol', 'final') not in SECTIONS:
        raise ValueError(f'{path}: protocol {result["protocol"]!r} is not one of {", ".join(SECTIONS)}')
    for key in ('lr', 'fixed_params'):
        if result.get(key) is not None and not in_range(result[key], '(-inf, inf)'):
            raise ValueError(f'{path}: {key} {result[key]!r} is not a finite number')
    return result


def collect_with_skipped(runs_dir: Path) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(every well-formed results.json under ``runs_dir``, one line per malformed one naming its file and why).
    FileNotFoundError when there is no well-formed result at all."""
    if not Path(runs_dir).is_dir():
        raise FileNotFoundError(f'{runs_dir} does not exist or is not a folder')
    results, skipped = [], []
    for p in sorted(Path(runs_dir).rglob('results.json')):
        if any(part.startswith('.') for part in p.relative_to(runs_dir).parts):  # skip .cache, trash
            continue
        try:
            results.append(read_results(p))
        except ValueError as e:
            skipped.append(str(e))
    if not results:
        raise FileNotFoundError(f'no results.json under {runs_dir}' if not skipped else
                                f'no usable results.json under {runs_dir}: {len(skipped)} malformed (first: '
                                f'{skipped[0]})')
    return mark_custom_tasks(results), skipped


def mark_custom_tasks(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``results`` with a custom task named like a VTAB task (a task.yaml with its own group, which is not that task)
    renamed '<name> (custom)', in place, so no table or mean takes it for the VTAB task."""
    for r in results:
        if r['task'] in TASKS and r['group'] != TASKS[r['task']].group:
            r['task'] = f'{r["task"]} (custom)'
    return results


def collect(runs_dir: Path) -> List[Dict[str, Any]]:
    """Every well-formed results.json under ``runs_dir`` (malformed ones are left out: ``collect_with_skipped``)."""
    return collect_with_skipped(runs_dir)[0]


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {'mean': None, 'std': None, 'n': 0}
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
            'n': len(values)}


def averages(task_acc: Dict[str, float], groups: Dict[str, str]) -> Dict[str, Optional[float]]:
    """Group means, mean of group means, and mean over tasks, for one seed's {task: top1}."""
    out: Dict[str, Optional[float]] = {}
    group_means = []
    for group in GROUPS:
        accs = [a for t, a in task_acc.items() if groups[t] == group]
        out[group] = statistics.fmean(accs) if accs else None
        if accs:
            group_means.append(out[group])
    out['mean_of_groups'] = statistics.fmean(group_means) if group_means else None
    out['mean_of_tasks'] = statistics.fmean(task_acc.values()) if task_acc else None
    return out


def _fixed_m(runs: List[Dict[str, Any]]) -> Optional[float]:
    """Mean non-trainable tensors the method needs (masks, random bases), in M; None for results written before
    they were recorded."""
    values = [r.get('fixed_params') for r in runs]
    return None if None in values else statistics.fmean(values) / 1e6


def summarize(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (protocol, model family, method); ``complete`` when it has every task of its table (VTAB or
    custom) that any row of the same protocol has, each with the same seeds."""
    by_key: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_key[(r.get('protocol', 'final'), r['family'], r['method'])].append(r)
    tasks_of_protocol: Dict[str, set] = defaultdict(set)
    for r in results:
        tasks_of_protocol[r.get('protocol', 'final')].add(r['task'])
    rows = []
    for (protocol, family, method), runs in sorted(by_key.items()):
        groups = {r['task']: r['group'] for r in runs}
        per_seed: Dict[int, Dict[str, float]] = defaultdict(dict)
        lrs: Dict[str, set] = defaultdict(set)
        for r in runs:
            per_seed[r['seed']][r['task']] = r['top1']
            lrs[r['task']].add(r.get('lr'))
        row: Dict[str, Any] = {'protocol': protocol, 'family': family, 'method': method, 'seeds': len(per_seed),
                               'tasks': sorted(groups), 'lr': {t: sorted(v, key=str) for t, v in lrs.items()},
                               'params_M': statistics.fmean(r['trainable_params_excl_head'] for r in runs) / 1e6,
                               'fixed_M': _fixed_m(runs)}
        row['task'] = {t: _mean_std([s[t] for s in per_seed.values() if t in s]) for t in groups}
        seeds_complete = all(len(s) == len(groups) for s in per_seed.values())
        for kind, names in (('vtab', [t for t in tasks_of_protocol[protocol] if t in TASKS]),
                            ('custom', [t for t in tasks_of_protocol[protocol] if t not in TASKS])):
            row[f'{kind}_complete'] = seeds_complete and all(t in groups for t in names)
        seed_avgs = [averages({t: a for t, a in s.items() if t in TASKS}, groups) for s in per_seed.values()]
        for key in (*GROUPS, 'mean_of_groups', 'mean_of_tasks'):
            values = [a[key] for a in seed_avgs if a[key] is not None]
            row[key] = _mean_std(values if row['vtab_complete'] else [])
        custom = [statistics.fmean(a for t, a in s.items() if t not in TASKS) for s in per_seed.values()
                  if any(t not in TASKS for t in s)]
        row['custom_mean'] = _mean_std(custom if row['custom_complete'] else [])
        rows.append(row)
    return rows


def _fmt(cell: Dict[str, Optional[float]]) -> str:
    if cell['mean'] is None:
        return '–'
    return f'{cell["mean"]:.1f}' + (f' ± {cell["std"]:.1f}' if cell['n'] > 1 else '')


def _ordered_tasks(rows: List[Dict[str, Any]]) -> List[str]:
    """The VTAB tasks present, in the standard order, then any custom tasks."""
    present = {t for r in rows for t in r['tasks']}
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _table(rows: List[Dict[str, Any]], tasks: List[str], custom: bool) -> List[str]:
    averages_header = ['Mean (tasks)'] if custom else ['Natural', 'Specialized', 'Structured', 'Mean (3 groups)',
                                                       'Mean (tasks)']
    header = ['model', 'method', 'params (M)', 'fixed (M)', *tasks, *averages_header, 'seeds', 'lr']
    lines = [row(header), '|' + '---|' * len(header)]
    for r in rows:
        complete = r['custom_complete'] if custom else r['vtab_complete']
        avg = [_fmt(r['custom_mean'])] if custom else [_fmt(r[g]) for g in GROUPS] + [_fmt(r['mean_of_groups']),
                                                                                      _fmt(r['mean_of_tasks'])]
        if not complete:
            avg = ['incomplete'] + ['–'] * (len(avg) - 1)
        lr = ' / '.join('/'.join(f'{v:g}' for v in r['lr'][t] if v is not None) or '?' for t in tasks if t in r['lr'])
        fixed = '–' if r['fixed_M'] is None else f'{r["fixed_M"]:.3f}'
        cells = [r['family'], r['method'], f'{r["params_M"]:.3f}', fixed,
                 *[_fmt(r['task'][t]) if t in r['task'] else '–' for t in tasks], *avg, str(r['seeds']), lr]
        lines.append(row(cells))
    return lines


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    """One section per protocol (test, then validation), each with a VTAB-1k table and a custom-task table."""
    lines: List[str] = []
    for protocol, title in SECTIONS.items():
        section = [r for r in rows if r['protocol'] == protocol]
        if not section:
            continue
        tasks = _ordered_tasks(section)
        vtab, custom = [t for t in tasks if t in TASKS], [t for t in tasks if t not in TASKS]
        lines += [f'## {title}', '']
        if vtab:
            lines += [f'VTAB-1k tasks ({len(vtab)} of {len(TASKS)}); averages over the tasks shown:', '']
            lines += _table([r for r in section if any(t in TASKS for t in r['tasks'])], vtab, custom=False) + ['']
        if custom:
            lines += ['Custom tasks (never averaged into the VTAB means):', '']
            lines += _table([r for r in section if any(t not in TASKS for t in r['tasks'])], custom, custom=True)
            lines += ['']
    return '\n'.join(lines)


def to_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    """One line per row; the protocol column keeps validation and test numbers apart; averages stay empty for
    incomplete rows."""
    tasks = _ordered_tasks(rows)
    keys = [*GROUPS, 'mean_of_groups', 'mean_of_tasks', 'custom_mean']
    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['protocol', 'family', 'method', 'params_M', 'fixed_M', 'seeds', 'complete',
                    *[f'{t}_{s}' for t in tasks + keys for s in ('mean', 'std')]])
        for r in rows:
            cells = []
            for t in tasks + keys:
                cell = r['task'].get(t) if t in tasks else r[t]
                cells += ['' if not cell or cell['mean'] is None else f'{cell[s]:.4f}' for s in ('mean', 'std')]
            w.writerow([r['protocol'], r['family'], r['method'], f'{r["params_M"]:.6f}',
                        '' if r['fixed_M'] is None else f'{r["fixed_M"]:.6f}', r['seeds'],
                        r['vtab_complete'] and r['custom_complete'], *cells])


def _custom_mean(row: Dict[str, Any]) -> Optional[float]:
    """Mean accuracy over a row's custom (non-VTAB) tasks."""
    return row['custom_mean']['mean']


def plot(rows: List[Dict[str, Any]], path: Path) -> bool:
    """PNG of mean accuracy vs trainable parameters: one panel for the VTAB mean of group means, one for custom
    tasks when there are any (never a blank figure). False (with a message) when matplotlib is missing or no row
    has a mean to draw."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'note: matplotlib is not installed, so no plot was written ({install_hint("matplotlib")})')
        return False
    protocol = 'final' if any(r['protocol'] == 'final' for r in rows) else 'val'
    rows = [r for r in rows if r['protocol'] == protocol]  # one protocol per figure: test, else validation
    panels = []
    if any(r['mean_of_groups']['mean'] is not None for r in rows):
        panels.append(('VTAB-1k: mean of the group means',
                       [(r, r['mean_of_groups']['mean'], r['mean_of_groups']['std'] or 0) for r in rows]))
    if any(_custom_mean(r) is not None for r in rows):
        panels.append(('custom tasks: mean over tasks', [(r, _custom_mean(r), 0) for r in rows]))
    if not panels:  # no row has a mean to draw (e.g. VTAB task names outside the VTAB groups)
        print('note: no plot was written: no row has a VTAB mean of group means or a custom-task mean')
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        for r, y, err in points:
            if y is None:
                continue
            x = max(r['params_M'], 1e-3)
            ax.errorbar(x, y, yerr=err, fmt='o', capsize=3)
            ax.annotate(f'{r["method"]} ({r["family"]})', (x, y), textcoords='offset points', xytext=(4, 4),
                        fontsize=8, clip_on=True)
        ax.set_xscale('log')
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('trainable parameters excl. head (M, log; linear probe at 0.001)')
        ax.set_ylabel('top-1 accuracy (%)')
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.15)
    fig.suptitle(f'{len(rows)} method(s): {SECTIONS[protocol].split(" (")[0].lower()} vs trainable parameters '
                 f'(complete rows only)', fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)
    return True


def write_report(runs_dir: Path, prefix: Optional[Path] = None) -> Dict[str, Path]:
    from .search import read_records, records_markdown
    results, skipped = collect_with_skipped(runs_dir)
    for line in skipped:
        print(f'note: skipped {line}', file=sys.stderr)
    rows = summarize(results)
    prefix = Path(prefix or Path(runs_dir) / 'report')
    md = to_markdown(rows)
    if skipped:
        md += (f'\n## Skipped results\n\n{len(skipped)} malformed results.json file(s) are not in the tables '
               f'above:\n\n' + ''.join(f'- {line}\n' for line in skipped))
    differing = differing_fields(results)
    if differing:  # rows made with other versions or hardware: their floats are not bit-comparable
        md += ('\n## Provenance\n\nThe results above were not all made with the same software and hardware '
               '(versions or machine kind differ; each results.json records its own):\n\n'
               + ''.join(f'- {key}: {", ".join(values)}\n' for key, values in differing.items()))
    points, left_out = curve_points(results)
    if len(points) > 1:
        md += ('\n## Accuracy per stored parameter (test)\n\nEach method family across its sizes, in '
               f'`{prefix.name}_curve.png` (mean over tasks, then one panel per task).\n\n'
               + curve_markdown(points, left_out))
    records = read_records(Path(runs_dir))
    if records:
        md += ('\n## Learning-rate search (on val; the chosen rate trains the final runs)\n\n'
               + records_markdown(records))
    write_text_atomic(prefix.with_suffix('.md'), md)
    to_csv(rows, prefix.with_suffix('.csv'))
    out = {'markdown': prefix.with_suffix('.md'), 'csv': prefix.with_suffix('.csv')}
    if plot(rows, prefix.with_suffix('.png')):
        out['png'] = prefix.with_suffix('.png')
    curve_png = prefix.parent / f'{prefix.name}_curve.png'
    if len(points) > 1 and plot_curve(points, curve_png):
        out['curve_png'] = curve_png
    print(md)
    return out


def save_singular_value_plot(values: Dict[str, Any], path: Path, title: str = '') -> None:
    """Normalised singular values of ΔW, one line per layer (log scale)."""
    matplotlib = require('matplotlib', '--plot')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sv in values.items():
        sv = sv.numpy()[:64]  # the update has rank <= d*r: the tail is numerical zero
        ax.semilogy(range(1, len(sv) + 1), sv / sv.max(), alpha=0.6, label=name)
    ax.set_xlabel('index')
    ax.set_ylabel('singular value / largest')
    ax.set_ylim(1e-6, 2)
    ax.set_xlim(1, min(64, max(len(v) for v in values.values())) if values else 1)
    ax.set_title(title, fontsize=8)
    if len(values) <= 12:
        ax.legend(fontsize=5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=120)
    plt.close(fig)
