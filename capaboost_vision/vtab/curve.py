"""Accuracy per stored parameter: every method family as a curve across its sizes, for any runs folder.

CapaBoost's promise is more rank of the update for the same stored parameters, so the question a user asks is a
curve, not a point: at the adapter size one can afford, which family is ahead? Each point is one report row (a
method name) of test top-1 (``--protocol final``): the mean over tasks of the per-task mean over seeds, drawn at the
stored parameters excluding the head (``methods.stored_parameters``), joined to the other sizes of its family
(LoRA by rank; CapaBoost-LoRA by rank, one family per number of masks; a PEFT method by its size argument). The
family and size come from each run's recorded config, never from the row's name. A point is drawn only when it
covers every task any drawn point covers, so all means are over the same tasks.

The Pareto front: the points that no other point beats or ties in accuracy with no more stored parameters.
Pairings for ``report --compare-pairing``: at equal stored parameters (CapaBoost-LoRA d, r vs LoRA r) or at equal
rank of the update (CapaBoost-LoRA d, r vs LoRA d*r: 1/d of the stored parameters).
"""
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._io import atomic_path
from .markdown import row
from ..extras import install_hint

PAIRINGS = {'equal-params': 'equal stored parameters: CapaBoost-LoRA (d masks, rank r) vs LoRA rank r',
            'equal-rank': 'equal rank of the update: CapaBoost-LoRA (d masks, rank r) vs LoRA rank d*r (1/d of '
                          'its stored parameters)'}
_FORM_NAMES = {'lora': 'LoRA', 'adapter': 'adapter', 'prompt': 'prompt'}
_PEFT_SIZE_KEYS = ('r', 'n_frequency')  # the argument that sizes a PEFT method


@dataclass
class Point:
    """One report row on the curve."""
    method: str  # the row: the runs' method name
    family: str  # 'LoRA', 'CapaBoost-LoRA d=2', 'PEFT LOHA', ...
    size: Optional[float]  # what orders the family: rank, bottleneck, prompt length, a PEFT size argument
    rank: Optional[int]  # the largest rank of the update, for the LoRA forms (d * r)
    stored: float  # stored parameters excluding the head (mean over runs)
    fixed: Optional[float]  # non-trainable tensors the method needs (masks, random bases)
    task_means: Dict[str, float]  # task -> mean over seeds
    seeds: int
    images_per_s: Optional[float]  # mean training throughput of its runs (a rough step-time guide)
    mean: float = float('nan')  # over the common tasks
    spread: Tuple[float, float] = (float('nan'), float('nan'))  # lowest and highest task mean
    front: bool = False


def family_of(config: Dict[str, Any]) -> Tuple[str, Optional[float], Optional[int]]:
    """(family, size, largest rank of the update) of a run from its recorded config."""
    form = config.get('form', '')
    if form == 'peft':
        peft = config.get('peft') or {}
        size = next((peft[k] for k in _PEFT_SIZE_KEYS if isinstance(peft.get(k), (int, float))), None)
        return f'PEFT {peft.get("type", "?")}', size, None
    if form not in _FORM_NAMES:
        return form, None, None  # linear probe, full fine-tuning: one point each
    cb = config.get('capaboost') or {}
    d, density = cb.get('num_masks', 2), cb.get('mask_density', 0.5)
    name = 'DoRA' if cb.get('use_dora') else _FORM_NAMES[form]
    if d == 1 and density == 1:
        family = name
    else:
        family = f'CapaBoost-{name} d={d}' + (f', rho={density:g}' if density != 0.5 else '')
    if cb.get('mask_scaling', 'none') != 'none':
        family += f', {cb["mask_scaling"]} scaling'
    size = {'lora': cb.get('rank'), 'adapter': cb.get('adapter_bottleneck'), 'prompt': cb.get('prompt_length')}[form]
    rank = d * cb['rank'] if form == 'lora' and isinstance(cb.get('rank'), int) else None
    return family, size, rank


def curve_points(results: List[Dict[str, Any]]) -> Tuple[List[Point], List[str]]:
    """(the drawn points, each with its mean, spread and front mark; one line per row left out and why), from the
    test results (``--protocol final``) of ``results``."""
    by_method: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r.get('protocol', 'final') == 'final':
            by_method[r['method']].append(r)
    points, left_out = [], []
    for method, runs in sorted(by_method.items()):
        kinds = {family_of(r.get('config') or {}) for r in runs}
        if len(kinds) > 1:
            left_out.append(f'{method}: its runs were made with different settings ({len(kinds)} kinds)')
            continue
        (family, size, rank), = kinds
        per_task: Dict[str, List[float]] = defaultdict(list)
        for r in runs:
            per_task[r['task']].append(r['top1'])
        fixed = [r.get('fixed_params') for r in runs]
        speed = [r.get('train_images_per_s') for r in runs]
        points.append(Point(method, family, size, rank, statistics.fmean(r['trainable_params_excl_head'] for r in runs),
                            None if None in fixed else statistics.fmean(fixed),
                            {t: statistics.fmean(v) for t, v in per_task.items()},
                            len({r['seed'] for r in runs}),
                            None if None in speed else statistics.fmean(speed)))
    tasks = set().union(*(p.task_means for p in points)) if points else set()
    drawn = []
    for p in points:
        missing = sorted(tasks - set(p.task_means))
        if missing:
            left_out.append(f'{p.method}: no test result on {", ".join(missing)}')
            continue
        means = list(p.task_means.values())
        p.mean, p.spread = statistics.fmean(means), (min(means), max(means))
        drawn.append(p)
    front = pareto_front(drawn, lambda p: p.mean)
    for p in drawn:
        p.front = p in front
    return sorted(drawn, key=lambda p: (p.family, p.stored)), left_out


