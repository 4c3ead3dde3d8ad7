"""Re-render the committed offline studies' paired comparisons with ``report --compare``'s statistics (tasks as the
units), from their ``docs/results/<study>_runs.json`` (every final run's task, method, seed and test top-1): no
retraining. Those files keep no per-run settings; each study's runs come from the one command its .md states, so
the settings check of ``report --compare`` is replaced by that.

    python scripts/rerender_studies.py            # writes docs/results/<study>_compare.md
"""
import json
from pathlib import Path

from capaboost_vision._io import write_text_atomic
from capaboost_vision.vtab.compare import comparisons_markdown, compare
from offline_suite import PAIRS

RESULTS = Path(__file__).resolve().parent.parent / 'docs' / 'results'
STUDIES = ('offline_suite', 'offline_suite_peft', 'offline_suite_peft_extra')


def rerender(study: str) -> Path:
    runs = json.loads((RESULTS / f'{study}_runs.json').read_text())
    results = [dict(r, family='vit_small_dinov2', group='custom', protocol='final') for r in runs]
    methods = {r['method'] for r in runs}
    comparisons = [c for candidate, baseline in PAIRS if candidate in methods and baseline in methods
                   for c in compare(results, [candidate, baseline], check_settings=False)]
    command = (RESULTS / f'{study}.md').read_text().splitlines()[0]
    md = (f'# {study}: paired comparisons, tasks as the units\n\nRe-rendered by `python scripts/rerender_studies.py` '
          f'from `{study}_runs.json` (no retraining), the final runs of\n{command}\n\n' + comparisons_markdown(comparisons))
    path = RESULTS / f'{study}_compare.md'
    write_text_atomic(path, md)
    return path


if __name__ == '__main__':
    for name in STUDIES:
        print(rerender(name).read_text())
