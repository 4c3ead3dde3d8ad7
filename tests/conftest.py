import os
import sys

import pytest
import timm
import torch
from safetensors.torch import save

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(__file__))
# the offline fixtures (real data and a real backbone from registry wheels) live beside the scripts, not in the library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))

import capaboost_vision  # noqa: E402,F401  (registers the models)
from hub_server import HubServer  # noqa: E402

BASE_REPO = 'timm/vit_tiny_patch16_224.augreg_in21k'


def tiny_vit(**kwargs):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kwargs)
    return timm.create_model('vit_tiny_patch16_224', **args)


def tiny_eva(arch='eva02_tiny_patch14_224', **kwargs):
    """A tiny member of timm's Eva family: EVA-02 (fused qkv with q/v biases, GluMlp) unless ``arch`` names another
    (DINOv3, EVA-02 base with separate q/k/v and SwiGLU, Perception Encoder)."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kwargs)
    return timm.create_model(arch, **args)


def tiny_swin(**kwargs):
    args = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                num_classes=5)
    args.update(kwargs)
    return timm.create_model('swin_tiny_patch4_window7_224', **args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hub(tmp_path):
    """A loopback Hub holding a (random) base checkpoint where timm looks for the tiny ViT's weights."""
    server = HubServer()
    base = timm.create_model('vit_tiny_patch16_224', num_classes=0)
    server.store.create(BASE_REPO)
    repo = server.store.repos[BASE_REPO]
    repo['commits'][repo['branches']['main']]['model.safetensors'] = save(base.state_dict())
    with server:
        env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
        env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'hf'),
                   HF_TOKEN='hf_test_token_not_printed', HF_HUB_DISABLE_TELEMETRY='1')
        yield server, env


SLURM_DAEMONS = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'squeue', 'scontrol')


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def real_slurm(tmp_path_factory):
    """A real one-node Slurm cluster for the whole test run (no accounting: no slurmdbd, so no sacct, as on many
    small clusters): munged, slurmctld and slurmd started as root from a generated slurm.conf in a temp folder,
    stopped by PID at the end. Yields the environment that points Slurm's commands at it (SLURM_CONF). Skips with
    one reason where Slurm is not installed (make setup installs slurm-wlm and munge where apt and root are) or this
    is not root."""
    import shutil
    import socket
    import subprocess
    import time
    missing = [d for d in SLURM_DAEMONS if shutil.which(d) is None and not os.path.exists(f'/usr/sbin/{d}')]
    if missing or os.geteuid() != 0:
        pytest.skip(f'a real Slurm needs root and slurm-wlm + munge ({", ".join(missing) or "not root"} missing)')
    root = tmp_path_factory.mktemp('slurm')
    (root / 'state').mkdir()
    (root / 'spool').mkdir()
    key = root / 'munge.key'
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    host = socket.gethostname().split('.')[0]
    conf = root / 'slurm.conf'
    conf.write_text('\n'.join([
        'ClusterName=capatest', f'SlurmctldHost={host}(127.0.0.1)', 'SlurmUser=root', 'SlurmdUser=root',
        f'SlurmctldPort={_free_port()}', f'SlurmdPort={_free_port()}', 'AuthType=auth/munge', 'CredType=cred/munge',
        f'AuthInfo=socket={root}/munge.sock', f'StateSaveLocation={root}/state', f'SlurmdSpoolDir={root}/spool',
        f'SlurmctldPidFile={root}/slurmctld.pid', f'SlurmdPidFile={root}/slurmd.pid',
        f'SlurmctldLogFile={root}/slurmctld.log', f'SlurmdLogFile={root}/slurmd.log',
        'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none', 'SelectType=select/cons_tres',
        'SelectTypeParameters=CR_Core', 'SchedulerType=sched/builtin', 'JobAcctGatherType=jobacct_gather/none',
        'AccountingStorageType=accounting_storage/none', 'MpiDefault=none', 'ReturnToService=2', 'InactiveLimit=0',
        'MinJobAge=600', 'KillWait=5', 'PlugStackConfig=/dev/null',
        f'NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN',
        'PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP', '']))
    env = dict(os.environ, SLURM_CONF=str(conf))
    sbin = lambda name: shutil.which(name) or f'/usr/sbin/{name}'  # noqa: E731
    subprocess.run([sbin('munged'), '--force', '-S', f'{root}/munge.sock', f'--key-file={key}',
                    f'--pid-file={root}/munged.pid', f'--log-file={root}/munged.log',
                    f'--seed-file={root}/munged.seed'], check=True, env=env)
    subprocess.run([sbin('slurmctld'), '-c'], check=True, env=env)
    subprocess.run([sbin('slurmd')], check=True, env=env)
    try:
        for _ in range(100):
            out = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True, env=env)
            if out.stdout.strip() == 'idle':
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f'the test Slurm did not come up: sinfo says {out.stdout!r} {out.stderr!r}')
        yield env
    finally:
        subprocess.run(['scancel', '-u', 'root'], env=env, capture_output=True)
        for name in ('slurmd', 'slurmctld', 'munged'):
            try:
                os.kill(int((root / f'{name}.pid').read_text()), 15)
            except (OSError, ValueError):
                pass
