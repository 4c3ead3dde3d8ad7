"""Many tasks on one backbone: N CapaBoost-LoRA adapters loaded by name on one model (``capaboost_vision.multi``)
against N separate merged models and against HF PEFT's mixed-batch LoRA on the same timm model, in one process.

For N in --adapters: a batch of --batch-size samples, the adapters assigned round-robin. Timed (median of --steps
interleaved rounds after --warmup): our mixed batch (``model(x, adapter_names=...)``, one backbone pass); the N merged
single-task models run one after the other, each on its own samples; HF PEFT LoRA of the same rank as our update
(d*r) with N named adapters and its ``adapter_names=``. Memory: the CPU peak RSS (or CUDA peak allocation) of one
backbone holding the N adapters against N separate models, each built and run once in a fresh process.

    python scripts/bench_multi.py                                    # ViT-B/16, 224 px, CPU
    python scripts/bench_multi.py --device cuda --batch-size 64

Random weights (speed and memory do not depend on them). Output: a Markdown table on stdout and a JSON file.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import capaboost_vision as cv
from capaboost_vision.vtab.building import base_model_name

SETTINGS = dict(rank=8, num_masks=2, mask_density=0.5)  # CapaBoost-LoRA r=8, d=2 on attn.qkv (the defaults)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='vit_base', help='CapaBoost family (vit_base: ViT-B/16)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--adapters', type=int, nargs='+', default=[1, 4, 16], help='numbers N of adapters')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--no-peft', action='store_true', help='leave out HF PEFT (a machine without peft)')
    p.add_argument('--no-memory', action='store_true', help='leave out the memory probes (two fresh processes per N)')
    p.add_argument('--output', default='bench_multi.json')
    p.add_argument('--memory-of', choices=['shared', 'separate'], help=argparse.SUPPRESS)  # one fresh-process probe
    p.add_argument('--n', type=int, help=argparse.SUPPRESS)
    p.add_argument('--folder', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args, seed: int, **kwargs):
    """A CapaBoost-LoRA model on the one random base (the same torch seed before every build), its masks from
    ``seed``."""
    torch.manual_seed(0)
    return timm.create_model(f'{args.model}_capaboost_lora', img_size=args.img_size, num_classes=10, seed=seed,
                             **SETTINGS, **kwargs)


def save_adapters(args, n: int, folder: Path) -> None:
    """N adapters of the one base as they would be shipped: own masks, random weights."""
    for i in range(n):
        model = build(args, i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if cv.is_capaboost_key(name):
                    p.normal_(0, 0.02)
        cv.save_adapter(model, folder / f'a{i}')


def shared_model(args, n: int, folder: Path):
    """One backbone with the N adapters loaded by name."""
    shared = build(args, 0)
    for i in range(n):
        cv.load_adapter(shared, folder / f'a{i}', adapter_name=f'a{i}')
    cv.set_adapter(shared, 'a0')
    cv.delete_adapter(shared, 'default')  # the untrained one it was built with
    return shared.eval().to(args.device)


def separate_models(args, n: int, folder: Path):
    """N single-task models, each its adapter merged into its own copy of the weights."""
    return [cv.merge(build(args, i, adapter=str(folder / f'a{i}'))).eval().to(args.device) for i in range(n)]


def peft_model(args, n: int):
    """HF PEFT LoRA (rank d*r, the rank of our update) with N named adapters on the plain timm model."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = timm.create_model(base_model_name(args.model), img_size=args.img_size, num_classes=10)
    config = LoraConfig(r=SETTINGS['rank'] * SETTINGS['num_masks'], lora_alpha=8, target_modules=['qkv'],
                        init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name='a0')
    for i in range(1, n):
        model.add_adapter(f'a{i}', config)
    return model.eval().to(args.device)


