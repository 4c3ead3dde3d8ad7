"""Launching runs. A run is its resolved config: ``plan`` writes it as the run folder's ``config.yaml``, and the run
is ``capaboost-vtab train --run <run folder>/config.yaml`` wherever it executes: exactly that file, resolved once at
planning (no method or task YAML is layered under it again). A ``Launcher`` takes the planned
config files of one wave and runs them: ``LocalLauncher`` here (one after another in this process, or
``runs_per_gpu`` at once on each GPU as subprocesses), ``slurm.SlurmLauncher`` as Slurm jobs through submitit,
``ray_runs.RayLauncher`` as Ray tasks (the CLI picks one: ``cli.make_launcher``).
"""
import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable, Dict, Iterator, List, Optional

import yaml

from .._io import LockHeld, exclusive_lock
from .engine import data_fingerprints
from .launch_settings import LaunchSettings
from .run_config import RunConfig, RunError, check_same_run
from .run_folder import finished_results, run_directory, write_config
from .sources import SplitSettings


CLI_ENTRY_POINT = 'capaboost_vision.vtab.cli:main'
"""What a job on another machine runs, named like a console-script entry point: a pickled job holds
this name, never the function object (which is ``__main__.main`` under ``python -m``, and would pickle by value)."""


def cli_main() -> Callable[[List[str]], int]:
    """The CLI's ``main``, imported by its entry-point name (in a job's process)."""
    module, name = CLI_ENTRY_POINT.split(':')
    return getattr(importlib.import_module(module), name)


def train_command(config_file: Path) -> List[str]:
    """The ``capaboost-vtab`` arguments that run a planned config, exactly as planned."""
    return ['train', '--run', str(config_file)]


def plan(cfg: RunConfig) -> Path:
    """Write ``cfg`` as its run folder's config.yaml (the file ``train --config`` runs); RunError, before anything
    is written, when the folder holds a run made with other settings and ``cfg`` does not overwrite it."""
    run_dir = run_directory(cfg)
    existing = run_dir / 'config.yaml'
    if existing.is_file() and not cfg.overwrite:
        try:
            recorded = yaml.safe_load(existing.read_text())
        except yaml.YAMLError:
            recorded = None
        if not isinstance(recorded, dict):
            raise RunError(f'{existing} is not a readable run config: pass --overwrite to redo the run')
        check_same_run(recorded, cfg, f'the run in {run_dir}')
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_config(run_dir, cfg)


def pending_runs(configs: List[RunConfig]) -> List[Path]:
    """Plan every run that is not finished yet (a finished one is reported and skipped), refusing two runs that
    would share a folder; all are checked before any is planned."""
    todo, seen, fingerprints = [], set(), {}

    def data(cfg: RunConfig) -> Dict[str, str]:  # once per source and protocol within this call
        key = (cfg.task, cfg.data_path, cfg.protocol, SplitSettings.of(cfg), cfg.cache_dir, cfg.output)
        if key not in fingerprints:
            fingerprints[key] = data_fingerprints(cfg)
        return fingerprints[key]

    for cfg in configs:
        run_dir = run_directory(cfg)
        if run_dir in seen:
            raise RunError(f'two runs of this sweep would write {run_dir}')
        seen.add(run_dir)
        if not cfg.overwrite and finished_results(cfg, run_dir, lambda: data(cfg)) is not None:
            print(f'skip: {run_dir} already holds this finished run')
            continue
        todo.append(cfg)
    return [plan(cfg) for cfg in todo]


def results_of(cfg: RunConfig) -> Dict[str, Any]:
    """The results.json of the finished run ``cfg`` describes."""
    path = run_directory(cfg) / 'results.json'
    if not path.is_file():
        raise RunError(f'{path} is missing after its run')
    return json.loads(path.read_text())


class Launcher:
    """Runs planned configs somewhere; ``run`` returns one line per run that did not finish (what failed and where
    its log is)."""

    def run(self, config_files: List[Path]) -> List[str]:
        raise NotImplementedError


def _failed(argv: List[str], code: int) -> str:
    return f'capaboost-vtab {" ".join(argv)} (exit code {code}; its error is above)'


class LocalLauncher(Launcher):
    """This machine: ``runs_per_gpu`` runs at once on each GPU of ``gpus`` (subprocesses), or one after another
    through ``in_process`` (the CLI's ``main``) when there is no GPU list and one run at a time."""

    def __init__(self, settings: LaunchSettings, in_process: Callable[[List[str]], int]) -> None:
        self.gpus, self.runs_per_gpu, self.in_process = settings.gpus, settings.runs_per_gpu, in_process

    def run(self, config_files: List[Path]) -> List[str]:
        commands = [train_command(path) for path in config_files]
        if not self.gpus and self.runs_per_gpu == 1:
            failures = []
            for argv in commands:
                code = self.in_process(argv)
                if code >= 128:  # stopped by a signal (the run said where its checkpoint is): the sweep stops too
                    raise SystemExit(code)
                if code:
                    failures.append(_failed(argv, code))
            return failures
        jobs: Queue = Queue()
        for argv in commands:
            jobs.put(argv)
        failures: List[str] = []

        def worker(gpu: Optional[str]) -> None:
            env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': gpu} if gpu is not None else {}))
            while True:
                try:
                    argv = jobs.get_nowait()
                except Empty:
                    return
                print(f'[{"gpu " + gpu if gpu is not None else "cpu"}] capaboost-vtab {" ".join(argv)}', flush=True)
                code = subprocess.run([sys.executable, '-m', 'capaboost_vision.vtab.cli', *argv], env=env).returncode
                if code:
                    failures.append(_failed(argv, code))

        threads = [threading.Thread(target=worker, args=(g,)) for g in (self.gpus.split(',') if self.gpus else [None])
                   for _ in range(self.runs_per_gpu)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return failures


@contextlib.contextmanager
def driver_lock(output: Path) -> Iterator[None]:
    """One driver at a time submits into an --output folder (two would both see a run unsubmitted and submit it
    twice); released when the driver ends, however it ends."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(Path(output) / '.driver.lock', wait=False))
        except LockHeld as e:
            raise RunError(f'another sweep or search is submitting runs into {output} ({e}); wait for it to end or '
                           f'use another --output') from None
        yield
