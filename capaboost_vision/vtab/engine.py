"""One train/eval run for every method and model: the VTAB-1k protocol, checkpoints, resume, DDP.

Shaped like timm's train.py: ``prepare`` (model, validated data, optimizer), ``resume``, the epochs
(``loop.train_one_epoch``, ``loop.evaluate``), ``finish``; ``train`` strings them together. What is built and saved
depends on the method kind (``methods``), where files go on the run folder (``run_folder``).
"""
import contextlib
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DistributedSampler

from .._io import missing_folders, remove_empty_folders
from .building import family_of, input_normalization
from .augment import AugmentedSplit, augments, batch_mixer, image_transform
from .data import split_warnings
from .data_cache import default_cache_dir, make_loader, prepare_split
from .loop import Distributed, NonFinite, StopSignals, evaluate, train_one_epoch
from .methods import MethodKind, kind_of, stored_parameters, trainable_state
from .provenance import provenance
from .run_config import RunConfig, RunError, Stopped
from .run_folder import (CHECKPOINT_NAME, check_same_data, folder_lock, read_checkpoint, replace_run_folder,
                         reusable_results, run_directory, write_checkpoint, write_config, write_results,
                         write_split_lists)
from .sources import SplitSettings, TaskSource, open_source
from .tasks import Task


class Diverged(RunError):
    """Non-finite loss, gradients or weights. Detected on values every rank shares (all-reduced gradients, the
    replicated weights), so under DDP every rank stops at the same step instead of hanging in a collective."""


