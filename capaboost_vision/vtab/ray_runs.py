"""``--launcher ray``: one Ray task per run (Ray Core, not Tune), on the cluster ``RAY_ADDRESS`` names or on a Ray
started for the command (stopped when the command ends); a Ray already initialised in this process (``ray.init``)
is used as it is. An unreachable ``RAY_ADDRESS`` is one line within ``--ray-connect-timeout-s``; per-run GPUs and
CPUs left at their defaults are cut to what the connected cluster has (said in one line).

Each task runs ``train --config <run folder>/config.yaml`` in a Ray worker with ``--gpus-per-run`` GPUs and
``--cpus-per-run`` cores. A task whose worker process or node dies is retried (``--max-requeues`` times) and resumes
from the run's last checkpoint; a run that fails by itself (an error, a diverged loss) is not retried.
"""
import os
import socket
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.parse import urlparse

import ray

from .launch import Launcher, cli_main, driver_lock, train_command
from .launch_settings import LAUNCH_FIELDS, LaunchSettings
from .run_config import RunError


def train_task(config_file: str) -> int:
    """The body of one Ray task: the run, in the worker's process."""
    return cli_main()(train_command(Path(config_file)))


def ray_address() -> str:
    return os.environ.get('RAY_ADDRESS', '')


def connect(timeout_s: float) -> None:
    """``ray.init()`` on the cluster RAY_ADDRESS names (else a Ray started on this machine), or RunError naming
    RAY_ADDRESS within ``timeout_s`` when it cannot be reached (Ray itself would retry for minutes)."""
    address = ray_address()
    if address and address not in ('auto', 'local'):
        parsed = urlparse(address if '://' in address else f'tcp://{address}')
        port = parsed.port or (10001 if parsed.scheme == 'ray' else 6379)
        try:
            socket.create_connection((parsed.hostname or '127.0.0.1', port), timeout=timeout_s).close()
        except OSError as e:
            raise RunError(f'--launcher ray: cannot reach the Ray cluster at RAY_ADDRESS={address} within '
                           f'{timeout_s:g} s ({e.strerror or type(e).__name__}); start it (ray start --head) or unset '
                           f'RAY_ADDRESS to start a Ray on this machine') from None
    try:
        ray.init()
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f'RAY_ADDRESS={address}' if address else 'a Ray on this machine'
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f'--launcher ray: cannot connect to {where}: {reason}') from None


def fit_resources(settings: LaunchSettings, have: Dict[str, float]) -> Tuple[int, int]:
    """(GPUs, CPUs) per run: what was asked for (RunError when more than the cluster has), or, for a setting left at
    its default, the default cut to what the connected cluster has (said in one line)."""
    chosen = getattr(settings, 'given', frozenset(LAUNCH_FIELDS))
    out = []
    for name, field, resource, least in (('GPUs', 'gpus_per_run', 'GPU', 0), ('CPUs', 'cpus_per_run', 'CPU', 1)):
        wanted, available = getattr(settings, field), int(have.get(resource, 0))
        flag = f'--{field.replace("_", "-")}'
        if wanted > available and field not in chosen:
            wanted = max(least, available)
            print(f'ray: {flag} {wanted} (the default {getattr(settings, field)} is more than the connected cluster\'s '
                  f'{available} {name}; pass {flag} to choose)', flush=True)
        elif wanted > available:
            raise RunError(f'{flag} {wanted}: the Ray cluster has {available} {name} in all'
                           + ('; pass --gpus-per-run 0 to run on CPUs' if resource == 'GPU' else ''))
        out.append(wanted)
    return out[0], out[1]


class RayLauncher(Launcher):
    """Connects (or starts a Ray here) and fits the per-run resources when built, before any run is planned: an
    unreachable cluster or an impossible request writes nothing. A Ray started here stops with the process."""

    def __init__(self, settings: LaunchSettings, output: Path) -> None:
        self.settings, self.output = settings, Path(output)
        if not ray.is_initialized():
            connect(settings.ray_connect_timeout_s)
        self.gpus, self.cpus = fit_resources(settings, ray.cluster_resources())

    def run(self, config_files: List[Path]) -> List[str]:
        if not config_files:
            return []
        with driver_lock(self.output):
            return self._run(config_files)

    def _run(self, config_files: List[Path]) -> List[str]:
        task = ray.remote(train_task).options(num_gpus=self.gpus, num_cpus=self.cpus,
                                              max_retries=self.settings.max_requeues, retry_exceptions=False)
        refs: Dict[ray.ObjectRef, Path] = {task.remote(str(path)): path for path in config_files}
        print(f'submitted {len(refs)} Ray task(s)', flush=True)
        failures = []
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            path = refs.pop(done[0])
            try:
                code = ray.get(done[0])
            except ray.exceptions.RayError as e:
                code = f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'
            if code == 0 and (path.parent / 'results.json').is_file():
                print(f'done: {path.parent}', flush=True)
                continue
            failures.append(f'{path.parent}: the Ray task ended with {code!r} and no results (its output is above, '
                            f'prefixed with the worker\'s pid)')
            print(f'failed: {failures[-1]}', flush=True)
        return failures
