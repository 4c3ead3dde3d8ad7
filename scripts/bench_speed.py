"""Speed, memory and size of CapaBoost vs plain LoRA / adapter / VPT-deep and HF PEFT's methods, in one process.

Rows are measured interleaved (A B C ... A B C ...) after warm-up, so machine noise hits every row alike, and
are reported as ratios to our plain LoRA r=8 and to HF PEFT LoRA r=8, next to the ratio predicted by FLOPs.

    python scripts/bench_speed.py                                   # DINOv2 ViT-S/14, 112 px, CPU
    python scripts/bench_speed.py --model vit_base --img-size 224 --batch-size 64 --device cuda --amp bf16

Random weights (speed does not depend on them). Each row is built and saved by its method kind (``vtab.methods``:
what a training run builds and saves), and merged where its form can be. Output: a Markdown table on stdout and a
JSON file.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import capaboost_vision as cv
from capaboost_vision.config import CapaBoostConfig
from capaboost_vision.forms import can_merge
from capaboost_vision.vtab.methods import kind_of, stored_parameters
from capaboost_vision.vtab.run_config import RunConfig, is_capaboost_form

ROWS = {  # name -> (form, kwargs); lora/adapter/prompt: CapaBoost kwargs of our registered models; peft: the
    # peft block of an HF PEFT method (PEFT's code), sized near LoRA r=8's 147,456 on ViT-S/14 qkv where it can be
    'lora r8 (ours)': ('lora', dict(rank=8, num_masks=1, mask_density=1.0)),
    'peft lora r8': ('peft', dict(type='LORA', r=8, lora_alpha=8)),
    'peft dora r8': ('peft', dict(type='LORA', r=8, lora_alpha=8, use_dora=True)),
    'peft loha r4': ('peft', dict(type='LOHA', r=4, alpha=8)),
    'peft lokr r64 f8': ('peft', dict(type='LOKR', r=64, alpha=64, decompose_factor=8)),
    'peft hira r8': ('peft', dict(type='HIRA', r=8)),
    'peft randlora r12': ('peft', dict(type='RANDLORA', r=12, save_projection=False)),
    'peft vera r256': ('peft', dict(type='VERA', r=256)),
    'peft fourierft n12288': ('peft', dict(type='FOURIERFT', n_frequency=12288)),
    'capaboost-lora r8 d2': ('lora', dict(rank=8, num_masks=2, mask_density=0.5)),
    'capaboost-lora r8 d4': ('lora', dict(rank=8, num_masks=4, mask_density=0.5)),
    'capaboost-dora r8 d2': ('lora', dict(rank=8, num_masks=2, mask_density=0.5, use_dora=True)),
    'adapter b8': ('adapter', dict(adapter_bottleneck=8, num_masks=1, mask_density=1.0)),
    'capaboost-adapter b8 d2': ('adapter', dict(adapter_bottleneck=8, num_masks=2, mask_density=0.5)),
    'vpt-deep n10': ('prompt', dict(prompt_length=10, prompt_rank=0, num_masks=1, mask_density=1.0)),
    'capaboost-prompt n10 r8 d2': ('prompt', dict(prompt_length=10, prompt_rank=8, num_masks=2, mask_density=0.5)),
    'linear probe': ('linear', {}),
    'full fine-tuning': ('full', {}),
}
DEFAULT_ROWS = list(ROWS)
# the other sizes of the accuracy-per-parameter study (docs/results/offline_pareto.md): measured when named
ROWS.update({
    **{f'lora r{r} (ours)': ('lora', dict(rank=r, num_masks=1, mask_density=1.0)) for r in (1, 2, 4, 16)},
    **{f'capaboost-lora r{r} d2': ('lora', dict(rank=r, num_masks=2, mask_density=0.5)) for r in (1, 2, 4)},
    **{f'capaboost-lora r{r} d4': ('lora', dict(rank=r, num_masks=4, mask_density=0.5)) for r in (2, 4)},
    'peft loha r1': ('peft', dict(type='LOHA', r=1, alpha=2)),
    'peft lokr r16 f8': ('peft', dict(type='LOKR', r=16, alpha=16, decompose_factor=8)),
})


def is_plain_lora(row: str) -> bool:
    """Our LoRA without masks: the reference of the 'equal stored' ratio."""
    form, settings = ROWS[row]
    return form == 'lora' and settings.get('num_masks') == 1 and not settings.get('use_dora')


def row_config(row: str, args) -> RunConfig:
    """The run config a training run of ``row`` would have (random weights: speed does not depend on them)."""
    form, settings = ROWS[row]
    return RunConfig(task='bench', method=row, name='bench', model=args.model, img_size=args.img_size,
                     pretrained=False, form=form,
                     capaboost=CapaBoostConfig(method=form, **settings) if is_capaboost_form(form) else None,
                     peft=dict(settings, target_modules=['qkv']) if form == 'peft' else {})


def build(row: str, args) -> torch.nn.Module:
    """The model of ``row``, built by its method kind as a training run builds it."""
    cfg = row_config(row, args)
    return kind_of(cfg).build(cfg, num_classes=100)


def merged(row: str, model: torch.nn.Module):
    """The row's model with its update folded into the base weights, or None where its form cannot be."""
    form = ROWS[row][0]
    if is_capaboost_form(form) and can_merge(form):
        return cv.merge(model)
    if form == 'peft':  # every PEFT method here merges into the base weights
        return copy.deepcopy(model).merge_and_unload()
    return None


