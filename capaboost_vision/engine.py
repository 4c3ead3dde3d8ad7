"""One train/eval loop for every method and model: VTAB-1k protocol, checkpoints, resume, DDP.

Shaped like timm's train.py: ``prepare`` (model, validated data, optimizer), ``resume``, ``train_one_epoch``,
``evaluate``, ``finish``; ``train`` strings them together.

A run folder holds: ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch),
``checkpoint.pt`` (trainable weights, masks, optimizer, scheduler, epoch; rewritten atomically after every epoch,
and only ever with finite weights) and, once finished, ``results.json`` plus the adapter (``adapter.safetensors``,
``config.json``, model card ``README.md``: the folder loads with ``load_adapter`` or ``adapter=``), for HF PEFT
methods PEFT's own ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` on the
plain timm model), or, for linear/full, ``trainable.safetensors``.
"""
import contextlib
import fcntl
import json
import os
import pickle
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from ._io import atomic_path, missing_folders, remove_empty_folders, write_text_atomic
from .config import CapaBoostConfig
from .data import PROTOCOL_SPLITS, VTABDataset
from .data_cache import CachedLoader, CachedSplit, DecodeLoader, default_cache_dir, prepare_split
from .hub import WEIGHTS_NAME, save_adapter
from .masks import stable_seed
from .models._builder import loaded_weights_id
from .peft_baselines import apply_peft, peft_version, save_peft
from .run_config import CAPABOOST_FORMS, RunConfig, RunError, Stopped, check_same_run
from .tuner import apply_capaboost, head_module, head_name, is_capaboost_key, parameter_report, stored_parameters
from .vtab import Task, resolve_task


def family_of(model: str) -> str:
    """'vit_base_capaboost_lora.orig_in21k' or 'vit_base' -> 'vit_base' (a registered CapaBoost family); a plain
    timm model name ('deit_small_patch16_224.fb_in1k') -> its architecture, to which CapaBoost is applied."""
    name = model.split('.')[0]
    family = name.split('_capaboost_')[0]
    if timm.is_model(f'{family}_capaboost_lora'):
        return family
    if '_capaboost_' not in name and timm.is_model(name):
        return name
    families = sorted({n.split('_capaboost_')[0] for n in timm.list_models('*_capaboost_*')})
    raise RunError(f'--model {model!r} is neither a CapaBoost model family ({", ".join(families)}, or e.g. '
                   f'{families[0]}_capaboost_lora) nor a timm ViT/Swin model name')


def base_model_name(family: str) -> str:
    """The plain timm model (with its VTAB-standard weights tag) under a CapaBoost family, e.g.
    'vit_base' -> 'vit_base_patch16_224.orig_in21k'; a plain timm name is its own base."""
    if not timm.is_model(f'{family}_capaboost_lora'):
        return family
    return timm.models.get_pretrained_cfg(f'{family}_capaboost_lora').hf_hub_id.split('/', 1)[1]


