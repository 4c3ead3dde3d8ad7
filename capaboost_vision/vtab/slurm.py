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
(results.json); whether its job may still run is asked of Slurm itself (``squeue``, then ``scontrol``, then
``sacct``: clusters without accounting have no ``sacct``), so a requeued or preempted job is waited for, not counted
as failed. Only a job Slurm reports ended, whose folder holds no results, is a failure.
"""
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import submitit

from .._io import write_text_atomic
from .launch import Launcher, cli_main, driver_lock, train_command
from .launch_settings import LaunchSettings
from .run_config import RunError

LAUNCH_RECORD = 'launch.json'
ACTIVE_STATES = {'PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING', 'COMPLETING', 'SUSPENDED', 'RESIZING',
                 'REQUEUE_HOLD', 'REQUEUE_FED', 'SIGNALING', 'STAGE_OUT', 'UNREACHABLE'}
"""Slurm job states in which a job will still run (or is running): such a job is reattached, not resubmitted."""
LOCAL_POLL_S = 0.5  # submitit's local executor: jobs are processes of this machine
STOPPED_CODES = (130, 143)  # train's exit codes after SIGINT / SIGTERM: stopped at a step, checkpointed


def slurm_state(job_id: str) -> str:
    """The job's Slurm state, asked in the order that needs no accounting: ``squeue`` (queued, running, requeued),
    ``scontrol show job`` (ended less than MinJobAge ago), then ``sacct``; 'UNKNOWN' when none of them knows it, and
    'UNREACHABLE' (counted as still running: never resubmitted, never failed) while the controller does not answer."""
    queries = ((['squeue', '-h', '-j', job_id, '-o', '%T'], r'^\s*([A-Z_]+)\s*$'),
               (['scontrol', 'show', 'job', job_id], r'JobState=([A-Z_]+)'),
               (['sacct', '-n', '-X', '-P', '-o', 'State', '-j', job_id], r'^\s*([A-Z_]+)'))
    for i, (argv, pattern) in enumerate(queries):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            if i == 0:
                return 'UNREACHABLE'
            continue
        if i == 0 and out.returncode != 0 and 'invalid job id' not in out.stderr.lower():
            return 'UNREACHABLE'  # squeue fails for another reason than not knowing the job: the controller
        found = re.search(pattern, out.stdout, re.M) if out.returncode == 0 else None
        if found:
            return found.group(1)
    return 'UNKNOWN'


def limit_threads() -> None:
    """Torch's CPU threads to the job's ``--cpus-per-run``: where Slurm does not confine a job to its cores
    (``TaskPlugin=task/none``, no cgroups) torch starts one thread per core of the node, and jobs sharing a node then
    slow each other down many times over. An ``OMP_NUM_THREADS`` the user exports wins."""
    cpus = os.environ.get('SLURM_CPUS_PER_TASK')
    if cpus and 'OMP_NUM_THREADS' not in os.environ:
        import torch  # the job's process trains anyway; the driver never imports torch for this
        torch.set_num_threads(int(cpus))


class TrainJob(submitit.helpers.Checkpointable):
    """One planned run as a submitit job. Under ``--gpus-per-run N > 1`` the job has N tasks and each exports
    submitit's torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) before training, so
    the run is the DDP run torchrun would start (no torchrun nested inside the job)."""

    def __call__(self, config_file: str) -> int:
        limit_threads()
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        code = cli_main()(train_command(Path(config_file)))
        if code in STOPPED_CODES:  # scontrol requeue, preemption, scancel: checkpointed; Slurm decides what follows
            print(f'stopped by a signal (exit {code}); a requeued job resumes from its checkpoint, a cancelled one is '
                  f'resubmitted by the next run of the same command', flush=True)
            return code
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
    params = dict(job_name=name, time=max(1, math.ceil(settings.timeout_min)), nodes=settings.nodes,
                  ntasks_per_node=tasks,
                  cpus_per_task=settings.cpus_per_run, mem=f'{math.ceil(settings.mem_gb * 1024)}MB',
                  signal_delay_s=settings.signal_delay_s, array_parallelism=settings.array_parallelism,
                  setup=list(settings.slurm_setup), additional_parameters=settings.extra_options())
    if settings.gpus_per_run:
        params['gpus_per_node'] = settings.gpus_per_run
    if settings.partition:
        params['partition'] = settings.partition
    return params


# sbatch's reasons for refusing a job -> the flags that set what it refused
REFUSALS = (('invalid partition', '--partition'),
            ('memory specification', '--mem-gb'),
            ('gres', '--gpus-per-run'),
            ('gpu', '--gpus-per-run'),
            ('time limit', '--timeout-min'),
            ('node count', '--nodes'),
            ('node configuration is not available', '--gpus-per-run, --cpus-per-run, --mem-gb or --nodes (no node of '
                                                    'the partition has that much)'),
            ('more processors', '--cpus-per-run'),
            ('cpu count', '--cpus-per-run'))


def submission_error(message: str) -> str:
    """One line for a job sbatch refused: the flag that set what it refused, and Slurm's own reason."""
    reasons = re.findall(r'sbatch: error: (.+)', message)
    reason = next((r for r in reasons if 'batch job submission failed' not in r.lower()), None) or \
        (reasons[0] if reasons else message.strip().splitlines()[-1])
    reason = reason.strip().rstrip('.')
    flag = next((flag for key, flag in REFUSALS if key in reason.lower()), '--slurm-extra or the resource flags')
    return f'--launcher slurm: sbatch refused the jobs ({reason}): check {flag}; nothing was submitted'


