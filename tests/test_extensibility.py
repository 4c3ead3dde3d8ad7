"""Extensibility tested, not promised: a backbone family added from outside the package (tests/fixtures/
relpos_family.py: timm's VisionTransformerRelPos, one file, no package file touched) trains through the CLI, saves,
pushes to a (loopback) Hub, loads back and merges. It runs in its own process: a family registered in this one would
be a family the other tests (the forward-path test lists every registered family) would have to know."""
import subprocess
import sys
import textwrap
from pathlib import Path

from test_vtab import make_task

FIXTURES = Path(__file__).parent / 'fixtures'
SCRIPT = """
import pathlib, sys, torch, timm
sys.path.insert(0, {fixtures!r})
import capaboost_vision as cv
import relpos_family  # noqa: F401  (the family, registered from outside the package)
from capaboost_vision.vtab import cli
from capaboost_vision.vtab.inference import load_trained
assert cli.main(['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', {data!r}, '--output', {out!r},
                 '--model', 'vit_relpos_medium', '--no-pretrained', '--img-size', '32', '--epochs', '1',
                 '--batch-size', '100', '--workers', '0', '--warmup-epochs', '0']) == 0
run = next(pathlib.Path({out!r}).rglob('results.json')).parent
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
trained = load_trained(str(run)).model  # rebuilt from the run folder
cv.push_folder_to_hub(run, 'org/relpos-capaboost')
torch.manual_seed(0)  # the run's random-init base: the engine seeds with the run's seed before building
model = timm.create_model('vit_relpos_medium_capaboost_lora', img_size=32, num_classes=3)
cv.load_adapter(model, 'hf-hub:org/relpos-capaboost')  # the base fingerprint is checked too
assert torch.equal(model.eval()(x), trained(x))
assert (cv.merge(model)(x) - trained(x)).abs().max() < 1e-5
try:
    timm.create_model('vit_relpos_medium_capaboost_prompt', img_size=32)
except ValueError as e:
    print('PROMPT', e)
print('DONE')
"""


def test_a_family_from_outside_the_package_trains_saves_pushes_loads_and_merges(hub, tmp_path):
    _, env = hub
    make_task(tmp_path / 'data')
    code = SCRIPT.format(fixtures=str(FIXTURES), data=str(tmp_path / 'data'), out=str(tmp_path / 'runs'))
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and 'DONE' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'PROMPT prompts are not supported on VisionTransformerRelPos' in proc.stdout
