"""Re-render the committed offline studies' paired comparisons with ``report --compare``'s statistics (tasks as the
units), from their ``docs/results/<study>_runs.json``: no retraining.

The first studies' files keep each final run's task, method, seed and test top-1 only; their runs come from the one
command their .md states, so the settings check of ``report --compare`` is replaced by that. The accuracy-per-
parameter study (``offline_pareto``) keeps, per final run, what ``report`` reads to draw the curve and to pair rows
(recorded config, stored and fixed tensors, throughput, provenance), so its curve, its table and both pairings
(``report --compare-pairing``) are redrawn from the committed file with the settings check on.

    python scripts/rerender_studies.py                       # writes docs/results/<study>_compare.md (+ _curve.png)
    python scripts/rerender_studies.py --export RUNS_DIR     # first: the finals of RUNS_DIR -> offline_pareto_runs.json
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

from capaboost_vision._io import write_text_atomic
from capaboost_vision.vtab.compare import comparisons_markdown, compare
from capaboost_vision.vtab.curve import PAIRINGS, curve_markdown, curve_points, pairs, plot_curve
from capaboost_vision.vtab.report import collect
from offline_suite import PAIRS

RESULTS = Path(__file__).resolve().parent.parent / 'docs' / 'results'
STUDIES = ('offline_suite', 'offline_suite_peft', 'offline_suite_peft_extra')
CURVE_STUDY = 'offline_pareto'
# what the curve, the pairings and their settings check read from a results.json
CURVE_FIELDS = ('task', 'method', 'seed', 'top1', 'lr', 'family', 'group', 'protocol', 'trainable_params_excl_head',
                'fixed_params', 'max_rank', 'train_images_per_s', 'run_seconds', 'config')


def rerender(study: str, folder: Path = RESULTS) -> Path:
    runs = json.loads((folder / f'{study}_runs.json').read_text())
    results = [dict(r, family='vit_small_dinov2', group='custom', protocol='final') for r in runs]
    methods = {r['method'] for r in runs}
    comparisons = [c for candidate, baseline in PAIRS if candidate in methods and baseline in methods
                   for c in compare(results, [candidate, baseline], check_settings=False)]
    command = (folder / f'{study}.md').read_text().splitlines()[0]
    md = (f'# {study}: paired comparisons, tasks as the units\n\nRe-rendered by `python scripts/rerender_studies.py` '
          f'from `{study}_runs.json` (no retraining), the final runs of\n{command}\n\n' + comparisons_markdown(comparisons))
    path = folder / f'{study}_compare.md'
    write_text_atomic(path, md)
    return path


def export_curve_runs(runs_dir: Path) -> Path:
    """Every final (test) run of ``runs_dir``, as ``CURVE_FIELDS`` plus the commit and machine that made it."""
    runs: List[Dict[str, Any]] = []
    for r in collect(runs_dir):
        if r.get('protocol') != 'final':
            continue
        made = r.get('provenance') or {}
        hardware, versions = made.get('hardware') or {}, made.get('versions') or {}
        runs.append(dict({k: r.get(k) for k in CURVE_FIELDS}, made_by=dict(
            git_commit=made.get('git_commit'), torch=versions.get('torch'), peft=versions.get('peft'),
            cpu=hardware.get('cpu'), threads=hardware.get('threads'))))
    runs.sort(key=lambda r: (r['method'], r['task'], r['seed']))
    path = RESULTS / f'{CURVE_STUDY}_runs.json'
    write_text_atomic(path, '[\n' + ',\n'.join(json.dumps(r, sort_keys=True) for r in runs) + '\n]\n')
    return path


def rerender_curve(folder: Path = RESULTS, plot: bool = True) -> Path:
    """``<study>_curve.md`` (the curve's table, then the paired differences at equal stored parameters and at equal
    rank of the update) and ``<study>_curve.png``, from ``<study>_runs.json``."""
    results = json.loads((folder / f'{CURVE_STUDY}_runs.json').read_text())
    points, left_out = curve_points(results)
    if plot:
        plot_curve(points, folder / f'{CURVE_STUDY}_curve.png')
    command = (folder / f'{CURVE_STUDY}.md').read_text().splitlines()[0]
    md = [f'# {CURVE_STUDY}: accuracy per stored parameter, and CapaBoost-LoRA paired two ways', '',
          f'Re-rendered by `python scripts/rerender_studies.py` from `{CURVE_STUDY}_runs.json` (no retraining), the '
          f'final runs of', command, '', f'Curve: `{CURVE_STUDY}_curve.png`.', '', curve_markdown(points, left_out)]
    for pairing, meaning in PAIRINGS.items():
        comparisons = [c for candidate, baseline in pairs(points, pairing)
                       for c in compare(results, [candidate, baseline])]
        md += [f'## Paired at {meaning} (`report --compare-pairing {pairing}`)', '',
               'Candidate minus baseline, test top-1 points; tasks are the units.', '',
               comparisons_markdown(comparisons)]
    path = folder / f'{CURVE_STUDY}_curve.md'
    write_text_atomic(path, '\n'.join(md))
    return path


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--export', type=Path, metavar='RUNS_DIR',
                        help=f'write docs/results/{CURVE_STUDY}_runs.json from the final runs of RUNS_DIR first')
    args = parser.parse_args()
    if args.export:
        print(f'wrote {export_curve_runs(args.export)}')
    for name in STUDIES:
        print(rerender(name).read_text())
    if (RESULTS / f'{CURVE_STUDY}_runs.json').is_file():
        print(rerender_curve().read_text())
