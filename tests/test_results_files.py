"""The committed study tables are what their committed runs files render: every paired comparison, the
accuracy-per-parameter table and both pairings come from ``docs/results/<study>_runs.json`` by
``scripts/rerender_studies.py``, never edited by hand."""
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'scripts'))

import rerender_studies  # noqa: E402


def test_committed_study_tables_are_what_their_runs_files_render(tmp_path):
    for f in rerender_studies.RESULTS.iterdir():
        if f.suffix in ('.md', '.json'):
            shutil.copy(f, tmp_path / f.name)
    rendered = [rerender_studies.rerender(study, tmp_path) for study in rerender_studies.STUDIES]
    rendered.append(rerender_studies.rerender_curve(tmp_path, plot=False))
    for path in rendered:
        assert path.read_text() == (rerender_studies.RESULTS / path.name).read_text(), path.name