@contextlib.contextmanager
def sbatch_stderr() -> Iterator[None]:
    """Hold what sbatch (a child process writing to this process's stderr) prints while submitting; pass it on
    only when the submission succeeds (a refusal is told in one line from the error itself)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors='replace'))


def unplan(config_files: List[Path]) -> None:
    """Remove the config.yaml of runs that never started (their folder holds nothing else), so nothing of a refused
    submission is left for a later command to read."""
    for path in config_files:
        folder = path.parent
        if path.is_file() and all(p == path for p in folder.iterdir()):
            path.unlink()
            folder.rmdir()


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
    job_id = str(record['job_id'])
    return submitit.SlurmJob(folder=record['folder'], job_id=job_id) if slurm_state(job_id) in ACTIVE_STATES else None


NEVER_RUNS = ('PartitionConfig', 'PartitionNodeLimit', 'PartitionTimeLimit', 'BadConstraints', 'InvalidQOS',
              'InvalidAccount', 'QOSMaxCpuPerJobLimit', 'QOSMaxGRESPerJob', 'QOSMaxMemoryPerJob')
"""Reasons a pending job will never start (it asks for more than the partition or QOS allows): cancelled, told."""


def never_runs(job_id: str) -> Optional[str]:
    """Slurm's reason when a pending job can never start, else None."""
    try:
        out = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%r'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    reason = out.stdout.strip()
    return reason if out.returncode == 0 and reason in NEVER_RUNS else None


def ended(job: Any, executor: str) -> Optional[str]:
    """None while the job may still run (queued, running, requeued, preempted and pending again), else how it
    ended: Slurm's state (squeue/scontrol/sacct), or 'ended' for a local job."""
    if executor == 'local':
        return 'ended' if job.done() else None
    state = slurm_state(str(job.job_id))
    reason = never_runs(str(job.job_id)) if state == 'PENDING' else None
    if reason:
        subprocess.run(['scancel', str(job.job_id)], capture_output=True, timeout=60)
        return (f'cancelled: pending with reason {reason}, it could never start; check --cpus-per-run, '
                f'--gpus-per-run, --mem-gb, --nodes, --timeout-min and --partition')
    return None if state in ACTIVE_STATES else state


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
        try:
            with sbatch_stderr():  # sbatch's own lines: in the one error line below, or passed on after success
                jobs = executor.map_array(TrainJob(), [str(p) for p in config_files])
        except submitit.core.utils.FailedJobError as e:
            unplan(config_files)
            raise RunError(submission_error(str(e))) from None
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
                state = ended(job, self.settings.slurm_executor)
                if state is None:
                    still.append((path, job, record))
                elif (path.parent / 'results.json').is_file():
                    print(f'done: {path.parent}', flush=True)
                else:
                    failures.append(f'{path.parent}: job {record["job_id"]} ended ({state}) without results; its '
                                    f'log: {record["stderr"]}')
                    print(f'failed: {failures[-1]}', flush=True)
            pending = still
            if pending:
                time.sleep(LOCAL_POLL_S if self.settings.slurm_executor == 'local' else self.settings.poll_s)
        return failures

