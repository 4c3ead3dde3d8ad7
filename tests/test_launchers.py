"""Launchers: Slurm through submitit (its local executor runs the real jobs here, a recording executor stands in for
sbatch) and Ray give the same runs as the local launcher; requeue, reattach, the shared-filesystem lock, fetch."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from capaboost_vision.vtab import cli, slurm
from test_reproducibility import _numbers as numbers
from test_vtab import TINY, make_task

SLURM_HERE = ['--launcher', 'slurm', '--slurm-executor', 'local', '--gpus-per-run', '0']
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('launch_data')
    for task in ('toy', 'toy2'):
        make_task(root, task, n_test=20, counts=(60, 20))
    return root


def sweep_args(data, output, *extra):
    """One task, two methods: two runs, one array (each job is a fresh interpreter, some 4 s here)."""
    return ['sweep', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora', '--data-path', str(data),
            '--output', str(output), '--epochs', '2', *TINY, *map(str, extra)]


@pytest.fixture(scope='module')
def local_sweep(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('local_sweep')
    assert cli.main(sweep_args(data, out)) == 0
    return out


def assert_same_runs(a: Path, b: Path, expected: int) -> None:
    runs = sorted(p.parent.relative_to(a) for p in a.rglob('results.json'))
    assert len(runs) == expected and runs == sorted(p.parent.relative_to(b) for p in b.rglob('results.json'))
    for run in runs:
        (ma, ra, ta), (mb, rb, tb) = numbers(a / run), numbers(b / run)
        assert ma == mb and ra == rb, run
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), run


def test_slurm_sweep_on_submitit_local_executor_equals_local(data, local_sweep, tmp_path, capsys):
    out = tmp_path / 'slurm'
    assert cli.main(sweep_args(data, out, *SLURM_HERE, '--timeout-min', 5)) == 0
    assert capsys.readouterr().out.count('as one array') == 1  # one wave: one array
    assert_same_runs(local_sweep, out, 2)
    record = json.loads((out / 'vit_tiny/toy/final/lora/seed0/launch.json').read_text())
    assert record['launcher'] == 'slurm' and record['timeout_min'] == 5 and Path(record['stdout']).is_file()
    assert cli.main(sweep_args(data, out, *SLURM_HERE, '--timeout-min', 5)) == 0  # all finished: nothing submitted
    assert 'submitted' not in capsys.readouterr().out


def test_a_job_told_its_time_limit_is_near_is_requeued_and_resumes_to_the_same_numbers(data, tmp_path):
    """The time-limit signal (USR2: what submitit's local executor and Slurm send --signal-delay-s before the limit)
    reaching a job mid-training: it checkpoints, submitit requeues it, and the run resumes to the numbers of a run
    never stopped. The signal is sent once the first epoch is checkpointed, so it lands mid-training on a fast
    machine as on a slow one (a clock-timed limit raced the training under load)."""
    args = ['sweep', '--tasks', 'toy', '--methods', 'lora', '--data-path', str(data), '--epochs', '30', *TINY]
    assert cli.main([*args, '--output', str(tmp_path / 'local')]) == 0
    out = tmp_path / 'slurm'
    driver = subprocess.Popen([sys.executable, '-m', 'capaboost_vision.vtab.cli', *args, '--output', str(out),
                               *SLURM_HERE, '--timeout-min', '5'], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        run = out / 'vit_tiny/toy/final/lora/seed0'
        deadline = time.time() + 120
        while not (run / 'checkpoint.pt').is_file() and time.time() < deadline:
            time.sleep(0.05)
        controller = int(json.loads((run / 'launch.json').read_text())['job_id'])
        task = int(Path(f'/proc/{controller}/task/{controller}/children').read_text().split()[0])
        os.kill(task, signal.SIGUSR2)  # submitit's own "time limit near" signal
        output, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-3000:]
    log = ''.join(p.read_text() for p in (out / 'submitit').rglob('*_log.*'))
    assert 'this job is timed-out' in log and 'Requeued job' in log and 'resumed ' in log, log[-3000:]
    assert_same_runs(tmp_path / 'local', out, 1)


def test_search_through_slurm_gives_the_local_search_record(data, tmp_path):
    args = ['search', '--tasks', 'toy', '--methods', 'lora', '--lrs', '1e-3', '1e-2', '--max-extensions', '1',
            '--seeds', '0', '--data-path', str(data), '--epochs', '2', *TINY]
    assert cli.main([*args, '--output', str(tmp_path / 'local')]) == 0
    assert cli.main([*args, '--output', str(tmp_path / 'slurm'), *SLURM_HERE, '--timeout-min', '5']) == 0
    record = 'vit_tiny/toy/search/lora.json'
    assert json.loads((tmp_path / 'local' / record).read_text()) == json.loads((tmp_path / 'slurm' / record).read_text())
    assert_same_runs(tmp_path / 'local', tmp_path / 'slurm', 4)  # 2 or 3 val runs and the final run


def kill_local_job(pid: int) -> None:
    """SIGKILL a job of submitit's local executor: its controller and the task processes it started."""
    children = Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    for process in [pid, *map(int, children)]:
        os.kill(process, signal.SIGKILL)


def test_rerun_after_killing_the_driver_reattaches_and_resubmits_only_the_lost_run(data, tmp_path, capsys):
    out = tmp_path / 'slurm'
    args = ['sweep', '--tasks', 'toy', '--methods', 'lora', 'capaboost_lora', '--data-path', str(data), '--output',
            str(out), '--epochs', '8', *TINY, *SLURM_HERE, '--timeout-min', '5']
    driver = subprocess.Popen([sys.executable, '-m', 'capaboost_vision.vtab.cli', *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its jobs outlive it
    deadline = time.time() + 120
    while len(list(out.rglob('launch.json'))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert len(list(out.rglob('launch.json'))) == 2 and not list(out.rglob('results.json'))
    lost = json.loads((out / 'vit_tiny/toy/final/lora/seed0/launch.json').read_text())['job_id']
    kill_local_job(int(lost))  # this job dies with the driver; the other one keeps running
    jobs_before = {p.name for p in (out / 'submitit').iterdir() if p.name.isdigit()}
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count('attach:') == 1 and 'submitted 1 job(s)' in printed and 'capaboost_lora' in \
        printed.split('attach:')[1].splitlines()[0]
    jobs_after = {p.name for p in (out / 'submitit').iterdir() if p.name.isdigit()}
    assert jobs_before < jobs_after and len(jobs_after - jobs_before) == 1  # one new job: the lost run's
    assert len(list(out.rglob('results.json'))) == 2
    assert cli.main(args) == 0
    printed = capsys.readouterr().out  # all finished: nothing attached or submitted
    assert printed.count('skip:') == 2 and 'attach:' not in printed and 'submitted' not in printed


def test_gpus_per_run_2_is_one_ddp_job_of_two_tasks_equal_to_torchrun(data, tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    train = ['--task', 'toy', '--method', 'capaboost_lora', '--data-path', str(data), '--epochs', '1', *TINY]
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                          '29541', '-m', 'capaboost_vision.cli', 'train', *train,
                          '--output', str(tmp_path / 'torchrun')], check=True, capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    sums = [line.split()[-1] for line in out.stdout.splitlines() if 'trainable checksum' in line]
    assert len(sums) == 2 and sums[0] == sums[1]  # the two ranks hold the same trained weights
    sweep = ['sweep', '--tasks', 'toy', '--methods', 'capaboost_lora', '--data-path', str(data), '--epochs', '1',
             *TINY, '--output', str(tmp_path / 'slurm'), '--launcher', 'slurm', '--slurm-executor', 'local',
             '--gpus-per-run', '2', '--timeout-min', '5']
    assert cli.main(sweep) == 0
    assert_same_runs(tmp_path / 'torchrun', tmp_path / 'slurm', 1)
    assert json.loads(next((tmp_path / 'slurm').rglob('results.json')).read_text())['world_size'] == 2


class RecordingExecutor:
    """Stands in for submitit's SlurmExecutor: records parameters and arrays, and runs each job here at once."""
    arrays, parameters = [], {}

    def __init__(self, folder, max_num_timeout):
        self.folder, RecordingExecutor.max_num_timeout = folder, max_num_timeout

    def update_parameters(self, **params):
        RecordingExecutor.parameters = params

    def map_array(self, fn, paths):
        assert isinstance(fn, slurm.TrainJob)
        RecordingExecutor.arrays.append(list(paths))
        jobs = []
        for i, path in enumerate(paths):
            cli.main(slurm.train_command(Path(path)))
            stem = Path(self.folder.replace('%j', f'77_{i}')) / f'77_{i}_0_log'
            jobs.append(SimpleNamespace(job_id=f'77_{i}', done=lambda: True,
                                        paths=SimpleNamespace(stdout=f'{stem}.out', stderr=f'{stem}.err')))
        return jobs


def test_recording_executor_one_array_per_wave_finished_runs_skipped_resources_mapped(data, tmp_path, monkeypatch):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'sbatch').write_text('#!/bin/sh\nexit 1\n')
    (bin_dir / 'sbatch').chmod(0o755)
    monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
    monkeypatch.setattr(slurm, 'make_executor', lambda settings, job_folder: RecordingExecutor(
        str(job_folder), settings.max_requeues))
    monkeypatch.setattr(slurm, 'slurm_state', lambda job_id: 'COMPLETED')  # what Slurm would say of its jobs
    RecordingExecutor.arrays = []
    out = tmp_path / 'runs'
    resources = ['--launcher', 'slurm', '--partition', 'gpu', '--timeout-min', '90.5', '--gpus-per-run', '2',
                 '--cpus-per-run', '6', '--mem-gb', '40', '--slurm-setup', 'module load cuda', 'source venv/bin/activate',
                 '--slurm-extra', 'account=abc', 'qos=high', '--array-parallelism', '16', '--max-requeues', '5']
    assert cli.main(['train', '--task', 'toy', '--method', 'lora', '--data-path', str(data), '--output', str(out),
                     '--epochs', '1', '--resume', *TINY]) == 0  # one run finished before the sweep
    assert cli.main(['sweep', '--tasks', 'toy', 'toy2', '--methods', 'lora', '--data-path', str(data), '--output',
                     str(out), '--epochs', '1', *TINY, *resources]) == 0
    assert RecordingExecutor.arrays == [[str(out / 'vit_tiny/toy2/final/lora/seed0/config.yaml')]]
    assert RecordingExecutor.max_num_timeout == 5
    assert RecordingExecutor.parameters == dict(
        job_name='capaboost-runs', time=91, nodes=1, ntasks_per_node=2, cpus_per_task=6, mem='40960MB',
        signal_delay_s=120, array_parallelism=16, setup=['module load cuda', 'source venv/bin/activate'],
        additional_parameters={'account': 'abc', 'qos': 'high'}, gpus_per_node=2, partition='gpu')
    record = json.loads((out / 'vit_tiny/toy2/final/lora/seed0/launch.json').read_text())
    assert record['job_id'] == '77_0' and record['partition'] == 'gpu' and record['slurm_extra'] == ['account=abc',
                                                                                                       'qos=high']
    RecordingExecutor.arrays = []  # a search: the grid, one extension round at most, then the finals
    assert cli.main(['search', '--tasks', 'toy', '--methods', 'lora', '--lrs', '1e-3', '1e-2', '--max-extensions', '1',
                     '--seeds', '0', '1', '--data-path', str(data), '--output', str(tmp_path / 'search'), '--epochs',
                     '1', *TINY,
                     *resources]) == 0
    sizes = [len(a) for a in RecordingExecutor.arrays]
    assert sizes[0] == 2 and sizes[-1] == 2 and len(sizes) in (2, 3) and all(s == 1 for s in sizes[1:-1])


def test_slurm_without_sbatch_is_one_error_line_and_writes_nothing(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('PATH', os.path.dirname(sys.executable))  # no sbatch there
    out = tmp_path / 'runs'
    for extra, says in ((['--launcher', 'slurm'], 'sbatch is not on PATH'),
                        (['--launcher', 'slurm', '--timeout-min', '1'], '--signal-delay-s 120 must be below'),
                        (['--launcher', 'slurm', '--slurm-extra', 'account'], "--slurm-extra 'account'"),
                        (['--launcher', 'ray', '--gpus', '0,1'], '--gpus and --runs-per-gpu are for --launcher local'),
                        (['--runs-per-gpu', '0'], '--runs-per-gpu: runs_per_gpu=0 is invalid')):
        code = cli.main(sweep_args(data, out) + extra)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], lines
        assert not out.exists()


def test_a_slurm_job_trains_on_its_own_cpus_only(monkeypatch):
    """Without cgroups a job sees every core of the node: torch is held to --cpus-per-run (SLURM_CPUS_PER_TASK),
    unless the user exported OMP_NUM_THREADS."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv('SLURM_CPUS_PER_TASK', '1')
        monkeypatch.setenv('OMP_NUM_THREADS', str(before))
        slurm.limit_threads()
        assert torch.get_num_threads() == before
        monkeypatch.delenv('OMP_NUM_THREADS')
        slurm.limit_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_ray_sweep_equals_local(data, local_sweep, tmp_path):
    ray = pytest.importorskip('ray')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:  # one task at a time with both cores: the threads the local runs had
        assert cli.main(sweep_args(data, tmp_path / 'ray', '--launcher', 'ray', '--gpus-per-run', 0,
                                   '--cpus-per-run', 2)) == 0
        assert cli.main(sweep_args(data, tmp_path / 'ray2', '--launcher', 'ray', '--gpus-per-run', 1)) == 2
    finally:
        ray.shutdown()
    assert_same_runs(local_sweep, tmp_path / 'ray', 2)


def test_lock_falls_back_to_an_owner_file_where_flock_is_unsupported(tmp_path, monkeypatch):
    from capaboost_vision import _io
    from capaboost_vision.vtab.run_config import RunError
    from capaboost_vision.vtab.run_folder import folder_lock

    def no_flock(handle, how):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(_io.fcntl, 'flock', no_flock)
    run_dir = tmp_path / 'task' / 'seed0'
    with folder_lock(run_dir, main=True):
        held = tmp_path / 'task' / '.seed0.lock.held'
        assert held.read_text() == f'{os.uname().nodename} {os.getpid()}'
        with pytest.raises(RunError, match='is being written by another run .*does not support flock'):
            with folder_lock(run_dir, main=True):
                pass
    assert not held.exists()
    dead = subprocess.Popen(['true'])
    dead.wait()
    held.write_text(f'{os.uname().nodename} {dead.pid}')  # left by a process that died: taken over
    with _io.exclusive_lock(tmp_path / 'task' / '.seed0.lock', wait=False):
        assert held.read_text().endswith(f' {os.getpid()}')
    from capaboost_vision.vtab.launch import driver_lock
    with driver_lock(tmp_path):  # a second driver submitting into the same --output is refused
        with pytest.raises(RunError, match=f'another sweep or search is submitting runs into {tmp_path}'):
            with driver_lock(tmp_path):
                pass
    held.write_text('another-host 1')  # another host's: never taken over
    with pytest.raises(_io.LockHeld, match='another-host 1'):
        with _io.exclusive_lock(tmp_path / 'task' / '.seed0.lock', wait=False):
            pass


def test_fetch_fills_the_cache_that_offline_jobs_read(hub, tmp_path):
    server, env = hub
    model = 'vit_tiny_patch16_224.augreg_in21k'
    run = subprocess.run([sys.executable, '-m', 'capaboost_vision.vtab.cli', 'fetch', '--model', model],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f'{model}: {model} -> {tmp_path / "hf"}' in run.stdout
    offline = dict(env, HF_HUB_OFFLINE='1', HF_ENDPOINT='http://127.0.0.1:9')  # nothing reachable any more
    check = subprocess.run([sys.executable, '-c', f'import timm; timm.create_model("{model}", pretrained=True, num_classes=0)'],
                           capture_output=True, text=True, env=offline, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]


def test_a_missing_extra_is_one_line_naming_what_to_install(data, tmp_path, monkeypatch, capsys):
    from capaboost_vision.extras import EXTRAS
    out = tmp_path / 'runs'
    for package, argv in (('submitit', sweep_args(data, out) + ['--launcher', 'slurm']),
                          ('ray', sweep_args(data, out) + ['--launcher', 'ray']),
                          ('datasets', ['check', '--tasks', 'hfds/org/images', '--data-path', str(tmp_path)])):
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed
        code = cli.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith('error: ') and lines[0].endswith(
            f'needs the {package} package: pip install "capaboost-vision[{EXTRAS[package]}]"'), lines
        assert not out.exists()


# ---- a real one-node Slurm (tests/conftest.py's real_slurm: no accounting, so no sacct) ----

def _slurm_sweep(data, output, env, *extra):
    return [sys.executable, '-m', 'capaboost_vision.cli', *sweep_args(data, output, '--launcher', 'slurm',
                                                                       '--gpus-per-run', 0, '--cpus-per-run', 1,
                                                                       '--mem-gb', 1, '--poll-s', 0.5, *extra)]


def _wait_for(condition, seconds=120, what=''):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.2)


def test_real_slurm_preemption_and_time_limit_requeues_are_waited_for_and_the_runs_equal_local(real_slurm, data,
                                                                                                  tmp_path):
    """On a real Slurm, two jobs stopped mid-training: one by `scontrol requeue` (what preemption with
    PreemptMode=REQUEUE does), one by the USR2 that Slurm sends before the time limit (`scancel --signal=USR2`,
    the signal slurmctld delivers at `--signal-delay-s`; with a 1-minute limit submitit counts it as a time-out).
    Neither is a failure: the driver keeps waiting, both jobs resume from their checkpoints, and the runs equal the
    local launcher's bit for bit."""
    env, out = real_slurm, tmp_path / 'slurm'
    # about 0.1 s each: seconds to stop both jobs in after the later one's first epoch (their starts differ too)
    epochs = ['--epochs', 60]
    assert cli.main(sweep_args(data, tmp_path / 'local', *epochs)) == 0
    argv = _slurm_sweep(data, out, env, *epochs, '--timeout-min', 1, '--signal-delay-s', 5)
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stops = {'lora': ['scontrol', 'requeue'], 'capaboost_lora': ['scancel', '--signal=USR2']}
    runs = {m: out / f'vit_tiny/toy/final/{m}/seed0' for m in stops}
    try:
        _wait_for(lambda: all((r / 'checkpoint.pt').is_file() for r in runs.values()), what='the first epochs')
        jobs = {m: json.loads((r / 'launch.json').read_text())['job_id'] for m, r in runs.items()}
        for method, stop in stops.items():
            subprocess.run([*stop, jobs[method]], env=env, check=True)
        states = lambda: subprocess.run(['squeue', '-h', '-j', ','.join(jobs.values()), '-o', '%T'], env=env,  # noqa
                                        capture_output=True, text=True).stdout.split()
        _wait_for(lambda: states() == ['PENDING', 'PENDING'], what='both jobs to be queued again')
        # Slurm holds a requeued job back for a while (its begin time); release them now to keep the test short
        for job in jobs.values():
            subprocess.run(['scontrol', 'update', f'JobId={job}', 'StartTime=now'], env=env, check=True)
        output, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0 and 'failed' not in output, output[-3000:]
    logs = {m: ''.join(p.read_text() for p in (out / 'submitit').rglob(f'{job}_*_log.*')) for m, job in jobs.items()}
    assert 'DUE TO JOB REQUEUE' in logs['lora'] and 'this job is timed-out' in logs['capaboost_lora'], logs
    assert all('resumed ' in log for log in logs.values()), logs
    assert_same_runs(tmp_path / 'local', out, 2)


def test_real_slurm_rerun_reattaches_to_live_jobs_and_resubmits_a_cancelled_one_without_accounting(real_slurm, data, tmp_path):
    """No slurmdbd, so no sacct: a rerun after the driver was killed reattaches to the job still queued (asked of
    squeue/scontrol) instead of submitting it again, and submits again only the job that was scancel-ed."""
    env, out = real_slurm, tmp_path / 'slurm'
    first = subprocess.Popen(_slurm_sweep(data, out, env, '--slurm-extra', 'begin=now+600'), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # held back: still queued
    records = [out / f'vit_tiny/toy/final/{m}/seed0/launch.json' for m in ('lora', 'capaboost_lora')]
    try:
        _wait_for(lambda: all(r.is_file() for r in records), what='the submission')
    finally:
        first.kill()
        first.wait()
    lost, kept = [json.loads(r.read_text())['job_id'] for r in records]
    subprocess.run(['scancel', lost], env=env, check=True)  # this one is gone: the rerun submits it again
    second = subprocess.Popen(_slurm_sweep(data, out, env), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        _wait_for(lambda: json.loads(records[0].read_text())['job_id'] != lost, what='the resubmission')
        subprocess.run(['scontrol', 'update', f'JobId={kept}', 'StartTime=now'], env=env, check=True)
        output, _ = second.communicate(timeout=300)
    finally:
        second.kill()
    assert second.returncode == 0, output[-3000:]
    assert output.count('attach: ') == 1 and f'is job {kept}' in output and 'submitted 1 job(s)' in output, output
    assert len(list(out.rglob('results.json'))) == 2
    assert subprocess.run(['squeue', '-h'], env=env, capture_output=True, text=True).stdout.strip() == ''


def test_real_slurm_refusals_are_one_line_and_leave_nothing(real_slurm, data, tmp_path):
    """sbatch's refusals name the flag and Slurm's reason, with nothing submitted and no planned config left; a job
    Slurm accepts but could never start (more CPUs than any node) is cancelled and told, never waited for."""
    env, out = real_slurm, tmp_path / 'runs'
    for extra, says in ((['--partition', 'nosuch'], 'check --partition'),
                        (['--mem-gb', 100000], 'check --mem-gb')):
        proc = subprocess.run(_slurm_sweep(data, out, env, *extra), env=env, capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], lines
        assert not list(out.rglob('config.yaml')) and not list(out.rglob('launch.json'))
    for extra in (['--cpus-per-run', 64], ['--nodes', 2]):  # --nodes reaches sbatch: this cluster has one node
        proc = subprocess.run(_slurm_sweep(data, out, env, *extra), env=env, capture_output=True, text=True,
                              timeout=120)
        said = proc.stdout + proc.stderr
        assert proc.returncode == 1 and 'could never start' in said and 'PartitionConfig' in said, said
    assert subprocess.run(['squeue', '-h'], env=env, capture_output=True, text=True).stdout.strip() == ''


def test_ray_unreachable_cluster_is_one_line_in_bounded_time_and_defaults_fit_the_cluster(data, tmp_path,
                                                                                          monkeypatch, capsys):
    ray = pytest.importorskip('ray')
    monkeypatch.setenv('RAY_ADDRESS', '127.0.0.1:9')  # nothing listens there
    tic = time.time()
    code = cli.main(sweep_args(data, tmp_path / 'r', '--launcher', 'ray', '--ray-connect-timeout-s', 2))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'RAY_ADDRESS=127.0.0.1:9' in lines[0] and time.time() - tic < 30, lines
    assert not (tmp_path / 'r').exists()  # refused before anything was planned
    monkeypatch.delenv('RAY_ADDRESS')
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:  # no resource flags on a CPU-only Ray of 2 cores: the defaults (1 GPU, 8 CPUs) are cut to fit, and said
        from capaboost_vision.vtab.ray_runs import RayLauncher
        from capaboost_vision.vtab.cli import _launch_settings, make_parser
        launcher = RayLauncher(_launch_settings(make_parser().parse_args(sweep_args(data, tmp_path / 'r',
                                                                                    '--launcher', 'ray'))),
                               tmp_path / 'r')
        out = capsys.readouterr().out
        assert (launcher.gpus, launcher.cpus) == (0, 2)
        assert 'ray: --gpus-per-run 0 (the default 1' in out and 'ray: --cpus-per-run 2 (the default 8' in out
        code = cli.main(sweep_args(data, tmp_path / 'r', '--launcher', 'ray', '--cpus-per-run', 4))  # asked: refused
        assert code == 2 and '--cpus-per-run 4: the Ray cluster has 2 CPUs' in capsys.readouterr().err
    finally:
        ray.shutdown()
