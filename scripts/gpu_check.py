"""The steps of scripts/gpu_check.sh (see there). Each step's outcome, time and output are written to
<out>/gpu_check.{md,json} as soon as it ends, so a timeout still leaves what finished."""
import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def versions() -> dict:
    out = {'python': platform.python_version()}
    for name in ('torch', 'timm', 'peft', 'huggingface_hub', 'safetensors', 'pytest'):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    import torch
    out['cuda'] = torch.version.cuda
    out['device'] = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'
    return out


class Check:
    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out, self.dry_run, self.steps = out, dry_run, []
        out.mkdir(parents=True, exist_ok=True)
        self.info = {'versions': versions(), 'dry_run': dry_run, 'started': time.strftime('%Y-%m-%d %H:%M:%S')}

    def run(self, name: str, argv: list, env: dict = None, json_file: str = None) -> None:
        print(f'== {name}: {" ".join(argv)}', flush=True)
        tic = time.time()
        proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True)
        step = {'name': name, 'command': ' '.join(argv), 'returncode': proc.returncode,
                'seconds': round(time.time() - tic, 1), 'output_tail': (proc.stdout + proc.stderr)[-6000:]}
        if json_file and Path(json_file).is_file():
            step['results'] = json.loads(Path(json_file).read_text())
        self.steps.append(step)
        self.write()
        print(step['output_tail'][-3000:], flush=True)
        if proc.returncode:
            raise SystemExit(f'step "{name}" failed (exit {proc.returncode}); results so far in {self.out}')

    def write(self) -> None:
        data = dict(self.info, steps=self.steps)
        (self.out / 'gpu_check.json').write_text(json.dumps(data, indent=2))
        lines = [f'# GPU check{" (dry run on CPU, tiny sizes)" if self.dry_run else ""}', '',
                 f'Started {self.info["started"]}; ' + ', '.join(f'{k} {v}' for k, v in self.info['versions'].items()),
                 '']
        for s in self.steps:
            lines += [f'## {s["name"]}: {"ok" if s["returncode"] == 0 else "FAILED"} in {s["seconds"]} s', '',
                      f'`{s["command"]}`', '', '```', s['output_tail'].strip()[-4000:], '```', '']
        (self.out / 'gpu_check.md').write_text('\n'.join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('out', help='results folder')
    p.add_argument('--dry-run', action='store_true', help='every step at tiny sizes (runs on CPU)')
    args = p.parse_args()
    out = Path(args.out).resolve()
    check = Check(out, args.dry_run)
    py = sys.executable
    dry = args.dry_run
    print(json.dumps(check.info['versions']), flush=True)

    # 1. the cuda-marked tests (on CPU in a dry run); without pytest, the same test functions run directly
    test_env = {'CAPABOOST_TEST_DEVICE': 'cpu'} if dry else {}
    if importlib.util.find_spec('pytest'):
        check.run('cuda tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider', 'tests'], test_env)
    else:
        check.run('cuda tests (no pytest: run directly)', [py, 'tests/test_cuda.py'], test_env)

    # 2. speed: ViT-B/16 224 px batch 64 bf16, eager, then the LoRA rows compiled
    speed = (['--model', 'vit_tiny', '--img-size', '32', '--batch-size', '4', '--steps', '2', '--warmup', '1']
             if dry else ['--model', 'vit_base', '--img-size', '224', '--batch-size', '64', '--steps', '10',
                          '--warmup', '3', '--amp', 'bf16'])
    device = ['--device', 'cpu' if dry else 'cuda']
    lora_rows = ['lora r8 (ours)', 'peft lora r8', 'capaboost-lora r8 d2', 'capaboost-lora r8 d4']
    rows = ['--rows', 'lora r8 (ours)', 'capaboost-lora r8 d2', 'adapter b8', 'vpt-deep n10'] if dry else []
    if importlib.util.find_spec('peft') is None:  # every row but HF PEFT's
        lora_rows.remove('peft lora r8')
        rows.append('--no-peft')
    check.run('speed, eager', [py, 'scripts/bench_speed.py', *speed, *device, *rows,
                               '--output', str(out / 'bench_speed.json')], json_file=str(out / 'bench_speed.json'))
    compile_rows = lora_rows[:1] + lora_rows[-2:-1] if dry else lora_rows
    check.run('speed, compiled train step (LoRA rows)',
              [py, 'scripts/bench_speed.py', *speed, *device, '--compile', '--rows', *compile_rows,
               *(['--compile-backend', 'aot_eager'] if dry else []),
               '--output', str(out / 'bench_speed_compile.json')], json_file=str(out / 'bench_speed_compile.json'))

    # 3. data path on one 1,000-image task
    data = (['--img-size', '32', '--model', 'vit_tiny', '--batch-size', '50', '--steps', '2', '--workers', '2',
             '--num-test', '10'] if dry else ['--img-size', '224', '--model', 'vit_base', '--batch-size', '64',
                                              '--amp', 'bf16', '--workers', '8'])
    with tempfile.TemporaryDirectory() as tmp:
        check.run('data path', [py, 'scripts/bench_data.py', *data, *device, '--work-dir', tmp,
                                '--output', str(out / 'bench_data.json')], json_file=str(out / 'bench_data.json'))

        # 4. one full-length VTAB-1k-sized run: 1,000 train images, 224 px, 100 epochs, ViT-B/16 (random init)
        from offline_data import build_shapes_task
        build_shapes_task(Path(tmp) / 'data', num_test=50 if dry else 1000)
        run = ['--model', 'vit_tiny', '--img-size', '32', '--epochs', '2', '--warmup-epochs', '0', '-b', '100',
               '--device', 'cpu'] if dry else ['--model', 'vit_base', '--img-size', '224', '--epochs', '100',
                                              '--batch-size', '64', '--device', 'cuda', '--amp', 'bf16']
        check.run('full VTAB-1k-sized run (capaboost_lora)',
                  [py, '-m', 'capaboost_vision.cli', 'train', '--task', str(Path(tmp) / 'data' / 'shapes'),
                   '--method', 'capaboost_lora', '--no-pretrained', '--output', str(Path(tmp) / 'runs'), *run])
        results = next(Path(tmp, 'runs').rglob('results.json'))
        check.steps[-1]['results'] = json.loads(results.read_text())
        check.write()
    print(f'all steps passed; results in {out}')


if __name__ == '__main__':
    main()
