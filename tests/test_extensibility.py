"""Extensibility tested, not promised: a backbone family (tests/fixtures/relpos_family.py: timm's
VisionTransformerRelPos) and a fourth form (tests/fixtures/toy_form.py: a masked per-channel scale) added from
outside the package, one file each, no package file touched, train through the CLI, save, push to a (loopback) Hub,
load back and merge. Each runs in its own process: a family or form registered in this one would be one the other
tests (the forward-path test lists every registered family) would have to know."""
import subprocess
import sys
import textwrap
from pathlib import Path

from test_vtab import TINY, make_task

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
    assert 'PROMPT the prompt form is not supported on timm VisionTransformerRelPos' in proc.stdout


TOY_SCRIPT = """
import json, pathlib, sys, torch, timm
sys.path.insert(0, {fixtures!r})
import capaboost_vision as cv
import toy_form  # noqa: F401  (the form, registered from outside the package)
from capaboost_vision.vtab import cli
from capaboost_vision.vtab.inference import load_trained
method = pathlib.Path({out!r}) / 'capaboost_toyscale.yaml'  # a method YAML of one's own
method.parent.mkdir(parents=True)
method.write_text('form: toyscale\\ncapaboost:\\n  toyscale_target: attn.proj\\n')
assert cli.main(['train', '--task', 'toy', '--method', str(method), '--data-path', {data!r}, '--output', {out!r},
                 '--epochs', '1', '--lr', '0.05', *{tiny!r}]) == 0
run = next(pathlib.Path({out!r}).rglob('results.json')).parent
assert run.parent.name == 'capaboost_toyscale', run
block = json.loads((run / 'config.json').read_text())['capaboost']['config']
assert block['toyscale_target'] == 'attn.proj' and 'rank' not in block and 'adapter_scale' not in block, block
trained = load_trained(str(run)).model
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
assert sum(m.toyscale_vector.abs().sum() for m in trained.modules() if hasattr(m, 'toyscale_vector')) > 0  # trained
cv.push_folder_to_hub(run, 'org/toyscale')
torch.manual_seed(0)  # the run's random-init base: the engine seeds with the run's seed before building
model = timm.create_model('vit_tiny_capaboost_toyscale', img_size=32, num_classes=3, toyscale_target='attn.proj')
cv.load_adapter(model, 'hf-hub:org/toyscale')
assert torch.equal(model.eval()(x), trained(x))
assert (cv.merge(model)(x) - trained(x)).abs().max() < 1e-5
import yaml
planned = yaml.safe_load((run / 'config.yaml').read_text())['capaboost']
assert planned['toyscale_target'] == 'attn.proj' and 'rank' not in planned and 'prompt_length' not in planned, planned
print('DONE')
"""


def test_a_form_from_outside_the_package_trains_saves_pushes_loads_and_merges(hub, tmp_path):
    _, env = hub
    make_task(tmp_path / 'data')
    code = TOY_SCRIPT.format(fixtures=str(FIXTURES), data=str(tmp_path / 'data'), out=str(tmp_path / 'runs'),
                             tiny=TINY)
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and 'DONE' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
