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
