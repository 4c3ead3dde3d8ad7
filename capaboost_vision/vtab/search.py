"""Learning-rate search, the VTAB-1k literature's way: train800 -> val200 over a grid, extend the grid when the best
rate sits at an edge, pick on val200 only, then train800val200 -> test with the chosen rate for every seed.

Every run is an ordinary ``capaboost-vtab train`` run (so finished runs are reused, and a run made with other
settings is refused), described here by its request — task, method, lr, protocol, seed, name — which the caller
resolves into the run's config: the validation runs are named ``<name>_lr<lr>`` under ``<output>/.../val/``,
the final runs ``<name>`` under ``.../final/``. The search record of each (task, method) — grid, validation
accuracies, chosen rate, whether it still sits at a limit — is written to
``<output>/<family>/<task>/search/<name>.json`` and listed by ``capaboost-vtab report``.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .._io import write_text_atomic
from .markdown import row
from .run_config import RunError

RECORD_VERSION = 1


Request = Dict[str, Any]  # {task, method, lr, protocol, seed, name}: one run of a search


@dataclass
class SearchJob:
    """One (task, method) to search over ``grid``."""
    task: str
    name: str
    grid: List[float]
    val_top1: Dict[float, float] = field(default_factory=dict)
    extensions: Dict[str, int] = field(default_factory=lambda: {'down': 0, 'up': 0})
    split: str = 'train800 -> val200'  # other task sources: train -> val

    def best(self) -> float:
        """The rate with the highest val200 accuracy (the smaller rate on a tie)."""
        return max(sorted(self.val_top1), key=lambda lr: self.val_top1[lr])


def _round(lr: float) -> float:
    return float(f'{lr:.3g}')


def grid_ratio(grid: List[float], direction: str) -> float:
    """The grid's own step at that edge (x sqrt(10) for a one-point grid)."""
    if len(grid) < 2:
        return math.sqrt(10)
    return grid[1] / grid[0] if direction == 'down' else grid[-1] / grid[-2]


def next_rate(job: SearchJob, max_extensions: int) -> Optional[float]:
    """The rate to add when the best one sits at an edge of the grid, within ``max_extensions`` per direction."""
    grid = sorted(job.grid)
    best = job.best()
    for direction, edge in (('down', grid[0]), ('up', grid[-1])):
        if best == edge and len(grid) > 1 and job.extensions[direction] < max_extensions:
            ratio = grid_ratio(grid, direction)
            return _round(edge / ratio if direction == 'down' else edge * ratio)
    return None


def at_limit(job: SearchJob) -> bool:
    """True when the chosen rate is still at an edge of the (extended) grid."""
    grid = sorted(job.grid)
    return len(grid) > 1 and job.best() in (grid[0], grid[-1])


def val_name(name: str, lr: float) -> str:
    return f'{name}_lr{lr:g}'


def val_request(job: SearchJob, lr: float, search_seed: int) -> Request:
    """The train800 -> val200 run of ``job`` at ``lr``."""
    return dict(task=job.task, method=job.name, lr=lr, protocol='val', seed=search_seed, name=val_name(job.name, lr))


def final_request(job: SearchJob, lr: float, seed: int) -> Request:
    """The train800val200 -> test run of ``job`` at ``lr`` for ``seed``."""
    return dict(task=job.task, method=job.name, lr=lr, protocol='final', seed=seed, name=job.name)


def search(jobs: List[SearchJob], seeds: List[int], search_seed: int, max_extensions: int,
           run_all: Callable[[List[Request]], List[str]], results_of: Callable[[Request], Dict],
           record_dir_of: Callable[[SearchJob], Path]) -> Dict[str, Dict]:
    """Run the search of every job, round by round (each round's runs in parallel through ``run_all``, which
    returns the failed runs' commands), then the final runs; returns {name@task: record}. ``results_of(request)``
    reads a finished run's results.json."""
    keys = [(job.task, job.name) for job in jobs]
    twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
    if twice is not None:  # one record and one set of runs per (task, method)
        raise RunError(f'method {twice[1]} is searched twice on task {twice[0]}: give each method and task once')
    pending = {(job.task, job.name): list(job.grid) for job in jobs}
    while pending:  # one round: every missing (job, lr) validation run
        by_key = {(job.task, job.name): job for job in jobs}
        failures = run_all([val_request(by_key[key], lr, search_seed)
                            for key, lrs in pending.items() for lr in lrs])
        if failures:
            raise RunError(f'{len(failures)} validation run(s) did not finish, e.g. {failures[0]}')
        new_pending = {}
        for key, lrs in pending.items():
            job = by_key[key]
            for lr in lrs:
                results = results_of(val_request(job, lr, search_seed))
                job.val_top1[lr] = results['top1']
                job.split = 'train800 -> val200' if results.get('eval_split', 'val200') == 'val200' else 'train -> val'
            lr = next_rate(job, max_extensions)
            if lr is not None:
                job.extensions['down' if lr < min(job.grid) else 'up'] += 1
                job.grid = sorted(job.grid + [lr])
                new_pending[key] = [lr]
        pending = new_pending

    records = {}
    for job in jobs:
        record = {'version': RECORD_VERSION, 'task': job.task, 'method': job.name, 'grid': sorted(job.grid),
                  'val_top1': {f'{lr:g}': job.val_top1[lr] for lr in sorted(job.grid)}, 'chosen_lr': job.best(),
                  'at_limit': at_limit(job), 'extensions': job.extensions, 'search_seed': search_seed,
                  'final_seeds': seeds, 'split': job.split}
        path = record_dir_of(job) / f'{job.name}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2))
        records[f'{job.name}@{job.task}'] = record
    final = [final_request(job, job.best(), seed) for job in jobs for seed in seeds]
    failures = run_all(final)
    if failures:
        raise RunError(f'{len(failures)} final run(s) did not finish, e.g. {failures[0]}')
    return records


def read_records(runs_dir: Path) -> List[Dict]:
    """Every search record under ``runs_dir``."""
    records = []
    for path in sorted(Path(runs_dir).rglob('search/*.json')):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            raise RunError(f'{path} is not valid JSON; delete it and rerun the search') from None
        if isinstance(record, dict) and record.get('version') == RECORD_VERSION:
            records.append(dict(record, family=path.parent.parent.parent.name))
    return records


def records_markdown(records: List[Dict]) -> str:
    """The searched grid and chosen rate per task and method; a choice still at a grid limit is marked."""
    lines = ['| model | task | method | grid (val top-1) | chosen lr | |', '|---|---|---|---|---|---|']
    for r in records:
        grid = ', '.join(f'{lr}: {acc:.1f}' for lr, acc in r['val_top1'].items())
        lines.append(row([r['family'], r['task'], r['method'], grid, f'{r["chosen_lr"]:g}',
                          'at grid limit' if r['at_limit'] else '']))
    return '\n'.join(lines) + '\n'