def _base_model(cfg: RunConfig) -> Tuple[str, bool]:
    """(the plain timm model name under ``--model``, whether ``--model`` is a registered CapaBoost family)."""
    family = family_of(cfg.model)
    registered = timm.is_model(f'{family}_capaboost_lora')
    return (base_model_name(family) if registered else cfg.model), registered


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The model for ``cfg.form``: a registered CapaBoost model, or any timm ViT/Swin with CapaBoost applied
    (CapaBoost forms); the plain base wrapped by HF PEFT (peft); the plain base (linear/full)."""
    family = family_of(cfg.model)
    base, registered = _base_model(cfg)
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    pretrained = cfg.pretrained or bool(cfg.weights)
    if cfg.weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(cfg.weights))
    try:
        if cfg.form in CAPABOOST_FORMS and registered:
            return timm.create_model(f'{family}_capaboost_{cfg.form}', pretrained=pretrained, **kwargs,
                                     **cfg.capaboost)
        model = timm.create_model(base, pretrained=pretrained, **kwargs)
        if cfg.form in CAPABOOST_FORMS:  # a plain timm name: CapaBoost applied here, as apply_capaboost users do
            model.capaboost_base_weights = loaded_weights_id(model, pretrained)
            apply_capaboost(model, CapaBoostConfig(**dict(cfg.capaboost, method=cfg.form)))
    except TypeError as e:
        if not registered:  # e.g. a CNN's constructor has no img_size
            raise RunError(f'--model {cfg.model}: not a timm VisionTransformer/SwinTransformer ({e})') from None
        raise RunError(f'bad model setting in {cfg.capaboost or kwargs}: {e}') from None
    except ValueError as e:  # not a ViT/Swin, an unsupported block, a bad CapaBoost setting
        raise RunError(f'--model {cfg.model}: {str(e).splitlines()[0]}') from None
    except (AssertionError, RuntimeError) as e:  # timm's shape asserts (e.g. an image smaller than a patch)
        raise RunError(f'--model {cfg.model} cannot be built with --img-size {cfg.img_size}: '
                       f'{str(e).splitlines()[0] or type(e).__name__}') from None
    if cfg.form == 'linear':
        model.requires_grad_(False)
        head_module(model).requires_grad_(True)
    if cfg.form == 'peft':  # check_peft_method has vetted the block against this architecture
        try:
            return apply_peft(model, cfg.peft, head_name(model), f'method {cfg.method}')
        except ValueError as e:
            raise RunError(str(e)) from None
    return model


def check_peft_method(cfg: RunConfig, where: str) -> None:
    """RunError naming ``where`` (the YAML file or flag of the peft block) when the block does not apply to
    ``--model``: checked on the meta device (no weights, no memory) when the config is resolved, so a sweep or
    search refuses it before any run starts."""
    try:
        with torch.device('meta'):
            model = timm.create_model(_base_model(cfg)[0], pretrained=False, num_classes=2, img_size=cfg.img_size)
    except Exception:  # noqa: BLE001  a bad --model/--img-size: build_model reports it in its own words
        return
    try:
        apply_peft(model, cfg.peft, head_name(model), where)
    except ValueError as e:
        raise RunError(str(e)) from None


def input_normalization(norm: str, model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) for ``--norm``: ImageNet's, the model's pretrained cfg's, or none ([0, 1] inputs)."""
    if norm == 'imagenet':
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if norm == 'model':
        data_cfg = resolve_data_config(model=model)
        return tuple(data_cfg['mean']), tuple(data_cfg['std'])
    return (0., 0., 0.), (1., 1., 1.)


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What a run saves: trainable parameters plus CapaBoost buffers (masks) — never the frozen backbone."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if is_capaboost_key(n)})
    return state


