"""The training loop's parts, as in timm's train.py: ``train_one_epoch`` and ``evaluate`` take their collaborators
explicitly (network, loader, optimizer, schedule, loss, process group), and know nothing of run folders or method
kinds; ``Distributed`` is the process group (torchrun or one process), ``StopSignals`` the SIGTERM/SIGINT handling.
"""
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..masks import stable_seed
from .run_config import RunError, Stopped


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


class NonFinite(RunError):
    """Non-finite gradients or weights, detected on values every rank shares (all-reduced gradients, the
    replicated weights), so under DDP every rank stops at the same step instead of hanging in a collective."""


def all_finite(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """True when every given tensor holds only finite values (None entries, e.g. missing grads, are skipped)."""
    flags = [t.isfinite().all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def train_one_epoch(epoch: int, net: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    criterion: nn.Module, env: Distributed, *, params: List[nn.Parameter], epochs: int, seed: int,
                    clip_grad: float, autocast: Callable[[], Any], scaler: Optional[torch.amp.GradScaler],
                    after_step: Callable[[int, int], None],
                    mix: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> Dict[str, Any]:
    """One pass over ``loader`` (its sampler already set to ``epoch``); returns the epoch's history row (without
    evaluation). ``after_step(step, steps)`` runs after every optimizer step (the engine's stop check); NonFinite
    when the gradients or weights are no longer finite. ``mix`` (mixup/cutmix) turns each batch's labels into soft
    targets for ``criterion``; train accuracy is then measured against the unmixed labels."""
    torch.manual_seed(stable_seed(seed, 'epoch', epoch))  # drop-path/dropout/augmentation: same after a resume
    random.seed(stable_seed(seed, 'augment', epoch))  # timm's PIL augmentations draw from Python's RNG,
    np.random.seed(stable_seed(seed, 'mix', epoch) % 2 ** 32)  # its Mixup from NumPy's
    num_updates = epoch * len(loader)
    net.train()
    loss_sum = correct = seen = 0.0
    tic = time.time()
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{epochs}', leave=False, disable=None if env.main else True)
    for step, (x, y) in enumerate(bar):
        x, target = mix(x, y) if mix is not None else (x, y)
        with autocast():
            logits = net(x)
            loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        # gradients are all-reduced, so every rank sees the same verdict (the scaler skips overflow steps itself)
        if not scaler and not all_finite([p.grad for p in params]):
            raise NonFinite(f'non-finite gradients at step {step + 1} (loss {loss.item():.4g})')
        if clip_grad:
            nn.utils.clip_grad_norm_(params, clip_grad)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        num_updates += 1
        scheduler.step_update(num_updates)
        loss_value = loss.item()
        loss_sum += loss_value * len(y)
        correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}', refresh=False)
        after_step(step + 1, len(loader))
    elapsed = time.time() - tic
    if not all_finite(params):  # the replicated weights: every rank agrees
        raise NonFinite('the weights became non-finite')
    loss_sum, correct, seen = env.all_sum([loss_sum, correct, seen])
    return {'epoch': epoch + 1, 'lr': optimizer.param_groups[0]['lr'], 'train_loss': loss_sum / seen,
            'train_acc': 100 * correct / seen, 'eval_acc': None, 'eval_top5': None, 'images_per_s': seen / elapsed, 'epoch_s': elapsed}


def evaluate(model: nn.Module, loader: Any, env: Distributed, autocast: Callable[[], Any]) -> Tuple[float, float]:
    """(top-1, top-5) accuracy (%) over ``loader`` (this rank's shard of the split), summed over ranks."""
    model.eval()
    correct = correct5 = total = 0
    with torch.no_grad(), autocast():
        for x, y in tqdm(loader, desc='eval', leave=False, disable=None if env.main else True):
            logits = model(x)
            correct += int((logits.argmax(-1) == y).sum())  # argmax, not topk's first: ties resolve as before
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, min(5, C))
            correct5 += int((top == y[:, None]).any(dim=-1).sum())
            total += len(y)
    correct, correct5, total = env.all_sum([correct, correct5, total])
    return 100.0 * correct / max(total, 1), 100.0 * correct5 / max(total, 1)
