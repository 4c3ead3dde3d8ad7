"""Where and with what resources ``sweep`` and ``search`` run their runs: the launcher settings, defined once (flags,
their help and the ``launch.json`` a launcher writes into each run folder derive from these fields).

They are not part of a run's identity: the same run gives the same results.json on any launcher, so a study can
move between a workstation and a cluster and keep its finished runs. Torch-free (parsed before torch loads).
"""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple

from ..config import SettingError, check_setting, setting
from .run_config import RunError

LAUNCHERS = ('local', 'slurm', 'ray')


def launch_setting(default: Any, help: str, applies: Tuple[str, ...], **meta: Any) -> Any:
    """A launcher setting: ``applies`` names the launchers it is for, shown first in its help and deciding what
    ``LaunchSettings.recorded`` writes into a run folder."""
    return setting(default, f'{", ".join(applies)}: {help}', applies=applies, **meta)


@dataclass
class LaunchSettings:
    launcher: str = setting('local', 'where the runs execute: local (this machine: one after another, or --gpus '
                                     'with --runs-per-gpu), slurm (one Slurm job per run through submitit, one job '
                                     'array per wave), ray (one Ray task per run)', choices=LAUNCHERS)
    gpus: str = launch_setting('', 'comma-separated GPU ids to spread the runs over', ('local',))
    runs_per_gpu: int = launch_setting(1, 'runs at once on each GPU (small models do not fill a large GPU)',
                                       ('local',), range='[1, 64]')
    slurm_executor: str = launch_setting('slurm', 'submitit executor; "local" runs the same jobs (requeue included) '
                                                  'as processes on this machine, to try a study before the cluster',
                                         ('slurm',), choices=('slurm', 'local'))
    partition: str = launch_setting('', 'partition (default: the cluster\'s)', ('slurm',))
    timeout_min: float = launch_setting(120.0, 'time limit of one job in minutes; a run that reaches it is requeued '
                                               'and resumes from its last checkpoint', ('slurm',), range='(0, 100000]')
    gpus_per_run: int = launch_setting(1, 'GPUs per run; slurm runs N > 1 as N tasks with torch DDP',
                                       ('slurm', 'ray'), range='[0, 64]')
    cpus_per_run: int = launch_setting(8, 'CPU cores per run (per task under DDP)', ('slurm', 'ray'),
                                       range='[1, 1024]')
    nodes: int = launch_setting(1, 'nodes per run: one DDP run of --nodes x --gpus-per-run tasks (one task per GPU '
                                   'on each node)', ('slurm',), range='[1, 1024]')
    mem_gb: float = launch_setting(32.0, 'memory per run in GB (per node)', ('slurm',), range='(0, 100000]')
    slurm_setup: Tuple[str, ...] = launch_setting((), 'shell lines run before each job, e.g. "module load cuda" '
                                                      '"source ~/venv/bin/activate"', ('slurm',), nargs='+')
    slurm_extra: Tuple[str, ...] = launch_setting((), 'further sbatch options as KEY=VALUE, e.g. account=abc '
                                                      'qos=high constraint=a100', ('slurm',), nargs='+')
    array_parallelism: int = launch_setting(64, 'jobs of one array running at once', ('slurm',), range='[1, 100000]')
    signal_delay_s: int = launch_setting(120, 'seconds before the time limit at which a job is told to requeue',
                                         ('slurm',), range='[1, 3600]')
    poll_s: float = launch_setting(30.0, 'seconds between two looks of the driver at its jobs\' states',
                                   ('slurm',), range='[0.1, 3600]')
    ray_connect_timeout_s: float = launch_setting(10.0, 'seconds to reach the Ray cluster RAY_ADDRESS names before '
                                                        'giving up with one line', ('ray',), range='[0.1, 3600]')
    max_requeues: int = launch_setting(3, 'times a run is started again: slurm after reaching the time limit '
                                          '(preemptions do not count), ray after its worker or node died',
                                       ('slurm', 'ray'), range='[0, 100]')

    def check(self) -> 'LaunchSettings':
        """RunError naming the flag of the first setting out of range or not for this launcher."""
        for f in fields(self):
            try:
                check_setting(f, getattr(self, f.name))
            except SettingError as e:
                raise RunError(f'--{f.name.replace("_", "-")}: {e}') from None
        if self.launcher != 'local' and (self.gpus or self.runs_per_gpu != 1):
            raise RunError(f'--gpus and --runs-per-gpu are for --launcher local; with --launcher {self.launcher} '
                           f'each run gets --gpus-per-run GPUs')
        if self.launcher == 'slurm' and self.signal_delay_s >= self.timeout_min * 60:
            raise RunError(f'--signal-delay-s {self.signal_delay_s} must be below --timeout-min {self.timeout_min:g} '
                           f'in seconds ({self.timeout_min * 60:g}): the job is told to requeue that long before '
                           f'its time limit')
        self.extra_options()  # KEY=VALUE check
        return self

    def extra_options(self) -> Dict[str, str]:
        """--slurm-extra as sbatch options {key: value}."""
        out = {}
        for item in self.slurm_extra:
            key, sep, value = item.partition('=')
            if not sep or not key or not value:
                raise RunError(f'--slurm-extra {item!r}: expected KEY=VALUE, e.g. account=abc')
            out[key.strip().lstrip('-').replace('-', '_')] = value
        return out

    def recorded(self) -> Dict[str, Any]:
        """What a launcher records in a run folder's launch.json: the settings that apply to it."""
        mine = [f.name for f in fields(self) if self.launcher in f.metadata.get('applies', ())]
        values = asdict(self)
        return {'launcher': self.launcher, **{k: list(values[k]) if isinstance(values[k], tuple) else values[k]
                                              for k in mine}}


LAUNCH_FIELDS = {f.name: f for f in fields(LaunchSettings)}