def all_finite(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when every given tensor holds only finite values (None entries, e.g. missing grads, are skipped)."""
    flags = [t.isfinite().all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def run_directory(cfg: RunConfig) -> Path:
    """<output>/<family>/<task>/<protocol>/<name or method>/seed<N>: always under ``--output``; the protocol is in
    the path, so a val run and a final run of the same method never share a folder."""
    run_dir = Path(cfg.output) / family_of(cfg.model) / resolve_task(cfg.task, Path(cfg.data_path)).name / \
        cfg.protocol / (cfg.name or cfg.method) / f'seed{cfg.seed}'
    if not run_dir.resolve().is_relative_to(Path(cfg.output).resolve()):  # names are checked; links may still lead out
        raise RunError(f'the run folder {run_dir} resolves to {run_dir.resolve()}, outside --output {cfg.output}')
    return run_dir


def finished_results(cfg: RunConfig, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The results of the finished run in ``run_dir`` when it was made with ``cfg``'s settings; None when the folder
    holds no finished run; RunError naming the differing settings when it was made with others."""
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
    return results


class Distributed:
    """torchrun environment (WORLD_SIZE > 1) or a single process."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise RunError(f'--device {device}: no CUDA GPU is available here; use --device cpu or auto')
        cuda = torch.cuda.is_available() and device != 'cpu'
        self.device = torch.device(device if device.startswith('cuda:') else
                                   f'cuda:{local_rank}' if cuda else 'cpu')
        if self.world > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group('nccl' if cuda else 'gloo')
        self.main = self.rank == 0

    def all_sum(self, values: List[float]) -> List[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


class StopSignals:
    """SIGTERM and SIGINT handlers for one run, installed in the main thread only (a run in another thread keeps
    the process's handlers).

    Until training starts (``deferred`` False) a signal stops the run at once, raising ``Stopped`` wherever it is:
    every file is written atomically, so nothing is left half-written. Once training runs, a signal only records
    ``signum`` and the loop stops after the current step (``_stop_if_asked``), never mid-write; a second SIGINT
    stops at once.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.signum, self.deferred = run_dir, None, False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.deferred and self.signum is None:
            self.signum = signum
            return
        ckpt = self.run_dir / 'checkpoint.pt'
        kept = (f'the checkpoint {ckpt} is kept: rerun the same command with --resume to continue from it'
                if ckpt.is_file() else 'no checkpoint was written: rerun the same command to start again')
        raise Stopped(f'stopped by {signal.Signals(signum).name} before the current step ended; {kept}', signum)


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


class Diverged(RunError):
    """Non-finite loss, gradients or weights. Detected on values every rank shares (all-reduced gradients, the
    replicated weights), so under DDP every rank stops at the same step instead of hanging in a collective."""


@dataclass
class Run:
    """A prepared run: everything the epoch loop needs."""
    cfg: RunConfig
    env: Distributed
    task: Task
    run_dir: Path
    model: nn.Module
    net: nn.Module  # what trains: the model, DDP-wrapped and/or compiled
    params: List[nn.Parameter]
    train_loader: Any
    train_sampler: DistributedSampler
    eval_data: Any
    eval_split: str
    mean: Sequence[float]
    std: Sequence[float]
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    autocast: Callable[[], Any]
    scaler: Optional[torch.amp.GradScaler]
    criterion: nn.Module
    report: Any = None
    stop: Optional[StopSignals] = None
    start_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def ckpt_file(self) -> Path:
        return self.run_dir / 'checkpoint.pt'


def _prepare_data(cfg: RunConfig, task: Task, env: Distributed):
    """Validate and load both splits of the protocol before anything is trained or written to the run folder."""
    train_split, eval_split = PROTOCOL_SPLITS[cfg.protocol]
    cache_dir = default_cache_dir(cfg.output, cfg.cache_dir)
    budget = int(cfg.cache_budget_gb * 1e9) if cfg.data_cache else -1
    # both lists are parsed (and must be non-empty) before anything is decoded
    sets = [VTABDataset(Path(cfg.data_path), task, split, cfg.img_size) for split in (train_split, eval_split)]
    created = missing_folders(cache_dir)
    try:
        train_data = prepare_split(sets[0], cache_dir, budget, env.device, show_progress=env.main)
        eval_data = prepare_split(sets[1], cache_dir, budget, None, show_progress=env.main)
    except BaseException:
        if created:  # a run that never started leaves nothing behind, not even a half-used cache folder
            shutil.rmtree(created[0], ignore_errors=True)
            remove_empty_folders(created[1:])
        raise
    return train_data, eval_data, eval_split


def prepare(cfg: RunConfig, env: Distributed) -> Run:
    """Model, validated data, optimizer and schedule. Raises RunError before writing anything on bad input."""
    task = resolve_task(cfg.task, Path(cfg.data_path))
    run_dir = run_directory(cfg)
    if cfg.batch_size % env.world:
        raise RunError(f'--batch-size {cfg.batch_size} must be divisible by the {env.world} processes')
    torch.manual_seed(cfg.seed)  # head / CapaBoost init
    model = build_model(cfg, task.num_classes).to(env.device)
    mean, std = input_normalization(cfg.norm, model)
    train_data, eval_data, eval_split = _prepare_data(cfg, task, env)

    per_rank = cfg.batch_size // env.world
    sampler = DistributedSampler(range(len(train_data)), num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=cfg.seed)
    if isinstance(train_data, CachedSplit):
        train_loader = CachedLoader(train_data, per_rank, sampler, env.device, mean, std)
    else:
        train_loader = DecodeLoader(train_data, per_rank, sampler, env.device, mean, std, cfg.workers)
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
    return Run(cfg=cfg, env=env, task=task, run_dir=run_dir, model=model, net=net,
               params=[p for p in model.parameters() if p.requires_grad], train_loader=train_loader,
               train_sampler=sampler, eval_data=eval_data, eval_split=eval_split, mean=mean, std=std,
               optimizer=optimizer, scheduler=scheduler, autocast=autocast, scaler=scaler,
               criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
               report=parameter_report(model) if cfg.form in CAPABOOST_FORMS else None)


def resume(run: Run) -> None:
    """Load the run folder's checkpoint (weights, optimizer, schedule, history); RunError when it does not fit."""
    ckpt_file = run.ckpt_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch's notes on pickle protocols: the error below says it all
            ckpt = torch.load(ckpt_file, map_location=run.env.device, weights_only=True)
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
    check_same_run(ckpt['config'], run.cfg, f'the checkpoint {ckpt_file}')
    expected = trainable_state(run.model)
    missing = sorted(set(expected) - set(ckpt['model']))
    if missing:
        raise RunError(f'{ckpt_file} does not match this model (missing {missing[0]}): it was written with other '
                       f'settings; use --name for a new run or --overwrite to restart')
    for key, value in ckpt['model'].items():
        if key in expected and value.shape != expected[key].shape:
            raise RunError(f'{ckpt_file} does not match this model: {key} has shape {tuple(value.shape)}, the model '
                           f'{tuple(expected[key].shape)} (another --rank/--prompt-length/...?); use --name for a new '
                           f'run or --overwrite to restart')
    run.model.load_state_dict(ckpt['model'], strict=False)
    run.optimizer.load_state_dict(ckpt['optimizer'])
    run.scheduler.load_state_dict(ckpt['scheduler'])
    run.start_epoch, run.history = ckpt['epoch'], ckpt['history']
    if run.env.main:
        print(f'resumed {run.run_dir} at epoch {run.start_epoch}')


def _diverged(run: Run, epoch: int, what: str) -> Diverged:
    last = run.history[-1]['epoch'] if run.history else 0
    where = (f'The last finite checkpoint (epoch {last}) is kept in {run.ckpt_file}'
             if last and run.ckpt_file.is_file() else 'No epoch finished, so no checkpoint was written')
    return Diverged(f'training diverged at epoch {epoch}: {what}; stopped. {where}. Rerun with a lower --lr '
                    f'(now {run.cfg.lr:g}) and --overwrite, or --clip-grad')


def train_one_epoch(run: Run, epoch: int) -> Dict[str, Any]:
    """One pass over the train split; returns the epoch's history row (without evaluation)."""
    cfg, env = run.cfg, run.env
    torch.manual_seed(stable_seed(cfg.seed, 'epoch', epoch))  # drop-path/dropout: same after a resume
    run.train_sampler.set_epoch(epoch)
    num_updates = epoch * len(run.train_loader)
    run.net.train()
    loss_sum = correct = seen = 0.0
    tic = time.time()
    bar = tqdm(run.train_loader, desc=f'epoch {epoch + 1}/{cfg.epochs}', leave=False,
               disable=None if env.main else True)
    for step, (x, y) in enumerate(bar):
        with run.autocast():
            logits = run.net(x)
            loss = run.criterion(logits.float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
        else:
            loss.backward()
        # gradients are all-reduced, so every rank sees the same verdict (the scaler skips overflow steps itself)
        if not run.scaler and not all_finite([p.grad for p in run.params]):
            raise _diverged(run, epoch + 1, f'non-finite gradients at step {step + 1} (loss {loss.item():.4g})')
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(run.params, cfg.clip_grad)
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        num_updates += 1
        run.scheduler.step_update(num_updates)
        loss_value = loss.item()
        loss_sum += loss_value * len(y)
        correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{run.optimizer.param_groups[0]["lr"]:.2e}', refresh=False)
        _stop_if_asked(run, f'at epoch {epoch + 1}, step {step + 1} of {len(run.train_loader)}')
    elapsed = time.time() - tic
    if not all_finite(run.params):  # the replicated weights: every rank agrees
        raise _diverged(run, epoch + 1, 'the weights became non-finite')
    loss_sum, correct, seen = env.all_sum([loss_sum, correct, seen])
    return {'epoch': epoch + 1, 'lr': run.optimizer.param_groups[0]['lr'], 'train_loss': loss_sum / seen,
            'train_acc': 100 * correct / seen, 'eval_acc': None, 'images_per_s': seen / elapsed, 'epoch_s': elapsed}


def evaluate(model: nn.Module, data, env: Distributed, cfg: RunConfig, autocast, mean, std) -> float:
    """Top-1 accuracy (%) on ``data`` (a CachedSplit or the decode-path dataset), sharded over ranks."""
    model.eval()
    shard = range(env.rank, len(data), env.world)
    if isinstance(data, CachedSplit):
        loader = CachedLoader(data, cfg.eval_batch_size, shard, env.device, mean, std)
    else:
        loader = DecodeLoader(data, cfg.eval_batch_size, list(shard), env.device, mean, std, cfg.workers)
    correct = total = 0
    with torch.no_grad(), autocast():
        for x, y in tqdm(loader, desc='eval', leave=False, disable=None if env.main else True):
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    correct, total = env.all_sum([correct, total])
    return 100.0 * correct / max(total, 1)


def _write_metrics(path: Path, history: List[Dict[str, Any]]) -> None:
    """metrics.csv rewritten from the checkpointed history, so a resumed run's file equals an uninterrupted one's."""
    lines = ['epoch,lr,train_loss,train_acc,eval_acc,images_per_s,epoch_s']
    for h in history:
        eval_acc = '' if h['eval_acc'] is None else f'{h["eval_acc"]:.3f}'
        lines.append(f'{h["epoch"]},{h["lr"]:.4e},{h["train_loss"]:.6f},{h["train_acc"]:.3f},{eval_acc},'
                     f'{h["images_per_s"]:.1f},{h["epoch_s"]:.2f}')
    write_text_atomic(path, '\n'.join(lines) + '\n')


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard writer in run_dir/tb when the tensorboard package is installed (metrics.csv is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / 'tb'))


def save_checkpoint(run: Run) -> None:
    """Weights (finite: checked by ``train_one_epoch``), optimizer, schedule and history, atomically."""
    with atomic_path(run.ckpt_file) as tmp:
        torch.save({'model': trainable_state(run.model), 'optimizer': run.optimizer.state_dict(),
                    'scheduler': run.scheduler.state_dict(), 'epoch': run.history[-1]['epoch'],
                    'history': run.history, 'config': asdict(run.cfg)}, tmp)
    _write_metrics(run.run_dir / 'metrics.csv', run.history)


def finish(run: Run, started: float) -> Dict[str, Any]:
    """results.json plus the adapter (PEFT forms) or the trainable weights (linear/full)."""
    cfg, model, env = run.cfg, run.model, run.env
    evaluated = [h for h in run.history if h['eval_acc'] is not None]
    best = max(evaluated, key=lambda h: h['eval_acc'])
    counts = stored_parameters(model)
    results = {
        'task': run.task.name, 'group': run.task.group, 'num_classes': run.task.num_classes,
        'method': cfg.name or cfg.method, 'method_config': cfg.method, 'form': cfg.form, 'lr': cfg.lr,
        'model': cfg.model, 'family': family_of(cfg.model), 'seed': cfg.seed,
        'protocol': cfg.protocol, 'eval_split': run.eval_split, 'norm': cfg.norm,
        'mean': list(run.mean), 'std': list(run.std),
        'top1': run.history[-1]['eval_acc'],  # the LAST epoch, never the best-of-test
        'best_eval_top1': best['eval_acc'], 'best_epoch': best['epoch'], 'epochs': cfg.epochs,
        'trainable_params': sum(p.numel() for p in run.params),
        'trainable_params_excl_head': counts.trainable_excl_head, 'head_params': counts.head,
        'fixed_params': counts.fixed,  # non-trainable tensors the method needs: masks, random bases
        'max_rank': run.report.max_rank if run.report else None,
        'capaboost': model.capaboost_config.to_dict() if run.report else None,
        'peft': dict(cfg.peft, version=peft_version()) if cfg.form == 'peft' else None,
        'train_images_per_s': run.history[-1]['images_per_s'], 'data_cache': cfg.data_cache,
        'compile': cfg.compile, 'img_size': cfg.img_size,
        'run_seconds': time.time() - started, 'device': str(env.device), 'world_size': env.world,
        'config': asdict(cfg),  # what finished_results compares a later request with
    }
    if env.main:
        if run.report:  # the run folder is itself an adapter folder: load_adapter / adapter= / push take it
            save_adapter(model, run.run_dir, results=results,
                         repo_id=f'{run.run_dir.parent.parent.name}-{cfg.method}')
            weights = run.run_dir / WEIGHTS_NAME
        elif cfg.form == 'peft':  # PEFT's own format: loads with PeftModel.from_pretrained on the plain timm model
            save_peft(model, run.run_dir)
            weights = run.run_dir / 'adapter_model.safetensors'
        else:
            weights = run.run_dir / 'trainable.safetensors'
            with atomic_path(weights) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, tmp)
        results['adapter_file'], results['adapter_bytes'] = weights.name, weights.stat().st_size
        write_text_atomic(run.run_dir / 'results.json', json.dumps(results, indent=2))
        print(f'{run.task.name} {results["method"]} seed {cfg.seed}: {run.eval_split} top-1 {results["top1"]:.2f}% '
              f'-> {run.run_dir / "results.json"}')
    return results


@contextlib.contextmanager
def _run_folder_lock(run_dir: Path, main: bool):
    """Lock the run folder through a sibling lock file (so the folder itself can be replaced), before anything
    slow happens: a second run on the same folder is refused at once. On failure remove what this call (or the
    run inside it) created when it holds nothing."""
    created = missing_folders(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_file = run_dir.parent / f'.{run_dir.name}.lock'
    lock = open(lock_file, 'w') if main else None
    try:
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(f'{run_dir} is being written by another run') from None
        yield
    except BaseException:
        if lock is not None:
            lock.close()
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
            if not run_dir.exists():
                lock_file.unlink(missing_ok=True)
                remove_empty_folders(created)
        raise
    if lock is not None:
        lock.close()


def _replace_run_folder(run_dir: Path, main: bool, overwrite: bool) -> None:
    """Create the run folder; on ``overwrite`` first move the old one out of the way in one atomic rename and
    delete it (one rename: an interrupted overwrite leaves either the whole old run or none of it in run_dir,
    never an old checkpoint or results.json that a later --resume would take for the new run's)."""
    if main and overwrite and run_dir.exists():
        trash = run_dir.parent / f'.{run_dir.name}.overwritten'
        shutil.rmtree(trash, ignore_errors=True)
        run_dir.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _reusable_results(cfg: RunConfig, run_dir: Path, main: bool) -> Optional[Dict[str, Any]]:
    """The results of the finished run in ``run_dir`` when it can be reused as it is; RunError when the folder holds
    an unfinished run and neither --resume nor --overwrite says what to do with it."""
    if cfg.overwrite:
        return None
    results = finished_results(cfg, run_dir)
    if results is not None:
        if main:
            print(f'skip: {run_dir} already holds this finished run (pass --overwrite to redo it)')
        return results
    if (run_dir / 'checkpoint.pt').is_file() and not cfg.resume:
        raise RunError(f'{run_dir} holds an unfinished run: pass --resume to continue it or --overwrite to restart')
    return None


def train(cfg: RunConfig, on_epoch_end: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Run (or resume) one training run; returns the results dict (also written to results.json).

    A finished run is reused, and a checkpoint resumed, only when it was made with the same settings
    (``run_config.IDENTITY_FIELDS``); otherwise RunError names the differing settings. SIGTERM and SIGINT stop the
    run after the current step (``Stopped``, naming the last checkpoint); a second SIGINT stops at once.
    """
    env = Distributed(cfg.device)
    run_dir = run_directory(cfg)
    with _run_folder_lock(run_dir, env.main), StopSignals(run_dir) as stop:
        results = _reusable_results(cfg, run_dir, env.main)
        if results is not None:
            return results
        run = prepare(cfg, env)  # everything that can fail on bad input fails here, before the folder is touched
        if env.main:
            print(f'{run_dir}: {cfg.model} {cfg.method} ({cfg.form}) on {run.task.name} '
                  f'({run.task.num_classes} classes)')
            counts = stored_parameters(run.model)
            print(run.report if run.report else f'trainable parameters {sum(p.numel() for p in run.params):,} '
                                                f'(excl. head {counts.trainable_excl_head:,}; fixed tensors '
                                                f'{counts.fixed:,})')
        _replace_run_folder(run_dir, env.main, cfg.overwrite)
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
        writer = _tensorboard_writer(run_dir) if env.main else None
        eval_interval = cfg.eval_interval or (1 if cfg.protocol == 'val' else cfg.epochs)
        started = time.time()
        for epoch in range(run.start_epoch, cfg.epochs):
            row = train_one_epoch(run, epoch)
            if (epoch + 1) % eval_interval == 0 or epoch + 1 == cfg.epochs:
                row['eval_acc'] = evaluate(run.model, run.eval_data, env, cfg, run.autocast, run.mean, run.std)
            run.history.append(row)
            if env.main:
                if epoch == run.start_epoch:
                    write_text_atomic(run_dir / 'config.yaml', yaml.safe_dump(asdict(cfg), sort_keys=False))
                save_checkpoint(run)
                if writer:
                    for key in ('lr', 'train_loss', 'train_acc', 'eval_acc', 'images_per_s'):
                        if row[key] is not None:
                            writer.add_scalar(key, row[key], epoch + 1)
                    writer.flush()
                print(f'epoch {epoch + 1}/{cfg.epochs} lr {row["lr"]:.3e} loss {row["train_loss"]:.4f} '
                      f'train_acc {row["train_acc"]:.2f}'
                      + (f' {run.eval_split}_acc {row["eval_acc"]:.2f}' if row['eval_acc'] is not None else '')
                      + f' {row["images_per_s"]:.1f} img/s', flush=True)
            if on_epoch_end:
                on_epoch_end(epoch + 1)
            _stop_if_asked(run, f'after epoch {epoch + 1}')
        results = finish(run, started)
        if env.world > 1:
            checksum = sum(float(p.detach().double().sum()) for p in run.params)
            print(f'rank {env.rank} trainable checksum {checksum:.10e}', flush=True)
            dist.barrier()
    return results
