"""Data-path speed: the decode-once cache vs decoding every epoch, against the train step they feed.

    python scripts/bench_data.py                                        # CPU, 112 px, ViT-S/14 step
    python scripts/bench_data.py --device cuda --img-size 224 --model vit_base --batch-size 64 --amp bf16

On a generated 1,000-image train split (JPEGs of a natural VTAB image's size, ``offline_data.build_shapes_task``)
it measures, in one process: images/s of one epoch through the cached path (index a uint8 tensor on the device,
normalise there), of one epoch through the decode path (DataLoader with ``--workers``), and of train steps on
synthetic input of the same shape; then data time / step time per epoch for each path. The decode path's
workers overlap with compute in a real run, so its ratio is an upper bound; the cached path runs inline.
Output: a Markdown table on stdout and a JSON file. Not a test: timings are machine-dependent.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from torch.utils.data import DistributedSampler

import capaboost_vision  # noqa: F401  (registers the models)
from capaboost_vision.vtab.data import VTABDataset
from capaboost_vision.vtab.data_cache import CachedLoader, DecodeLoader, prepare_split
from offline_data import build_shapes_task
from capaboost_vision.vtab.tasks import Task


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='vit_small_dinov2', help='CapaBoost family for the train step')
    p.add_argument('--img-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', choices=['none', 'bf16'], default='none')
    p.add_argument('--steps', type=int, default=10, help='timed train steps (after 2 warm-up steps)')
    p.add_argument('--num-test', type=int, default=1000, help='test images of the generated task (not timed)')
    p.add_argument('--work-dir', default='', help='task and cache folder (default: a temporary one)')
    p.add_argument('--output', default='bench_data.json')
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_epoch(loader, device) -> float:
    sync(device)
    tic = time.perf_counter()
    for x, _ in loader:
        pass
    sync(device)
    return time.perf_counter() - tic


def time_train_step(args, device) -> float:
    model = timm.create_model(f'{args.model}_capaboost_lora', img_size=args.img_size, num_classes=4).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            **(dict(fused=True) if device.type == 'cuda' else {}))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == 'bf16' else nullcontext
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 4, (args.batch_size,), device=device)
    times = []
    for i in range(args.steps + 2):
        sync(device)
        tic = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def main():
    args = parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        folder = build_shapes_task(work / 'data', num_test=args.num_test)
        task = Task(folder.name, 4, 'generated')
        dataset = VTABDataset(folder.parent, task, 'train800val200', args.img_size)
        mean = std = (0.5, 0.5, 0.5)
        sampler = DistributedSampler(range(len(dataset)), num_replicas=1, rank=0, shuffle=True, seed=0)
        tic = time.perf_counter()
        cached = prepare_split(dataset, work / 'cache', budget_bytes=int(8e9), device=device, show_progress=False)
        build_s = time.perf_counter() - tic
        cached_s = time_epoch(CachedLoader(cached, args.batch_size, sampler, device, mean, std), device)
        decode_s = time_epoch(DecodeLoader(dataset, args.batch_size, sampler, device, mean, std, args.workers), device)
    step_s = time_train_step(args, device)
    n = len(dataset)
    epoch_step_s = step_s * -(-n // args.batch_size)
    results = {
        'config': vars(args), 'images': n,
        'machine': f'{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}'
                   + (f', {torch.cuda.get_device_name()}' if device.type == 'cuda' else ''),
        'cache_build_s': build_s, 'cached_images_per_s': n / cached_s, 'decode_images_per_s': n / decode_s,
        'train_images_per_s': args.batch_size / step_s,
        'cached_data_over_step': cached_s / epoch_step_s, 'decode_data_over_step': decode_s / epoch_step_s,
    }
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f'{args.model} LoRA train step at {args.img_size} px, batch {args.batch_size}, {args.device}'
          f'{" bf16" if args.amp == "bf16" else ""}; {results["machine"]}; {n} train images\n')
    print('| path | images/s | data time / train-step time per epoch |')
    print('|---|---|---|')
    print(f'| cached (decode once: {build_s:.1f} s) | {results["cached_images_per_s"]:,.0f} | '
          f'{100 * results["cached_data_over_step"]:.2f}% |')
    print(f'| decode every epoch ({args.workers} workers) | {results["decode_images_per_s"]:,.0f} | '
          f'{100 * results["decode_data_over_step"]:.1f}% (upper bound: workers overlap compute) |')
    print(f'| train step, synthetic input | {results["train_images_per_s"]:,.0f} | – |')


if __name__ == '__main__':
    main()