@dataclass
class Run:
    """A prepared run: everything the epoch loop needs."""
    cfg: RunConfig
    env: Distributed
    source: TaskSource
    run_dir: Path
    model: nn.Module
    net: nn.Module  # what trains: the model, DDP-wrapped and/or compiled
    params: List[nn.Parameter]
    train_loader: Any
    train_sampler: DistributedSampler
    eval_data: Any
    eval_split: str
    data_sha256: Dict[str, str]  # split -> SHA-256 of its list and image bytes
    amp: Optional[str]  # the autocast dtype in use (None: float32)
    mean: Sequence[float]
    std: Sequence[float]
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    autocast: Callable[[], Any]
    scaler: Optional[torch.amp.GradScaler]
    criterion: nn.Module
    kind: MethodKind
    mix: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None  # mixup/cutmix of a batch
    stop: Optional[StopSignals] = None
    start_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def ckpt_file(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    @property
    def task(self) -> Task:
        return self.source.task


def _stop_if_asked(run: 'Run', when: str) -> None:
    """Stopped, naming the last checkpoint, when a stop signal arrived (under DDP: on any rank, so every rank
    stops at the same step instead of hanging in a collective)."""
    signum = run.stop.signum if run.stop is not None else None
    if run.env.world > 1:
        signum = int(run.env.all_sum([float(signum or 0)])[0]) or None
        signum = signum if signum in (signal.SIGTERM, signal.SIGINT) else (signum and signal.SIGTERM)
    if not signum:
        return
    last = run.history[-1]['epoch'] if run.history else 0
    kept = (f'the last checkpoint is {run.ckpt_file} (epoch {last} of {run.cfg.epochs}): rerun the same command '
            f'with --resume to continue from it' if last and run.ckpt_file.is_file() else
            'no epoch had finished, so no checkpoint was written: rerun the same command to start again')
    raise Stopped(f'stopped by {signal.Signals(signum).name} {when}; {kept}', signum)


def _diverged(run: Run, epoch: int, what: str) -> Diverged:
    """Diverged, naming the last finite checkpoint and the ways out."""
    last = run.history[-1]['epoch'] if run.history else 0
    where = (f'The last finite checkpoint (epoch {last}) is kept in {run.ckpt_file}'
             if last and run.ckpt_file.is_file() else 'No epoch finished, so no checkpoint was written')
    return Diverged(f'training diverged at epoch {epoch}: {what}; stopped. {where}. Rerun with a lower --lr '
                    f'(now {run.cfg.lr:g}) and --overwrite, or --clip-grad')


@contextlib.contextmanager
def _cleanup_cache_on_failure(cache_dir: Path):
    """A run that never started leaves nothing behind, not even a half-used cache folder."""
    created = missing_folders(cache_dir)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
            remove_empty_folders(created[1:])
        raise


def _prepare_data(cfg: RunConfig, source: TaskSource, env: Distributed, mean: Sequence[float], full_batch: int):
    """Validate and load both splits of the protocol before anything is trained or written to the run folder; with
    augmentation the train split is read (from the cache) through the per-image transform. ``full_batch``: the
    train split must hold at least this many images (mixup mixes full batches only)."""
    train_split, eval_split = source.protocol_splits(cfg.protocol)
    cache_dir = default_cache_dir(cfg.output, cfg.cache_dir)
    budget = int(cfg.cache_budget_gb * 1e9) if cfg.data_cache else -1
    transform = image_transform(cfg, mean) if augments(cfg) else None
    # both lists are parsed (and must be non-empty) before anything is decoded
    sets = [source.dataset(split, cfg.img_size) for split in (train_split, eval_split)]
    if len(sets[0]) < full_batch:
        raise RunError(f'--mixup/--cutmix mix full batches only: the train split ({len(sets[0])} images) has fewer '
                       f'than --batch-size {cfg.batch_size}')
    with _cleanup_cache_on_failure(cache_dir):
        train_data = prepare_split(sets[0], cache_dir, budget, None if transform else env.device,
                                   show_progress=env.main)
        eval_data = prepare_split(sets[1], cache_dir, budget, None, show_progress=env.main)
    if env.main:
        for warning in split_warnings(*sets, source.task.num_classes):
            print(f'warning: {warning}', file=sys.stderr)
    if transform is not None:
        train_data = AugmentedSplit(train_data, transform)
    fingerprints = {split: dataset.fingerprint() for split, dataset in zip((train_split, eval_split), sets)}
    return train_data, eval_data, eval_split, fingerprints


def open_run_source(cfg: RunConfig) -> TaskSource:
    """The run's task source (an HF dataset's arrow files go under the data cache folder)."""
    cache_dir = default_cache_dir(cfg.output, cfg.cache_dir)
    with _cleanup_cache_on_failure(cache_dir):
        return open_source(cfg.task, cfg.data_path, SplitSettings.of(cfg), cache_dir / 'hfds')


def data_fingerprints(cfg: RunConfig) -> Dict[str, str]:
    """split -> SHA-256 of its list and images, for the two splits of the run's protocol: what a finished run or
    checkpoint must have read to be this run (the folder name alone does not say which data it is)."""
    source = open_run_source(cfg)
    return {split: source.dataset(split, cfg.img_size).fingerprint() for split in source.protocol_splits(cfg.protocol)}


def prepare(cfg: RunConfig, env: Distributed) -> Run:
    """Model, validated data, optimizer and schedule. Raises RunError before writing anything on bad input."""
    source = open_run_source(cfg)
    source.protocol_splits(cfg.protocol)  # a final run on a source without test fails before anything is built
    run_dir = run_directory(cfg)
    if cfg.batch_size % env.world:
        raise RunError(f'--batch-size {cfg.batch_size} must be divisible by the {env.world} processes')
    torch.manual_seed(cfg.seed)  # head / CapaBoost init
    kind = kind_of(cfg)
    model = kind.build(cfg, source.task.num_classes).to(env.device)
    mean, std = input_normalization(cfg.norm, model)
    per_rank = cfg.batch_size // env.world
    mix = batch_mixer(cfg, source.task.num_classes)
    train_data, eval_data, eval_split, fingerprints = _prepare_data(cfg, source, env, mean,
                                                                    full_batch=cfg.batch_size if mix else 1)

    sampler = DistributedSampler(range(len(train_data)), num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=cfg.seed)
    train_loader = make_loader(train_data, per_rank, sampler, env.device, mean, std, cfg.workers,
                               drop_last=mix is not None)
    on_gpu = env.device.type == 'cuda'
    optimizer = create_optimizer_v2(model, 'adamw', lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    **(dict(fused=True) if on_gpu else {}))
    steps_per_epoch = len(train_loader)  # cosine with linear warm-up, updated every step
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=1e-8,
                                  warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=1e-7,
                                  t_in_epochs=False)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp) if on_gpu else None
    autocast = (lambda: torch.autocast('cuda', dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # where fp32 remains (outside autocast)
        torch.backends.cudnn.allow_tf32 = True
    net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if on_gpu else None) \
        if env.world > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    return Run(cfg=cfg, env=env, source=source, run_dir=run_dir, model=model, net=net,
               params=[p for p in model.parameters() if p.requires_grad], train_loader=train_loader,
               train_sampler=sampler, eval_data=eval_data, eval_split=eval_split, data_sha256=fingerprints,
               amp=cfg.amp if amp_dtype else None, mean=mean, std=std,
               optimizer=optimizer, scheduler=scheduler, autocast=autocast, scaler=scaler,
               criterion=SoftTargetCrossEntropy() if mix else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
               kind=kind, mix=mix)


def resume(run: Run) -> None:
    """Continue from the run folder's checkpoint (weights, optimizer, schedule, history)."""
    ckpt = read_checkpoint(run.ckpt_file, run.env.device, run.cfg, trainable_state(run.model))
    check_same_data(ckpt.get('data_sha256'), lambda: run.data_sha256, f'the checkpoint {run.ckpt_file}')
    run.model.load_state_dict(ckpt['model'], strict=False)
    run.optimizer.load_state_dict(ckpt['optimizer'])
    run.scheduler.load_state_dict(ckpt['scheduler'])
    run.start_epoch, run.history = ckpt['epoch'], ckpt['history']
    if run.env.main:
        print(f'resumed {run.run_dir} at epoch {run.start_epoch}')


def evaluate_run(run: Run) -> Tuple[float, float]:
    """(top-1, top-5) (%) on the protocol's evaluation split, sharded over ranks."""
    shard = range(run.env.rank, len(run.eval_data), run.env.world)
    loader = make_loader(run.eval_data, run.cfg.eval_batch_size, shard, run.env.device, run.mean, run.std,
                         run.cfg.workers)
    return evaluate(run.model, loader, run.env, run.autocast)


def train_epoch(run: Run, epoch: int) -> Dict[str, Any]:
    """``loop.train_one_epoch`` with this run's collaborators; a stop signal ends it after the current step."""
    cfg = run.cfg
    run.train_sampler.set_epoch(epoch)
    try:
        return train_one_epoch(epoch, run.net, run.train_loader, run.optimizer, run.scheduler, run.criterion,
                               run.env, params=run.params, epochs=cfg.epochs, seed=cfg.seed, clip_grad=cfg.clip_grad,
                               autocast=run.autocast, scaler=run.scaler, mix=run.mix,
                               after_step=lambda step, steps: _stop_if_asked(
                                   run, f'at epoch {epoch + 1}, step {step} of {steps}'))
    except NonFinite as e:
        raise _diverged(run, epoch + 1, str(e)) from None


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard writer in run_dir/tb when the tensorboard package is installed (metrics.csv is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / 'tb'))