class Runner:
    """One model with its optimizer: a train step and an inference step."""

    def __init__(self, model, args):
        self.model = model.to(args.device)
        self.net = torch.compile(self.model, backend=args.compile_backend) if args.compile else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.amp == 'bf16' \
            else nullcontext
        self.device = args.device

    def sync(self):
        if self.device == 'cuda':
            torch.cuda.synchronize()

    def train_step(self, x, y) -> float:
        self.model.train()
        self.sync()
        tic = time.perf_counter()
        with self.autocast():
            loss = torch.nn.functional.cross_entropy(self.net(x).float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sync()
        return time.perf_counter() - tic

    def infer_step(self, model, x) -> float:
        model.eval()
        self.sync()
        tic = time.perf_counter()
        with torch.no_grad(), self.autocast():
            model(x)
        self.sync()
        return time.perf_counter() - tic

    def optimizer_state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.opt.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)


def train_flops(model, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_size(row: str, model, args) -> int:
    """The size of the weights file a run of ``row`` saves (its method kind's ``save``; no results: no card
    numbers)."""
    cfg = row_config(row, args)
    with tempfile.TemporaryDirectory() as tmp:
        return kind_of(cfg).save(model, Path(tmp), {}, cfg).stat().st_size


def cpu_peak_memory(row: str, args) -> int:
    """Peak RSS growth of one train step, in a fresh process (the CPU allocator keeps no per-row peak)."""
    code = (f'import sys; sys.argv = {[sys.argv[0], "--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size)]!r}; '
            f'import runpy; mod = runpy.run_path({__file__!r}, run_name="bench"); print(mod["_measure_rss"]({row!r}))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _measure_rss(row: str) -> int:
    """Peak RSS during one train step minus RSS before it (Linux: clear_refs 5 resets the peak, VmHWM)."""
    args = parse_args()
    torch.manual_seed(0)
    runner = Runner(build(row, args), args)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch_size,))
    Path('/proc/self/clear_refs').write_text('5')
    before = _status_kb('VmRSS')
    runner.train_step(x, y)
    return (_status_kb('VmHWM') - before) * 1024


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='vit_small_dinov2', help='CapaBoost family: vit_small_dinov2, vit_base, ...')
    p.add_argument('--img-size', type=int, default=112)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10, help='timed rounds (each times every row once)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', choices=['none', 'bf16'], default='none')
    p.add_argument('--rows', nargs='+', default=DEFAULT_ROWS, choices=list(ROWS), metavar='ROW',
                   help='rows to measure (default: %(default)s); any of: ' + ', '.join(ROWS))
    p.add_argument('--no-peft', action='store_true', help='leave out the HF PEFT rows (for a machine without peft)')
    p.add_argument('--compile', action='store_true', help='torch.compile each model for the train step '
                                                              '(inference stays eager)')
    p.add_argument('--compile-backend', default='inductor', help='torch.compile backend (aot_eager: graph capture '
                                                                 'without code generation, for dry runs)')
    p.add_argument('--no-cpu-memory', action='store_true',
                   help='leave out the CPU peak memory (measured in one fresh process per row); a GPU run reads '
                        'CUDA\'s counters instead')
    p.add_argument('--output', default='bench_speed.json')
    return p.parse_args()