def timed(fn, args) -> float:
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
    tic = time.perf_counter()
    with torch.no_grad():
        fn()
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def memory_probe(args) -> int:
    """(In a fresh process) peak memory growth of loading the N adapters of ``--folder`` as one backbone or as N
    separate models and running one batch through them."""
    def peak() -> int:
        if args.device.startswith('cuda'):
            return torch.cuda.max_memory_allocated()
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
        raise RuntimeError('VmHWM not in /proc/self/status')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    names = [f'a{i % args.n}' for i in range(args.batch_size)]
    if not args.device.startswith('cuda'):
        Path('/proc/self/clear_refs').write_text('5')  # reset the peak (VmHWM) to the current size
    before = peak()
    with torch.no_grad():
        if args.memory_of == 'shared':
            shared_model(args, args.n, Path(args.folder))(x, adapter_names=names)
        else:
            for i, model in enumerate(separate_models(args, args.n, Path(args.folder))):
                model(x[[j for j, name in enumerate(names) if name == f'a{i}']])
    return peak() - before


def measure_memory(args, n: int, what: str, folder: Path) -> int:
    argv = [sys.executable, __file__, '--model', args.model, '--img-size', str(args.img_size), '--batch-size',
            str(args.batch_size), '--device', args.device, '--memory-of', what, '--n', str(n), '--folder', str(folder)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def time_setups(args, n: int, folder: Path, x: torch.Tensor):
    """Median seconds per batch of each setup, measured interleaved (every setup once per round)."""
    names = [f'a{i % n}' for i in range(args.batch_size)]
    groups = [[j for j, name in enumerate(names) if name == f'a{i}'] for i in range(n)]
    shared, merged = shared_model(args, n, folder), separate_models(args, n, folder)
    runs = {'ours: one backbone, mixed batch': lambda: shared(x, adapter_names=names),
            'N merged models, one after another': lambda: [m(x[g]) for m, g in zip(merged, groups)]}
    if not args.no_peft:
        peft = peft_model(args, n)
        runs['HF PEFT LoRA, mixed batch'] = lambda: peft(x, adapter_names=names)
    times = {k: [] for k in runs}
    for step in range(args.warmup + args.steps):
        for k, fn in runs.items():
            t = timed(fn, args)
            if step >= args.warmup:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    args = parse_args()
    if args.memory_of:
        print(memory_probe(args))
        return
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    rows = {}
    for n in args.adapters:
        with tempfile.TemporaryDirectory() as tmp:
            save_adapters(args, n, Path(tmp))
            times = time_setups(args, n, Path(tmp), x)
            memory = None if args.no_memory else {
                'one backbone + N adapters': measure_memory(args, n, 'shared', Path(tmp)),
                'N separate models': measure_memory(args, n, 'separate', Path(tmp))}
            rows[n] = {'time_s': times, 'memory_bytes': memory}
        print(f'N={n}: {rows[n]}', flush=True)
    results = {'config': vars(args), 'settings': SETTINGS,
               'machine': f'{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}'
               + (f', {torch.cuda.get_device_name()}' if args.device.startswith('cuda') else ''), 'rows': rows}
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results) -> str:
    cfg = results['config']
    out = [f'{cfg["model"]} at {cfg["img_size"]} px, batch {cfg["batch_size"]} (adapters round-robin), '
           f'{cfg["device"]}; {results["machine"]}; median of {cfg["steps"]} interleaved rounds; CapaBoost-LoRA r=8, '
           f'd=2 on attn.qkv (HF PEFT: LoRA r=16, the rank of our update)', '',
           '| N adapters | ours: mixed batch (s) | N merged models (s) | ÷ ours | HF PEFT mixed batch (s) | ÷ ours | '
           'memory: one backbone + N adapters | memory: N separate models | ÷ ours |',
           '|---|---|---|---|---|---|---|---|---|']
    for n, row in results['rows'].items():
        t, m = row['time_s'], row['memory_bytes']
        ours, sep, peft = (t['ours: one backbone, mixed batch'], t['N merged models, one after another'],
                           t.get('HF PEFT LoRA, mixed batch'))
        memory = '– | – | –' if m is None else (
            f'{m["one backbone + N adapters"] / 1e6:.0f} MB | {m["N separate models"] / 1e6:.0f} MB | '
            f'{m["N separate models"] / max(m["one backbone + N adapters"], 1):.2f}')
        out.append(f'| {n} | {ours:.3f} | {sep:.3f} | {sep / ours:.2f} | '
                   + (f'{peft:.3f} | {peft / ours:.2f}' if peft else '– | –') + f' | {memory} |')
    return '\n'.join(out)


if __name__ == '__main__':
    main()
