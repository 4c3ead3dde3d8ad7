"""The package as a user gets it: a wheel built from the project files (not the checkout), installed into a fresh
virtual environment, run from a folder outside the repository."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from capaboost_vision import __version__
from test_vtab import make_task

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ['setup.cfg', 'pyproject.toml', 'README.md', 'capaboost_vtab.py', 'capaboost_vision', 'configs']
TINY = ['--model', 'vit_tiny', '--no-pretrained', '--img-size', '32', '--batch-size', '100', '--workers', '0',
        '--warmup-epochs', '0', '--epochs', '1']


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """(python, capaboost-vtab) of a fresh venv holding only our wheel (--no-deps); it sees this environment's
    torch, timm, peft, ... through a .pth line, but not its editable install of this package."""
    root = tmp_path_factory.mktemp('wheel')
    src = root / 'src'  # a copy, so the build writes nothing into the checkout
    src.mkdir()
    for name in PROJECT_FILES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({'ignore': shutil.ignore_patterns('__pycache__')}
                                          if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(root / 'dist'), str(src)], check=True, capture_output=True, timeout=300)
    wheel, = (root / 'dist').glob('capaboost_vision-*.whl')
    venv = root / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
    (Path(site) / 'test_env.pth').write_text('\n'.join(sorted(ours)) + '\n')
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index', '-q',
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return wheel, python, venv / 'bin' / 'capaboost-vtab'


def test_the_wheel_ships_every_method_and_task_yaml(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ('methods', 'tasks'):
        shipped = {Path(n).name for n in names if n.startswith(f'capaboost_vision/configs/{kind}/')}
        assert shipped == {p.name for p in (REPO / 'configs' / kind).glob('*.yaml')}, kind
    assert wheel.name.startswith(f'capaboost_vision-{__version__}-')


def test_the_installed_command_trains_from_outside_the_checkout(installed, tmp_path):
    _, python, command = installed
    make_task(tmp_path / 'data')
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH='')
    where = subprocess.run([str(python), '-c', 'import capaboost_vision, importlib.metadata as m; '
                            'print(capaboost_vision.__file__); print(m.version("capaboost-vision"))'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(python.parent.parent) and where[1] == __version__  # the wheel, not the repo
    version = subprocess.run([str(command), '--version'], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert version.stdout.strip() == f'capaboost-vtab {__version__}'
    methods = ['capaboost_lora'] + (['peft_lora'] if importlib.util.find_spec('peft') else [])
    for method in methods:
        out = subprocess.run([str(command), 'train', '--task', str(tmp_path / 'data' / 'toy'), '--method', method,
                              '--output', str(tmp_path / 'runs'), *TINY], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert (tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / method / 'seed0' / 'results.json').is_file()


# ---- every code block of docs/hub.md, docs/python_api.md and of freshly pushed cards runs as written ----

RUN_DOCS_AND_CARDS = r"""
import re, torch, timm, capaboost_vision as cv
from pathlib import Path
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file


def run_blocks(text, where, namespace):
    blocks = re.findall(r'```python\n(.*?)```', text, re.S)
    assert blocks, where
    for i, code in enumerate(blocks):
        exec(compile(code, f'{{where}} block {{i + 1}}', 'exec'), namespace)
    return namespace


docs = run_blocks(Path({hub_md!r}).read_text(), 'docs/hub.md', {{}})
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
save_file({{'logits': docs['merged'].eval()(x)}}, 'merged_logits.st')
run_blocks(Path({api_md!r}).read_text(), 'docs/python_api.md', {{}})

results = {{'task': 'toy', 'top1': 87.5, 'top5': 100.0, 'epochs': 3, 'seed': 0, 'eval_split': 'test'}}
for form, setting in (('lora', dict(rank=4)), ('prompt', dict(prompt_length=4))):
    torch.manual_seed(0)
    m = timm.create_model(f'vit_tiny_capaboost_{{form}}', pretrained=True, img_size=32, num_classes=3, **setting)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    cv.push_adapter_to_hub(m, f'org/card-{{form}}-api', results=results, label_names=['a', 'b', 'c'])
    cv.save_adapter(m, f'folder-{{form}}', results=results, label_names=['a', 'b', 'c'])
    Path(f'folder-{{form}}/results.json').write_text(__import__('json').dumps(results))
    cv.push_folder_to_hub(f'folder-{{form}}', f'org/card-{{form}}-folder')
    for repo in (f'org/card-{{form}}-api', f'org/card-{{form}}-folder'):
        card = Path(hf_hub_download(repo, 'README.md')).read_text()
        assert f"'hf-hub:{{repo}}'" in card and 'top-5 accuracy' in card and 'folder-' not in card, card
        assert ('merge(' in card) == (form == 'lora') and ('| `rank` |' in card) == (form == 'lora'), card
        run_blocks(card, repo, {{}})
print('ALL BLOCKS RAN')
"""

PLAIN_TIMM = """
import sys, timm, torch
from safetensors.torch import load_file
m = timm.create_model('hf-hub:org/vit-t-merged', pretrained=True).eval()
assert not any(name.startswith('capaboost') for name in sys.modules), 'capaboost_vision was imported'
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
assert torch.allclose(m(x), load_file('merged_logits.st')['logits'], atol=1e-6, rtol=0)
cfg = m.pretrained_cfg
assert list(cfg['label_names']) == ['cat', 'dog', 'bird'] and tuple(cfg['input_size']) == (3, 32, 32), cfg
print(type(m).__name__, m.pretrained_cfg['architecture'])
"""


def test_docs_and_pushed_cards_run_from_the_wheel_and_a_merged_model_needs_only_timm(installed, hub, tmp_path):
    """From the installed wheel, outside the checkout: docs/hub.md and docs/python_api.md run block by block; so does
    every block of the cards of a LoRA and a prompt adapter pushed both ways (push_adapter_to_hub,
    push_folder_to_hub); the merged model docs/hub.md pushes with timm's push_to_hf_hub loads in a fresh process
    that never imports this package, with the same logits."""
    server, env = hub
    python = str(installed[1])
    code = RUN_DOCS_AND_CARDS.format(hub_md=str(REPO / 'docs' / 'hub.md'), api_md=str(REPO / 'docs' / 'python_api.md'))
    env = dict(env, PYTHONPATH='')
    out = subprocess.run([python, '-c', 'import capaboost_vision, sys; print(capaboost_vision.__file__)'], env=env,
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).is_relative_to(installed[1].parent.parent)  # the wheel, not the checkout
    out = subprocess.run([python, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and 'ALL BLOCKS RAN' in out.stdout, out.stderr[-3000:]
    out = subprocess.run([python, '-c', PLAIN_TIMM], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ['VisionTransformer', 'vit_tiny_patch16_224']
