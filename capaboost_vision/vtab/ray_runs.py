"""``--launcher ray``: one Ray task per run (Ray Core, not Tune), on the cluster ``RAY_ADDRESS`` names or on a Ray
started for the command (and stopped after it); a Ray already initialised in this process (``ray.init``) is used as
it is.

Each task runs ``train --config <run folder>/config.yaml`` in a Ray worker with ``--gpus-per-run`` GPUs and
``--cpus-per-run`` cores. A task whose worker process or node dies is retried (``--max-requeues`` times) and resumes
from the run's last checkpoint; a run that fails by itself (an error, a diverged loss) is not retried.
"""
from pathlib import Path
from typing import Dict, List

import ray

from .launch import Launcher, cli_main, driver_lock, train_command
from .launch_settings import LaunchSettings
from .run_config import RunError


def train_task(config_file: str) -> int:
    """The body of one Ray task: the run, in the worker's process."""
    return cli_main()(train_command(Path(config_file)))


class RayLauncher(Launcher):
    def __init__(self, settings: LaunchSettings, output: Path) -> None:
        self.settings, self.output = settings, Path(output)

    def run(self, config_files: List[Path]) -> List[str]:
        if not config_files:
            return []
        started = not ray.is_initialized()
        if started:
            ray.init()  # RAY_ADDRESS when set, else a Ray on this machine
        try:
            with driver_lock(self.output):
                return self._run(config_files)
        finally:
            if started:
                ray.shutdown()

    def _run(self, config_files: List[Path]) -> List[str]:
        have = ray.cluster_resources()
        for name, flag, wanted in (('GPU', '--gpus-per-run', self.settings.gpus_per_run),
                                   ('CPU', '--cpus-per-run', self.settings.cpus_per_run)):
            if wanted > have.get(name, 0):
                raise RunError(f'{flag} {wanted}: the Ray cluster has {have.get(name, 0):g} {name}(s) in all'
                               + ('; pass --gpus-per-run 0 to run on CPUs' if name == 'GPU' else ''))
        task = ray.remote(train_task).options(num_gpus=self.settings.gpus_per_run,
                                              num_cpus=self.settings.cpus_per_run,
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
