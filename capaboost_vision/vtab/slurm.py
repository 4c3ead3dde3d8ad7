"""``--launcher slurm``: one Slurm job per run through submitit (the engine DeiT, ConvNeXt, MAE and DINOv2 launch
with), one job array per wave of runs.

The job is ``TrainJob``, a Python callable that runs ``train --config <run folder>/config.yaml`` in the job's
process. It is a ``submitit.helpers.Checkpointable``: when the job nears its time limit submitit calls its
``checkpoint()`` (the same call again) and requeues it, and the run resumes from its last atomic ``checkpoint.pt``
(every planned run resumes). A preempted job is requeued by Slurm (PreemptMode=REQUEUE) or, where the cluster
cancels it, resubmitted by the next run of the same command.

The driver records each submitted job in its run folder's ``launch.json`` (job id, log files, resources), so the
same command run again reattaches to jobs still queued or running instead of submitting them twice, skips finished
runs (they never reach a launcher) and resubmits the rest. Whether a run finished is read from its run folder
(results.json), never from the scheduler's state.
"""
import json
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import submitit

from .._io import write_text_atomic
from .launch import Launcher, cli_main, driver_lock, train_command
from .launch_settings import LaunchSettings
from .run_config import RunError

LAUNCH_RECORD = 'launch.json'
ACTIVE_STATES = {'PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING', 'COMPLETING', 'SUSPENDED', 'RESIZING',
                 'REQUEUE_HOLD', 'REQUEUE_FED', 'SIGNALING', 'STAGE_OUT'}
"""Slurm job states in which a job will still run (or is running): such a job is reattached, not resubmitted."""
POLL_S = {'slurm': 30.0, 'local': 0.5}


class TrainJob(submitit.helpers.Checkpointable):
    """One planned run as a submitit job. Under ``--gpus-per-run N > 1`` the job has N tasks and each exports
    submitit's torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) before training, so
    the run is the DDP run torchrun would start (no torchrun nested inside the job)."""

    def __call__(self, config_file: str) -> int:
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = cli_main()(train_command(Path(config_file)))
        if code:
            raise RunError(f'capaboost-vtab train --config {config_file} exited with code {code} (its error is above)')
        return code


def check_available(settings: LaunchSettings) -> None:
    """RunError when this machine cannot submit Slurm jobs (never a silent local fallback)."""
    if settings.slurm_executor == 'slurm' and shutil.which('sbatch') is None:
        raise RunError('--launcher slurm: sbatch is not on PATH here; run the command on a Slurm login node (or try '
                       'the jobs on this machine with --slurm-executor local)')


def make_executor(settings: LaunchSettings, job_folder: Path) -> Any:
    """The submitit executor writing each job's files and logs into ``job_folder`` (a path holding ``%j``)."""
    executor_class = submitit.SlurmExecutor if settings.slurm_executor == 'slurm' else submitit.LocalExecutor
    return executor_class(folder=str(job_folder), max_num_timeout=settings.max_requeues)


def job_parameters(settings: LaunchSettings, name: str) -> Dict[str, Any]:
    """The executor's parameters for one run's job: one task per GPU (DDP), one task on CPUs."""
    tasks = max(1, settings.gpus_per_run)
    if settings.slurm_executor == 'local':
        return dict(timeout_min=settings.timeout_min, gpus_per_node=settings.gpus_per_run, tasks_per_node=tasks,
                    signal_delay_s=settings.signal_delay_s, setup=list(settings.slurm_setup))
    params = dict(job_name=name, time=max(1, math.ceil(settings.timeout_min)), nodes=1, ntasks_per_node=tasks,
                  cpus_per_task=settings.cpus_per_run, mem=f'{math.ceil(settings.mem_gb * 1024)}MB',
                  signal_delay_s=settings.signal_delay_s, array_parallelism=settings.array_parallelism,
                  setup=list(settings.slurm_setup), additional_parameters=settings.extra_options())
    if settings.gpus_per_run:
        params['gpus_per_node'] = settings.gpus_per_run
    if settings.partition:
        params['partition'] = settings.partition
    return params


def read_record(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads((run_dir / LAUNCH_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get('launcher') == 'slurm' else None


class _ReattachedLocalJob:
    """A job of submitit's local executor submitted by an earlier driver: its controller's pid is its id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def done(self) -> bool:
        try:
            cmdline = Path(f'/proc/{self.job_id}/cmdline').read_bytes()
        except OSError:
            return True
        return b'submitit' not in cmdline  # the pid was reused by another program


def attach(record: Dict[str, Any]) -> Optional[Any]:
    """The job ``record`` names when it is still queued or running, else None."""
    if record.get('slurm_executor') == 'local':
        job = _ReattachedLocalJob(str(record['job_id']))
        return None if job.done() else job
    job = submitit.SlurmJob(folder=record['folder'], job_id=str(record['job_id']))
    return job if job.state in ACTIVE_STATES else None


class SlurmLauncher(Launcher):
    def __init__(self, settings: LaunchSettings, output: Path) -> None:
        check_available(settings)
        self.settings, self.output = settings, Path(output)
        self.job_folder = self.output / 'submitit' / '%j'

    def run(self, config_files: List[Path]) -> List[str]:
        if not config_files:
            return []
        with driver_lock(self.output):
            attached, todo = [], []
            for path in config_files:
                record = read_record(path.parent)
                job = attach(record) if record else None
                if job is not None:
                    print(f'attach: {path.parent} is job {record["job_id"]} ({record.get("stdout", "")})')
                    attached.append((path, job, record))
                else:
                    todo.append(path)
            submitted = self.submit(todo)
            return self.wait(attached + submitted)

    def submit(self, config_files: List[Path]) -> List[Tuple[Path, Any, Dict[str, Any]]]:
        """One job array for ``config_files``; each job recorded in its run folder's launch.json."""
        if not config_files:
            return []
        executor = make_executor(self.settings, self.job_folder)
        executor.update_parameters(**job_parameters(self.settings, f'capaboost-{self.output.name}'))
        jobs = executor.map_array(TrainJob(), [str(p) for p in config_files])
        out = []
        for path, job in zip(config_files, jobs):
            record = dict(self.settings.recorded(), job_id=str(job.job_id), folder=str(self.job_folder),
                          stdout=str(job.paths.stdout), stderr=str(job.paths.stderr),
                          submitted=datetime.now(timezone.utc).isoformat(timespec='seconds'))
            write_text_atomic(path.parent / LAUNCH_RECORD, json.dumps(record, indent=1))
            out.append((path, job, record))
        print(f'submitted {len(jobs)} job(s) as one array, e.g. job {jobs[0].job_id}: logs {jobs[0].paths.stdout}')
        return out

    def wait(self, jobs: List[Tuple[Path, Any, Dict[str, Any]]]) -> List[str]:
        """Wait for every job; a run failed when its folder holds no results.json once its job is done."""
        failures, pending = [], list(jobs)
        while pending:
            still = []
            for path, job, record in pending:
                if not job.done():
                    still.append((path, job, record))
                elif (path.parent / 'results.json').is_file():
                    print(f'done: {path.parent}', flush=True)
                else:
                    failures.append(f'{path.parent}: job {record["job_id"]} ended without results; its log: '
                                    f'{record["stderr"]}')
                    print(f'failed: {failures[-1]}', flush=True)
            pending = still
            if pending:
                time.sleep(POLL_S[self.settings.slurm_executor])
        return failures