def main():
    args = parse_args()
    if args.no_peft:
        args.rows = [row for row in args.rows if ROWS[row][0] != 'peft']
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 100, (args.batch_size,), device=args.device)
    runners = {row: Runner(build(row, args), args) for row in args.rows}
    flops = {row: train_flops(r.model, x[:2], y[:2]) for row, r in runners.items()}
    if args.device == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
    times = {row: [] for row in runners}
    for i in range(args.warmup + args.steps):  # interleaved: every row once per round
        for row, runner in runners.items():
            t = runner.train_step(x, y)
            if i >= args.warmup:
                times[row].append(t)
    # inference: the plain timm model, every row unmerged (masked weights recomputed every pass),
    # and the merged LoRA and PEFT rows
    plain = build('linear probe', args).to(args.device)
    infer_models = {'plain timm model': plain}
    infer_models.update({row: r.model for row, r in runners.items()})
    for row, r in runners.items():
        folded = merged(row, r.model)
        if folded is not None:
            infer_models[f'{row} merged'] = folded
    infer_times = {k: [] for k in infer_models}
    any_runner = next(iter(runners.values()))
    for i in range(args.warmup + args.steps):
        for name, model in infer_models.items():
            t = any_runner.infer_step(model, x)
            if i >= args.warmup:
                infer_times[name].append(t)

    results = {'config': vars(args), 'machine': f'{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}'
               + (f', {torch.cuda.get_device_name()}' if args.device == 'cuda' else ''), 'rows': {}}
    for row, runner in runners.items():
        mem = None
        if args.device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            runner.train_step(x, y)
            mem = torch.cuda.max_memory_allocated() - base_mem
        elif args.device == 'cpu' and not args.no_cpu_memory:
            mem = cpu_peak_memory(row, args)
        model = runner.model
        counts = stored_parameters(model)  # the count of every results row and report
        results['rows'][row] = {
            'train_step_s': statistics.median(times[row]), 'train_flops': flops[row],
            'trainable_params': sum(p.numel() for p in runner.params),
            'stored_params': counts.trainable_excl_head, 'fixed_params': counts.fixed,
            'optimizer_state_bytes': runner.optimizer_state_bytes(), 'saved_bytes': saved_size(row, model, args),
            'plain_lora': is_plain_lora(row),
            'peak_memory_bytes': mem,
            'infer_s': statistics.median(infer_times[row]),
            'infer_merged_s': statistics.median(infer_times[f'{row} merged']) if f'{row} merged' in infer_times else None,
        }
    results['plain_infer_s'] = statistics.median(infer_times['plain timm model'])
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results) -> str:
    rows = results['rows']
    ours, peft = rows.get('lora r8 (ours)'), rows.get('peft lora r8')
    plain = results['plain_infer_s']

    def ratio(a, b):
        return f'{a / b:.3f}' if a and b else '–'
    cfg = results['config']
    out = [f'{cfg["model"]} at {cfg["img_size"]} px, batch {cfg["batch_size"]}, {cfg["device"]}'
           f'{" bf16" if cfg["amp"] == "bf16" else ""}{" compiled train step" if cfg.get("compile") else ""}; {results["machine"]}; median of {cfg["steps"]} interleaved steps',
           '',
           '| row | train step (s) | ÷ our LoRA r8 | ÷ our LoRA of equal stored | ÷ PEFT LoRA r8 | FLOPs ÷ our LoRA r8 '
           '| infer (s) | infer ÷ plain | merged infer ÷ plain | trainable | stored (excl. head) | fixed | '
           'optimizer state | saved file | peak memory |',
           '|---|' + '---|' * 14]
    # our LoRA row with the same stored parameters, where one was measured (within 3%: LoKr's nearest sizes)
    plain_lora = [r for r in rows.values() if r.get('plain_lora')]

    def equal_stored(r):
        return next((p['train_step_s'] for p in plain_lora
                     if abs(p['stored_params'] - r['stored_params']) <= 0.03 * p['stored_params']), None)
    for name, r in rows.items():
        memory = '–' if r['peak_memory_bytes'] is None else f"{r['peak_memory_bytes'] / 1e6:.0f} MB"
        cells = [name, f"{r['train_step_s']:.4f}", ratio(r['train_step_s'], ours and ours['train_step_s']),
                 ratio(r['train_step_s'], equal_stored(r)), ratio(r['train_step_s'], peft and peft['train_step_s']),
                 ratio(r['train_flops'], ours and ours['train_flops']), f"{r['infer_s']:.4f}",
                 ratio(r['infer_s'], plain), ratio(r['infer_merged_s'], plain), f"{r['trainable_params']:,}",
                 f"{r['stored_params']:,}", f"{r['fixed_params']:,}", f"{r['optimizer_state_bytes'] / 1e6:.2f} MB",
                 f"{r['saved_bytes'] / 1e6:.2f} MB", memory]
        out.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


if __name__ == '__main__':
    main()
