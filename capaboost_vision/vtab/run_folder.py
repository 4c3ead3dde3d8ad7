"""A run folder: where it is, its lock, overwriting it, its checkpoint, metrics, config and results.

``<output>/<family>/<task>/<protocol>/<name or method>/seed<N>`` holds ``config.yaml`` (the resolved config),
``metrics.csv`` (one row per epoch), ``checkpoint.pt`` (trainable weights, masks, optimizer, scheduler, epoch;
rewritten atomically after every epoch, only ever with finite weights) and, once finished, ``results.json`` plus the
method kind's weights (``methods.MethodKind.save``). Every file is written atomically.
"""
import contextlib
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import yaml

from .._io import (LockHeld, atomic_path, exclusive_lock, missing_folders, remove_empty_folders, remove_leftovers,
                   write_text_atomic)
from .building import family_of
from .run_config import RunConfig, RunError, check_same_run
from .tasks import task_folder_name

CHECKPOINT_NAME = 'checkpoint.pt'
# files only a run or an adapter folder holds: a folder with one of them belongs to the run that wrote it
OWNED_MARKERS = ('results.json', CHECKPOINT_NAME, 'launch.json', 'adapter.safetensors', 'adapter_model.safetensors',
                 'trainable.safetensors')


def owning_run_folder(path: Path) -> Optional[Path]:
    """The run or adapter folder that ``path`` would be written into (its folder or one above it), if any."""
    for folder in Path(path).resolve().parents:
        if any((folder / name).is_file() for name in OWNED_MARKERS):
            return folder
    return None


def check_output_file(path: Path, flag: str, replace: Optional[bool] = None) -> None:
    """RunError before anything runs when a command's output file would land in a run or adapter folder it does not
    own, is a folder, or (``replace`` False) already exists."""
    owner = owning_run_folder(path)
    if owner is not None:
        raise RunError(f'{flag} {path} is inside {owner}, a run or adapter folder: no command writes into a folder '
                       f'it does not own; write it elsewhere')
    if Path(path).is_dir():
        raise RunError(f'{flag} {path} is a folder: give a file name')
    if replace is False and Path(path).exists():
        raise RunError(f'{flag} {path} exists: pass --overwrite to replace it')


def run_directory(cfg: RunConfig) -> Path:
    """<output>/<family>/<task>/<protocol>/<name or method>/seed<N>: always under ``--output``; the protocol is in
    the path, so a val run and a final run of the same method never share a folder."""
    run_dir = Path(cfg.output) / family_of(cfg.model) / task_folder_name(cfg.task, Path(cfg.data_path)) / \
        cfg.protocol / (cfg.name or cfg.method) / f'seed{cfg.seed}'
    if not run_dir.resolve().is_relative_to(Path(cfg.output).resolve()):  # names are checked; links may still lead out
        raise RunError(f'the run folder {run_dir} resolves to {run_dir.resolve()}, outside --output {cfg.output}')
    return run_dir


def finished_results(cfg: RunConfig, run_dir: Path,
                     data: Callable[[], Dict[str, str]]) -> Optional[Dict[str, Any]]:
    """The results of the finished run in ``run_dir`` when it was made with ``cfg``'s settings and read the data
    ``data()`` fingerprints now (split -> SHA-256); None when the folder holds no finished run; RunError naming
    the differing settings or data when it was made with others."""
    results_file = run_dir / 'results.json'
    if not results_file.is_file():
        return None
    try:
        results = json.loads(results_file.read_text())
        recorded = results['config']
    except (ValueError, KeyError, TypeError):
        raise RunError(f'{results_file} does not record the settings it was made with (unreadable or written by '
                       f'an older version): pass --overwrite to redo the run or --name for a new one') from None
    check_same_run(recorded, cfg, f'the finished run in {run_dir}')
    provenance = results.get('provenance')
    check_same_data(provenance.get('data_sha256') if isinstance(provenance, dict) else None, data,
                    f'the finished run in {run_dir}', results.get('source'))
    return results


