"""One train/eval loop for every method and model: VTAB-1k protocol, checkpoints, resume, DDP.

A run folder holds: ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch),
``checkpoint.pt`` (trainable weights, masks, optimizer, scheduler, epoch; rewritten atomically every epoch)
and, once finished, ``results.json`` plus the adapter (``adapter.safetensors``, ``config.json``, model card
``README.md``: the folder loads with ``load_adapter`` or ``adapter=``) or, for linear/full, ``trainable.safetensors``.
"""
import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from ._io import atomic_path, write_text_atomic
from .hub import WEIGHTS_NAME, save_adapter
from .config import METHODS
from .data import PROTOCOL_SPLITS, VTABDataset, vtab_transform
from .masks import stable_seed
from .tuner import head_module, is_capaboost_key, parameter_report
from .vtab import resolve_task

CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'
PEFT_FORMS = METHODS  # the CapaBoost forms; 'linear' and 'full' are the non-PEFT references
FORMS = PEFT_FORMS + ('linear', 'full')


class RunError(Exception):
    """A user-facing error of a run (bad input, NaN loss, busy folder): printed as one line by the CLI."""


@dataclass
class RunConfig:
    """Everything a run needs. Defaults are the VTAB-1k protocol of the vision PEFT literature."""
    task: str = ''
    model: str = 'vit_base'
    method: str = 'capaboost_lora'
    name: str = ''  # run name (folder and report row); default: the method
    data_path: str = ''
    output: str = 'runs'
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    img_size: int = 224
    seed: int = 0
    weights: Optional[str] = None
    pretrained: bool = True
    resume: bool = False
    overwrite: bool = False
    protocol: str = 'final'
    drop_path: float = 0.1
    label_smoothing: float = 0.0
    normalize: bool = True
    amp: str = 'bf16'
    clip_grad: Optional[float] = None
    workers: int = 4
    device: str = 'auto'
    eval_interval: int = 0
    form: str = ''
    capaboost: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.protocol not in PROTOCOL_SPLITS:
            raise RunError(f'--protocol {self.protocol!r} is invalid: choose one of {", ".join(PROTOCOL_SPLITS)}')
        if self.form not in FORMS:
            raise RunError(f'method {self.method!r} has form {self.form!r}: allowed forms are {", ".join(FORMS)}')
        if self.amp not in ('bf16', 'fp16', 'none'):
            raise RunError(f'--amp {self.amp!r} is invalid: choose bf16, fp16 or none')
        for name in ('epochs', 'batch_size', 'img_size'):
            if getattr(self, name) < 1:
                raise RunError(f'--{name.replace("_", "-")} must be >= 1')
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise RunError('--warmup-epochs must lie in [0, epochs]')
        if self.weights and not Path(self.weights).is_file():
            raise RunError(f'--weights {self.weights}: file does not exist')


def method_names() -> List[str]:
    return sorted(p.stem for p in (CONFIG_DIR / 'methods').glob('*.yaml'))


def load_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RunError(f'config file {path} does not exist')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunError(f'config file {path} is not valid YAML: {e}') from None
    if not isinstance(data, dict):
        raise RunError(f'config file {path} must hold a mapping')
    return data


