"""Learning-rate search, the VTAB-1k literature's way: train800 -> val200 over a grid, extend the grid when the best
rate sits at an edge, pick on val200 only, then train800val200 -> test with the chosen rate for every seed.

Every run is an ordinary ``capaboost-vtab train`` run (so finished runs are reused, and a run made with other
settings is refused): the validation runs are named ``<name>_lr<lr>`` under ``<output>/.../val/``, the final runs
``<name>`` under ``.../final/``. The search record of each (task, method) — grid, validation accuracies, chosen
rate, whether it still sits at a limit — is written to ``<output>/<family>/<task>/search/<name>.json`` and
listed by ``capaboost-vtab report``.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ._io import write_text_atomic
from .run_config import RunError

RECORD_VERSION = 1


@dataclass
class SearchJob:
    """One (task, method) to search: ``argv`` is its ``train`` command line without --lr/--protocol/--seed/--name."""
    task: str
    name: str
    argv: List[str]
    grid: List[float]
    val_top1: Dict[float, float] = field(default_factory=dict)
    extensions: Dict[str, int] = field(default_factory=lambda: {'down': 0, 'up': 0})

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


def final_argv(job: SearchJob, lr: float, seed: int) -> List[str]:
    """The train800val200 -> test run of ``job`` at ``lr`` for ``seed`` (also what reads its results back)."""
    return [*job.argv, '--lr', f'{lr:g}', '--protocol', 'final', '--seed', str(seed), '--name', job.name]


def search(jobs: List[SearchJob], seeds: List[int], search_seed: int, max_extensions: int,
           run_all: Callable[[List[List[str]]], List[str]], results_of: Callable[[List[str]], Dict],
           record_dir_of: Callable[[SearchJob], Path]) -> Dict[str, Dict]:
    """Run the search of every job, round by round (each round's runs in parallel through ``run_all``), then the
    final runs; returns {name@task: record}. ``results_of(argv)`` reads a finished run's results.json."""
    def val_argv(job: SearchJob, lr: float) -> List[str]:
        return [*job.argv, '--lr', f'{lr:g}', '--protocol', 'val', '--seed', str(search_seed),
                '--name', val_name(job.name, lr)]

    pending = {(job.task, job.name): list(job.grid) for job in jobs}
    while pending:  # one round: every missing (job, lr) validation run
        by_key = {(job.task, job.name): job for job in jobs}
        argvs = [val_argv(by_key[key], lr) for key, lrs in pending.items() for lr in lrs]
        failures = run_all(argvs)
        if failures:
            raise RunError(f'{len(failures)} validation run(s) failed, e.g. capaboost-vtab {failures[0]}')
        new_pending = {}
        for key, lrs in pending.items():
            job = by_key[key]
            for lr in lrs:
                job.val_top1[lr] = results_of(val_argv(job, lr))['top1']
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
                  'final_seeds': seeds, 'split': 'train800 -> val200'}
        path = record_dir_of(job) / f'{job.name}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=2))
        records[f'{job.name}@{job.task}'] = record
    final = [final_argv(job, job.best(), seed) for job in jobs for seed in seeds]
    failures = run_all(final)
    if failures:
        raise RunError(f'{len(failures)} final run(s) failed, e.g. capaboost-vtab {failures[0]}')
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
    lines = ['| model | task | method | grid (val200 top-1) | chosen lr | |', '|---|---|---|---|---|---|']
    for r in records:
        grid = ', '.join(f'{lr}: {acc:.1f}' for lr, acc in r['val_top1'].items())
        lines.append(f'| {r["family"]} | {r["task"]} | {r["method"]} | {grid} | {r["chosen_lr"]:g} | '
                     f'{"at grid limit" if r["at_limit"] else ""} |')
    return '\n'.join(lines) + '\n'