def check_same_data(recorded: Any, data: Callable[[], Dict[str, str]], what: str, source: Any = None) -> None:
    """RunError unless the data a run recorded reading (split -> SHA-256 of its list and images) is the data its
    task names now: another folder of the same name, or images changed since, make another run. A run recorded
    before fingerprints existed is taken as it is, with a note."""
    if not (isinstance(recorded, dict) and recorded and all(isinstance(v, str) for v in recorded.values())):
        print(f'note: {what} does not record which data it read (made by an older version): taken as it is',
              file=sys.stderr)
        return
    current = data()
    changed = [split for split in sorted(set(recorded) | set(current)) if recorded.get(split) != current.get(split)]
    if changed:
        split = changed[0]
        read = f' (it read {source})' if isinstance(source, str) else ''
        raise RunError(f'{what} read other data{read}: split {split} was {str(recorded.get(split))[:12]}, is now '
                       f'{str(current.get(split))[:12]} (SHA-256 of its list and images): pass --name <new name> for '
                       f'a separate run or --overwrite to replace it')


@contextlib.contextmanager
def folder_lock(run_dir: Path, main: bool):
    """Lock the run folder through a sibling lock file (so the folder itself can be replaced), before anything
    slow happens: a second run on the same folder is refused at once (``_io.exclusive_lock``: flock, or an owner
    file where the filesystem cannot flock). On failure remove what this call (or the run inside it) created when
    it holds nothing; a refused run touches nothing."""
    created = missing_folders(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_file = run_dir.parent / f'.{run_dir.name}.lock'
    with contextlib.ExitStack() as held:
        if main:
            try:
                held.enter_context(exclusive_lock(lock_file, wait=False))
            except LockHeld as e:
                raise RunError(f'{run_dir} is being written by another run ({e})') from None
            # a run killed mid-write (SIGKILL, power loss) left temp files, or half of an --overwrite's old folder
            trash = run_dir.parent / f'.{run_dir.name}.overwritten'
            remove_leftovers(sorted(run_dir.rglob('.*.tmp')) + ([trash] if trash.exists() else []), run_dir)
        try:
            yield
        except BaseException:
            if main:
                if run_dir.is_dir() and not any(run_dir.iterdir()):
                    run_dir.rmdir()
                if not run_dir.exists():
                    lock_file.unlink(missing_ok=True)
                    remove_empty_folders(created)
            raise


def replace_run_folder(run_dir: Path, main: bool, overwrite: bool) -> None:
    """Create the run folder; on ``overwrite`` first move the old one out of the way in one atomic rename and
    delete it (one rename: an interrupted overwrite leaves either the whole old run or none of it in run_dir,
    never an old checkpoint or results.json that a later --resume would take for the new run's)."""
    if main and overwrite and run_dir.exists():
        trash = run_dir.parent / f'.{run_dir.name}.overwritten'
        shutil.rmtree(trash, ignore_errors=True)
        run_dir.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def reusable_results(cfg: RunConfig, run_dir: Path, main: bool,
                     data: Callable[[], Dict[str, str]]) -> Optional[Dict[str, Any]]:
    """The results of the finished run in ``run_dir`` when it can be reused as it is (same settings, same
    ``data()``); RunError when the folder holds an unfinished run and neither --resume nor --overwrite says what to
    do with it."""
    if cfg.overwrite:
        return None
    results = finished_results(cfg, run_dir, data)
    if results is not None:
        if main:
            print(f'skip: {run_dir} already holds this finished run (pass --overwrite to redo it)')
        return results
    if (run_dir / 'checkpoint.pt').is_file() and not cfg.resume:
        raise RunError(f'{run_dir} holds an unfinished run: pass --resume to continue it or --overwrite to restart')
    return None


def write_config(run_dir: Path, cfg: RunConfig) -> Path:
    """``run_dir/config.yaml``: the resolved config, which ``train --run`` runs exactly as it is."""
    path = run_dir / 'config.yaml'
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def write_split_lists(run_dir: Path, lists: Dict[str, bytes]) -> None:
    """``run_dir/splits/<split>.txt`` (``path label`` lines) of a generated split: which images it trained and
    evaluated on, so a search's val runs and its final runs can be checked to share one split."""
    for split, text in lists.items():
        with atomic_path(run_dir / 'splits' / f'{split}.txt') as tmp:
            Path(tmp).write_bytes(text)


def write_metrics(path: Path, history: List[Dict[str, Any]]) -> None:
    """metrics.csv rewritten from the checkpointed history, so a resumed run's file equals an uninterrupted one's."""
    lines = ['epoch,lr,train_loss,train_acc,eval_acc,images_per_s,epoch_s']
    for h in history:
        eval_acc = '' if h['eval_acc'] is None else f'{h["eval_acc"]:.3f}'
        lines.append(f'{h["epoch"]},{h["lr"]:.4e},{h["train_loss"]:.6f},{h["train_acc"]:.3f},{eval_acc},'
                     f'{h["images_per_s"]:.1f},{h["epoch_s"]:.2f}')
    write_text_atomic(path, '\n'.join(lines) + '\n')


def write_checkpoint(run_dir: Path, state: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
                     history: List[Dict[str, Any]], cfg: RunConfig, data_sha256: Dict[str, str]) -> None:
    """Weights (finite: checked by the loop), optimizer, schedule, history and the data fingerprints, atomically;
    then metrics.csv."""
    with atomic_path(run_dir / CHECKPOINT_NAME) as tmp:
        torch.save({'model': state, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                    'epoch': history[-1]['epoch'], 'history': history, 'config': cfg.to_dict(),
                    'data_sha256': data_sha256}, tmp)
    write_metrics(run_dir / 'metrics.csv', history)


def read_checkpoint(ckpt_file: Path, device: torch.device, cfg: RunConfig,
                    expected: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The checkpoint in ``ckpt_file`` (weights, optimizer, schedule, history), read with ``weights_only=True``;
    RunError when it is unreadable, made with other settings, or does not fit ``expected`` (the model's trainable
    state)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch's notes on pickle protocols: the error below says it all
            ckpt = torch.load(ckpt_file, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # objects other than tensors and plain containers: refused, never executed
        raise RunError(f'{ckpt_file} cannot be read as a checkpoint (it holds objects other than tensors and plain '
                       f'values, refused unread); delete it or pass --overwrite to restart') from None
    except Exception as e:  # truncated or not a checkpoint at all
        raise RunError(f'{ckpt_file} cannot be read as a checkpoint ({type(e).__name__}: '
                       f'{str(e).splitlines()[0][:200] if str(e) else "no details"}); '
                       f'delete it or pass --overwrite to restart') from None
    if not isinstance(ckpt, dict) or not {'model', 'optimizer', 'scheduler', 'epoch', 'history'} <= set(ckpt):
        raise RunError(f'{ckpt_file} is not a capaboost-vtab checkpoint; delete it or pass --overwrite')
    if not isinstance(ckpt.get('config'), dict):
        raise RunError(f'{ckpt_file} does not record the settings it was made with; pass --overwrite to restart')
    # the schedule, lr and everything else come from the checkpoint: refuse one made with other settings
    check_same_run(ckpt['config'], cfg, f'the checkpoint {ckpt_file}')
    missing = sorted(set(expected) - set(ckpt['model']))
    if missing:
        raise RunError(f'{ckpt_file} does not match this model (missing {missing[0]}): it was written with other '
                       f'settings; use --name for a new run or --overwrite to restart')
    for key, value in ckpt['model'].items():
        if key in expected and value.shape != expected[key].shape:
            raise RunError(f'{ckpt_file} does not match this model: {key} has shape {tuple(value.shape)}, the model '
                           f'{tuple(expected[key].shape)} (another --rank/--prompt-length/...?); use --name for a new '
                           f'run or --overwrite to restart')
    return ckpt


def write_results(run_dir: Path, results: Dict[str, Any]) -> None:
    write_text_atomic(run_dir / 'results.json', json.dumps(results, indent=2))