def pareto_front(points: List[Point], value: Callable[[Point], float]) -> List[Point]:
    """The points that no other point beats or ties in ``value`` with no more stored parameters."""
    return [p for p in points if not any(q is not p and q.stored <= p.stored and value(q) >= value(p)
                                         and (q.stored < p.stored or value(q) > value(p)) for q in points)]


def pairs(points: List[Point], pairing: str) -> List[Tuple[str, str]]:
    """(candidate, baseline) row pairs of ``pairing`` (``PAIRINGS``): every CapaBoost-LoRA point with its LoRA
    point of the same rank r (equal-params) or of rank d*r (equal-rank), where both were run."""
    lora = {p.size: p.method for p in points if p.family == 'LoRA'}
    found = []
    for p in points:
        if not p.family.startswith('CapaBoost-LoRA d=') or p.size is None or p.rank is None:
            continue
        target = p.size if pairing == 'equal-params' else p.rank
        if target in lora:
            found.append((p.method, lora[target]))
    return found


def _size_label(p: Point) -> str:
    return '–' if p.size is None else f'{p.size:g}'


def curve_markdown(points: List[Point], left_out: List[str]) -> str:
    """The table beside the curve: each point's family, size, stored and fixed tensors, rank, accuracy and spread
    over tasks, training throughput relative to plain LoRA of the same stored parameters, and the front."""
    lora_speed = {round(p.stored): p.images_per_s for p in points if p.family == 'LoRA'}
    tasks = sorted(points[0].task_means) if points else []
    lines = [f'Test top-1 (%), mean over the {len(tasks)} task(s) of each task\'s mean over seeds; spread: the lowest '
             f'and highest task mean. * on the Pareto front (no other point as accurate with no more stored '
             f'parameters).', '',
             row(['family', 'size', 'row', 'stored params (excl. head)', 'fixed tensors', 'max rank of update',
                  'top-1', 'task spread', 'seeds', 'step time ÷ LoRA of equal stored params', 'front']),
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for p in points:
        base = lora_speed.get(round(p.stored))
        ratio = f'{base / p.images_per_s:.2f}' if base and p.images_per_s else '–'
        lines.append(row([p.family, _size_label(p), p.method, f'{p.stored:,.0f}',
                          '–' if p.fixed is None else f'{p.fixed:,.0f}', '–' if p.rank is None else p.rank,
                          f'{p.mean:.1f}', f'{p.spread[0]:.1f} – {p.spread[1]:.1f}', p.seeds, ratio,
                          '*' if p.front else '']))
    if left_out:
        lines += ['', 'Not on the curve:', '', *[f'- {line}' for line in left_out]]
    return '\n'.join(lines) + '\n'


def plot_curve(points: List[Point], path: Path) -> bool:
    """PNG: the mean over tasks against stored parameters (log axis), one line per family across its sizes, the
    task spread as error bars, the Pareto front circled; then one small panel per task, with that task's front. False (with a note) when
    matplotlib is missing or nothing can be drawn."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'note: matplotlib is not installed, so no curve was written ({install_hint("matplotlib")})')
        return False
    if not points:
        return False
    tasks = sorted(points[0].task_means)
    families = sorted({p.family for p in points})
    # the mean over tasks takes 2 x 2 panels (top left: its task spread spans tens of points), the task panels
    # fill the other slots
    columns = min(4, len(tasks) + 2)
    panels_down = max(2, -(-(len(tasks) + 4) // columns))
    fig = plt.figure(figsize=(4.2 * columns, 3.2 * panels_down))
    grid = fig.add_gridspec(panels_down, columns)
    main = fig.add_subplot(grid[0:2, 0:2])
    slots = [(i // columns, i % columns) for i in range(panels_down * columns)
             if not (i // columns < 2 and i % columns < 2)]
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}

    def draw(ax, value, title: str, spread: bool) -> None:
        for family in families:
            line = sorted((p for p in points if p.family == family), key=lambda p: p.stored)
            xs = [max(p.stored, 1.0) for p in line]  # the linear probe (0 stored) sits at 1
            ys = [value(p) for p in line]
            err = [[y - p.spread[0] for y, p in zip(ys, line)], [p.spread[1] - y for y, p in zip(ys, line)]] \
                if spread else None
            ax.errorbar(xs, ys, yerr=err, fmt='-o', ms=4, capsize=2, color=colours[family], label=family,
                        alpha=0.9, elinewidth=0.6)
        front = pareto_front(points, value)  # of this panel's values: per task, its own front
        ax.plot([max(p.stored, 1.0) for p in front], [value(p) for p in front], 'o', ms=11, mfc='none', mec='k',
                mew=1.0, label='Pareto front' if spread else None)
        ax.set_xscale('log')
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)

    draw(main, lambda p: p.mean, 'mean over tasks (bars: task spread)', True)
    main.set_xlabel('stored parameters excl. head (log; 0 drawn at 1)', fontsize=8)
    main.set_ylabel('test top-1 (%)', fontsize=8)
    for task, (down, across) in zip(tasks, slots):
        draw(fig.add_subplot(grid[down, across]), lambda p, t=task: p.task_means[t], task, False)
    handles, labels = main.get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle('Accuracy per stored parameter: one line per method family across its sizes', fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)
    return True