def resolve_config(overrides: Dict[str, Any], config_file: Optional[str] = None) -> RunConfig:
    """Defaults <- method YAML <- task YAML <- --config YAML <- command-line flags (``overrides``)."""
    layers: List[Dict[str, Any]] = []
    method = overrides.get('method') or (load_yaml(Path(config_file)).get('method') if config_file else None) \
        or RunConfig.method
    method_file = CONFIG_DIR / 'methods' / f'{method}.yaml'
    if not method_file.is_file():
        raise RunError(f'unknown method {method!r}: choose one of {", ".join(method_names())}')
    layers.append(load_yaml(method_file))
    task_file = CONFIG_DIR / 'tasks' / f'{overrides.get("task", "")}.yaml'
    if task_file.is_file():
        layers.append({k: v for k, v in load_yaml(task_file).items() if k not in ('num_classes', 'group')})
    if config_file:
        layers.append(load_yaml(Path(config_file)))
    layers.append({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in fields(RunConfig)}
    merged: Dict[str, Any] = {'method': method}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace('-', '_')
            if key not in valid:
                raise RunError(f'unknown config key {key!r}: valid keys are {", ".join(sorted(valid))}')
            if key == 'capaboost':
                merged['capaboost'] = {**merged.get('capaboost', {}), **(value or {})}
            else:
                merged[key] = value
    cfg = RunConfig(**merged)
    cfg.validate()
    return cfg


def family_of(model: str) -> str:
    """'vit_base_capaboost_lora.orig_in21k' or 'vit_base' -> 'vit_base' (a registered CapaBoost family)."""
    family = model.split('.')[0].split('_capaboost_')[0]
    if not timm.is_model(f'{family}_capaboost_lora'):
        families = sorted({n.split('_capaboost_')[0] for n in timm.list_models('*_capaboost_*')})
        raise RunError(f'--model {model!r} is not a CapaBoost model family: choose one of {", ".join(families)} '
                       f'(or e.g. {families[0]}_capaboost_lora)')
    return family


def base_model_name(family: str) -> str:
    """The plain timm model (with its VTAB-standard weights tag) under a CapaBoost family, e.g.
    'vit_base' -> 'vit_base_patch16_224.orig_in21k'."""
    return timm.models.get_pretrained_cfg(f'{family}_capaboost_lora').hf_hub_id.split('/', 1)[1]


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The model for ``cfg.form``: a registered CapaBoost model (PEFT forms) or its plain base (linear/full)."""
    family = family_of(cfg.model)
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    pretrained = cfg.pretrained or bool(cfg.weights)
    if cfg.weights:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(cfg.weights))
    if cfg.form in PEFT_FORMS:
        try:
            return timm.create_model(f'{family}_capaboost_{cfg.form}', pretrained=pretrained, **kwargs,
                                     **cfg.capaboost)
        except TypeError as e:
            raise RunError(f'bad CapaBoost setting in {cfg.capaboost}: {e}') from None
    model = timm.create_model(base_model_name(family), pretrained=pretrained, **kwargs)
    if cfg.form == 'linear':
        model.requires_grad_(False)
        head_module(model).requires_grad_(True)
    return model


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What a run saves: trainable parameters plus CapaBoost buffers (masks) — never the frozen backbone."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if is_capaboost_key(n)})
    return state


def run_directory(cfg: RunConfig) -> Path:
    return Path(cfg.output) / family_of(cfg.model) / resolve_task(cfg.task, Path(cfg.data_path)).name / \
        (cfg.name or cfg.method) / f'seed{cfg.seed}'


class _Distributed:
    """torchrun environment (WORLD_SIZE > 1) or a single process."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = int(os.environ.get('RANK', '0'))
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        cuda = torch.cuda.is_available() and device in ('auto', 'cuda')
        self.device = torch.device(f'cuda:{local_rank}' if cuda else ('cpu' if device == 'auto' else device))
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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard writer in run_dir/tb when the tensorboard package is installed (metrics.csv is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / 'tb'))


def _write_metrics(path: Path, history: List[Dict[str, Any]]) -> None:
    """metrics.csv rewritten from the checkpointed history, so a resumed run's file equals an uninterrupted one's."""
    lines = ['epoch,lr,train_loss,train_acc,eval_acc,images_per_s,epoch_s']
    for h in history:
        eval_acc = '' if h['eval_acc'] is None else f'{h["eval_acc"]:.3f}'
        lines.append(f'{h["epoch"]},{h["lr"]:.4e},{h["train_loss"]:.6f},{h["train_acc"]:.3f},{eval_acc},'
                     f'{h["images_per_s"]:.1f},{h["epoch_s"]:.2f}')
    write_text_atomic(path, '\n'.join(lines) + '\n')


def evaluate(model: nn.Module, dataset, env: _Distributed, cfg: RunConfig, autocast) -> float:
    """Top-1 accuracy (%) on ``dataset``, sharded over ranks without padding."""
    model.eval()
    shard = Subset(dataset, range(env.rank, len(dataset), env.world))
    loader = DataLoader(shard, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=cfg.workers)
    correct = total = 0
    with torch.no_grad(), autocast():
        for x, y in tqdm(loader, desc='eval', leave=False, disable=None if env.main else True):
            pred = model(x.to(env.device)).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    correct, total = env.all_sum([correct, total])
    return 100.0 * correct / max(total, 1)