def log_epoch(run: Run, row: Dict[str, Any], writer: Any) -> None:
    """The epoch's line on stdout and its scalars in TensorBoard."""
    if writer:
        for key in ('lr', 'train_loss', 'train_acc', 'eval_acc', 'images_per_s'):
            if row[key] is not None:
                writer.add_scalar(key, row[key], row['epoch'])
        writer.flush()
    print(f'epoch {row["epoch"]}/{run.cfg.epochs} lr {row["lr"]:.3e} loss {row["train_loss"]:.4f} '
          f'train_acc {row["train_acc"]:.2f}'
          + (f' {run.eval_split}_acc {row["eval_acc"]:.2f}' if row['eval_acc'] is not None else '')
          + f' {row["images_per_s"]:.1f} img/s', flush=True)


def run_epochs(run: Run, on_epoch_end: Optional[Callable[[int], None]]) -> None:
    """Train from ``run.start_epoch`` to the last epoch: evaluate at the interval, checkpoint every epoch."""
    cfg, env = run.cfg, run.env
    writer = _tensorboard_writer(run.run_dir) if env.main else None
    eval_interval = cfg.eval_interval or (1 if cfg.protocol == 'val' else cfg.epochs)
    for epoch in range(run.start_epoch, cfg.epochs):
        row = train_epoch(run, epoch)
        if (epoch + 1) % eval_interval == 0 or epoch + 1 == cfg.epochs:
            row['eval_acc'], row['eval_top5'] = evaluate_run(run)
        run.history.append(row)
        if env.main:
            if epoch == run.start_epoch:
                write_config(run.run_dir, cfg)
                write_split_lists(run.run_dir, run.source.recorded_lists())
            write_checkpoint(run.run_dir, trainable_state(run.model), run.optimizer, run.scheduler, run.history, cfg,
                             run.data_sha256)
            log_epoch(run, row, writer)
        if on_epoch_end:
            on_epoch_end(epoch + 1)
        _stop_if_asked(run, f'after epoch {epoch + 1}')