def train(cfg: RunConfig, on_epoch_end: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Run (or resume) one training run; returns the results dict (also written to results.json)."""
    env = _Distributed(cfg.device)
    task = resolve_task(cfg.task, Path(cfg.data_path))
    run_dir = run_directory(cfg)
    results_file, ckpt_file = run_dir / 'results.json', run_dir / 'checkpoint.pt'
    if results_file.is_file() and not cfg.overwrite:
        if env.main:
            print(f'skip: {run_dir} already holds a finished run (pass --overwrite to redo it)')
        return json.loads(results_file.read_text())
    if ckpt_file.is_file() and not (cfg.resume or cfg.overwrite):
        raise RunError(f'{run_dir} holds an unfinished run: pass --resume to continue it or --overwrite to restart')

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / '.lock', 'w') if env.main else None
    if lock is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f'{run_dir} is being written by another run') from None
    if cfg.overwrite:  # never leave the old results beside a new, unfinished run
        results_file.unlink(missing_ok=True)

    torch.manual_seed(cfg.seed)  # head / CapaBoost init
    model = build_model(cfg, task.num_classes).to(env.device)
    report = parameter_report(model) if cfg.form in PEFT_FORMS else None
    if env.main:
        print(f'{run_dir}: {cfg.model} {cfg.method} ({cfg.form}) on {task.name} ({task.num_classes} classes)')
        print(report if report else f'trainable parameters {sum(p.numel() for p in model.parameters() if p.requires_grad):,}')
    data_cfg = resolve_data_config(model=model)
    mean, std = (data_cfg['mean'], data_cfg['std']) if cfg.normalize else ((0., 0., 0.), (1., 1., 1.))
    transform = vtab_transform(cfg.img_size, mean, std)
    train_split, eval_split = PROTOCOL_SPLITS[cfg.protocol]
    train_set = VTABDataset(Path(cfg.data_path), task, train_split, transform)
    eval_set = VTABDataset(Path(cfg.data_path), task, eval_split, transform)
    if cfg.batch_size % env.world:
        raise RunError(f'--batch-size {cfg.batch_size} must be divisible by the {env.world} processes')

    sampler = DistributedSampler(train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size // env.world, sampler=sampler,
                        num_workers=cfg.workers, drop_last=False)
    optimizer = create_optimizer_v2(model, 'adamw', lr=cfg.lr, weight_decay=cfg.weight_decay)
    # cosine with linear warm-up, updated every step (smooth even for short schedules)
    steps_per_epoch = len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=1e-8,
                                  warmup_t=cfg.warmup_epochs * steps_per_epoch, warmup_lr_init=1e-7,
                                  t_in_epochs=False)
    start_epoch, history = 0, []
    if cfg.resume and ckpt_file.is_file() and not cfg.overwrite:
        ckpt = torch.load(ckpt_file, map_location=env.device, weights_only=True)
        missing = set(trainable_state(model)) - set(ckpt['model'])
        if missing:
            raise RunError(f'{ckpt_file} does not match this model: missing {sorted(missing)[:3]}')
        model.load_state_dict(ckpt['model'], strict=False)
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        start_epoch, history = ckpt['epoch'], ckpt['history']
        if env.main:
            print(f'resumed {run_dir} at epoch {start_epoch}')
    elif env.main and cfg.resume:
        print(f'--resume: no checkpoint in {run_dir}, starting from epoch 0')

    on_gpu = env.device.type == 'cuda'
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp) if on_gpu else None
    autocast = (lambda: torch.autocast('cuda', dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if on_gpu else None) \
        if env.world > 1 else model
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    eval_interval = cfg.eval_interval or (1 if cfg.protocol == 'val' else cfg.epochs)

    writer = None
    if env.main:
        write_text_atomic(run_dir / 'config.yaml', yaml.safe_dump(asdict(cfg), sort_keys=False))
        writer = _tensorboard_writer(run_dir)
    started = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(stable_seed(cfg.seed, 'epoch', epoch))  # drop-path/dropout: same after a resume
        sampler.set_epoch(epoch)
        num_updates = epoch * steps_per_epoch
        net.train()
        loss_sum = correct = seen = 0.0
        tic = time.time()
        for x, y in tqdm(loader, desc=f'epoch {epoch + 1}/{cfg.epochs}', leave=False, disable=None if env.main else True):
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with autocast():
                logits = net(x)
                loss = criterion(logits.float(), y)
            if not torch.isfinite(loss):
                raise RunError(f'loss became {loss.item()} at epoch {epoch + 1}; stopped. The last good checkpoint '
                               f'(epoch {epoch}) is kept in {ckpt_file}; try a lower --lr')
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(y)
        elapsed = time.time() - tic
        loss_sum, correct, seen = env.all_sum([loss_sum, correct, seen])
        lr = optimizer.param_groups[0]['lr']  # at the end of the epoch
        evaluated = (epoch + 1) % eval_interval == 0 or epoch + 1 == cfg.epochs
        history.append({'epoch': epoch + 1, 'lr': lr, 'train_loss': loss_sum / seen,
                        'train_acc': 100 * correct / seen,
                        'eval_acc': evaluate(model, eval_set, env, cfg, autocast) if evaluated else None,
                        'images_per_s': seen / elapsed, 'epoch_s': elapsed})
        if env.main:
            _atomic_torch_save({'model': trainable_state(model), 'optimizer': optimizer.state_dict(),
                                'scheduler': scheduler.state_dict(), 'epoch': epoch + 1, 'history': history,
                                'config': asdict(cfg)}, ckpt_file)
            _write_metrics(run_dir / 'metrics.csv', history)
            h = history[-1]
            if writer:
                for key in ('lr', 'train_loss', 'train_acc', 'eval_acc', 'images_per_s'):
                    if h[key] is not None:
                        writer.add_scalar(key, h[key], epoch + 1)
                writer.flush()
            print(f'epoch {epoch + 1}/{cfg.epochs} loss {h["train_loss"]:.4f} train_acc {h["train_acc"]:.2f}'
                  + (f' {eval_split}_acc {h["eval_acc"]:.2f}' if evaluated else '')
                  + f' {h["images_per_s"]:.1f} img/s', flush=True)
        if on_epoch_end:
            on_epoch_end(epoch + 1)

    evaluated = [h for h in history if h['eval_acc'] is not None]
    best = max(evaluated, key=lambda h: h['eval_acc'])
    results = {
        'task': task.name, 'group': task.group, 'num_classes': task.num_classes, 'method': cfg.name or cfg.method,
        'method_config': cfg.method, 'form': cfg.form, 'lr': cfg.lr, 'model': cfg.model, 'family': family_of(cfg.model), 'seed': cfg.seed,
        'protocol': cfg.protocol, 'eval_split': eval_split,
        'top1': history[-1]['eval_acc'],  # the LAST epoch, never the best-of-test
        'best_eval_top1': best['eval_acc'], 'best_epoch': best['epoch'], 'epochs': cfg.epochs,
        'trainable_params': sum(p.numel() for p in params),
        'trainable_params_excl_head': sum(p.numel() for n, p in model.named_parameters()
                                          if p.requires_grad and not n.startswith('head')),
        'head_params': sum(p.numel() for p in head_module(model).parameters()),
        'max_rank': report.max_rank if report else None,
        'capaboost': model.capaboost_config.to_dict() if report else None,
        'train_images_per_s': history[-1]['images_per_s'],
        'run_seconds': time.time() - started, 'device': str(env.device), 'world_size': env.world,
    }
    if env.main:
        if report:  # the run folder is itself an adapter folder: load_adapter / adapter= / push take it
            save_adapter(model, run_dir, results=results, repo_id=f'{run_dir.parent.parent.name}-{cfg.method}')
            weights = run_dir / WEIGHTS_NAME
        else:
            weights = run_dir / 'trainable.safetensors'
            with atomic_path(weights) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, tmp)
        results['adapter_file'], results['adapter_bytes'] = weights.name, weights.stat().st_size
        write_text_atomic(results_file, json.dumps(results, indent=2))
        print(f'{task.name} {results["method"]} seed {cfg.seed}: {eval_split} top-1 {results["top1"]:.2f}% -> {results_file}')
    if env.world > 1:
        checksum = sum(float(p.detach().double().sum()) for p in params)
        print(f'rank {env.rank} trainable checksum {checksum:.10e}', flush=True)
        dist.barrier()
    if lock is not None:
        lock.close()
    return results