def finish(run: Run, started: float) -> Dict[str, Any]:
    """results.json plus the method kind's weights (``MethodKind.save``)."""
    cfg, model, env = run.cfg, run.model, run.env
    evaluated = [h for h in run.history if h['eval_acc'] is not None]
    best = max(evaluated, key=lambda h: h['eval_acc'])
    counts = stored_parameters(model)
    results = {
        'task': run.task.name, 'group': run.task.group, 'num_classes': run.task.num_classes,
        'label_names': list(run.source.label_names), 'source': run.source.describe_layout(),
        **({'hub_dataset': run.source.hub_dataset} if run.source.hub_dataset else {}),
        'split_sizes': {split: len(run.source.samples(split)) for split in run.source.lists},
        'method': cfg.name or cfg.method, 'method_config': cfg.method, 'form': cfg.form, 'lr': cfg.lr,
        'model': cfg.model, 'family': family_of(cfg.model), 'seed': cfg.seed,
        'protocol': cfg.protocol, 'eval_split': run.eval_split, 'norm': cfg.norm,
        'mean': list(run.mean), 'std': list(run.std),
        'top1': run.history[-1]['eval_acc'],  # the LAST epoch, never the best-of-test
        'top5': run.history[-1].get('eval_top5'),  # None for an epoch evaluated before top-5 was recorded
        'best_eval_top1': best['eval_acc'], 'best_epoch': best['epoch'], 'epochs': cfg.epochs,
        'trainable_params': sum(p.numel() for p in run.params),
        'trainable_params_excl_head': counts.trainable_excl_head, 'head_params': counts.head,
        'fixed_params': counts.fixed,  # non-trainable tensors the method needs: masks, random bases
        **run.kind.results(model, cfg),  # max_rank, capaboost, peft
        'train_images_per_s': run.history[-1]['images_per_s'], 'data_cache': cfg.data_cache,
        'compile': cfg.compile, 'img_size': cfg.img_size,
        'run_seconds': time.time() - started, 'device': str(env.device), 'world_size': env.world,
        'provenance': provenance(env.device, run.amp, run.kind.packages, run.data_sha256),
        'config': cfg.to_dict(),  # what finished_results compares a later request with
    }
    if env.main:
        weights = run.kind.save(model, run.run_dir, results, cfg)
        results['adapter_file'], results['adapter_bytes'] = weights.name, weights.stat().st_size
        write_results(run.run_dir, results)
        print(f'{run.task.name} {results["method"]} seed {cfg.seed}: {run.eval_split} top-1 {results["top1"]:.2f}% '
              f'-> {run.run_dir / "results.json"}')
    return results


def train(cfg: RunConfig, on_epoch_end: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Run (or resume) one training run; returns the results dict (also written to results.json).

    A finished run is reused, and a checkpoint resumed, only when it was made with the same settings
    (``run_config.IDENTITY_FIELDS``); otherwise RunError names the differing settings. SIGTERM and SIGINT stop the
    run after the current step (``Stopped``, naming the last checkpoint); a second SIGINT stops at once.
    """
    env = Distributed(cfg.device)
    run_dir = run_directory(cfg)
    with folder_lock(run_dir, env.main), StopSignals(run_dir) as stop:
        results = reusable_results(cfg, run_dir, env.main, lambda: data_fingerprints(cfg))
        if results is not None:
            return results
        run = prepare(cfg, env)  # everything that can fail on bad input fails here, before the folder is touched
        if env.main:
            print(f'{run_dir}: {cfg.model} {cfg.method} ({cfg.form}) on {run.task.name} '
                  f'({run.task.num_classes} classes)')
            print(run.kind.describe(run.model))
        replace_run_folder(run_dir, env.main, cfg.overwrite)
        if env.world > 1:
            dist.barrier()  # rank 0 has replaced the folder before anyone looks for a checkpoint
        if cfg.resume and run.ckpt_file.is_file() and not cfg.overwrite:
            resume(run)
        elif env.main and cfg.resume:
            print(f'--resume: no checkpoint in {run_dir}, starting from epoch 0')
        if env.world > 1:
            dist.barrier()
        run.stop = stop
        stop.deferred = True  # from here a signal stops the run after the current step, never mid-write
        started = time.time()
        run_epochs(run, on_epoch_end)
        results = finish(run, started)
        if env.world > 1:
            checksum = sum(float(p.detach().double().sum()) for p in run.params)
            print(f'rank {env.rank} trainable checksum {checksum:.10e}', flush=True)
            dist.barrier()
    return results
