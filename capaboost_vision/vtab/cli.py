"""``capaboost-vtab``: check data, train one run, sweep a grid, report results, push adapters, inspect ranks.

Also runs under torchrun: ``torchrun --nproc_per_node 4 -m capaboost_vision.cli train ...`` (or ``-m
capaboost_vision.vtab.cli``).
Flags are generated from the ``RunConfig`` and ``CapaBoostConfig`` fields (their help, defaults and choices),
and arguments are parsed before torch and timm are imported, so ``--help`` and usage errors answer at once.
Errors reach the user as one line; ``--debug`` (or CAPABOOST_DEBUG=1) shows the traceback.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from .._version import __version__
from ..config import field_default, in_range, setting_fields
from .run_config import FIELDS, RunConfig, RunError, Stopped, method_names, planned_config, resolve_config
from .launch_settings import LaunchSettings
from .tasks import expand_tasks

if TYPE_CHECKING:
    from .launch import Launcher


def _capaboost_fields():
    """(field, flag name) of every CapaBoost setting with a flag: the shared ones and every registered form's."""
    for f in setting_fields():
        if f.metadata.get('cli', True):
            yield f, f.metadata.get('flag', f.name)


def _range_text(f) -> str:
    """'; allowed: [0, 1)' for a numeric setting with a range, for its --help."""
    return f'; allowed: {f.metadata["range"]}' if f.metadata.get('range') else ''


DATA_FLAGS = ('data_path', 'split_seed', 'val_fraction', 'test_fraction', 'split_map', 'image_column', 'label_column')
"""The settings that pick a task's images and splits: what ``check``, ``eval`` take besides ``train``."""


def _add_run_flags(p: argparse.ArgumentParser, scopes: tuple) -> None:
    """One flag per RunConfig field in ``scopes``. Defaults stay None so the YAML layers apply; help shows the
    effective default."""
    _add_flags(p, [name for name, f in FIELDS.items()
                   if f.metadata.get('cli', True) and f.metadata.get('scope', 'run') in scopes])
    _add_method_flags(p)


def _add_flags(p: Any, names: List[str], by_name: Optional[Dict[str, Any]] = None) -> None:
    """A flag for each named field of ``by_name`` (RunConfig's by default); default None: unset."""
    for name in names:
        f = (by_name or FIELDS)[name]
        meta = f.metadata
        default = field_default(f)
        names = ['--' + name.replace('_', '-')] + ([meta['short']] if 'short' in meta else [])
        shown = ' '.join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f'{meta["help"]} (default: {shown if shown != "" else "none"}{_range_text(f)})'
        if isinstance(default, bool):
            p.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            element = str if isinstance(default, tuple) else type(default)
            p.add_argument(*names, dest=name, type=element, choices=meta.get('choices'), nargs=meta.get('nargs'),
                           default=None, help=help_text)


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    from .launch_settings import LAUNCH_FIELDS
    _add_flags(p.add_argument_group('where the runs execute (not part of a run\'s settings)'), list(LAUNCH_FIELDS),
               LAUNCH_FIELDS)


def _launch_settings(args: argparse.Namespace):
    """The launcher settings of sweep/search flags (checked: RunError naming the flag)."""
    from .launch_settings import LAUNCH_FIELDS
    given = {name: getattr(args, name) for name in LAUNCH_FIELDS if getattr(args, name) is not None}
    settings = LaunchSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}).check()
    settings.given = frozenset(given)  # what the user chose (a launcher may fit the others to its cluster)
    return settings


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """--config, --peft-args and the CapaBoost settings."""
    p.add_argument('--config', help='YAML with any run settings (overrides method and task YAML) (default: none)')
    p.add_argument('--peft-args', nargs='+', metavar='KEY=VALUE',
                   help='HF PEFT arguments of a peft method, over its YAML peft block; values are YAML, e.g. r=4 '
                        'target_modules=[qkv,proj] (default: none)')
    g = p.add_argument_group('CapaBoost settings (override the method YAML)')
    for f, flag in _capaboost_fields():
        default = f.default
        shown = ' '.join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f'{f.metadata["help"]} (default: {shown}{_range_text(f)})'
        if isinstance(default, bool):
            g.add_argument('--' + flag.replace('_', '-'), dest=flag, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
            continue
        element = type(default[0]) if isinstance(default, tuple) else type(default)
        g.add_argument('--' + flag.replace('_', '-'), dest=flag, type=element, choices=f.metadata.get('choices'),
                       nargs=f.metadata.get('nargs'), default=None, help=help_text)


def _overrides(args: argparse.Namespace, task: str, method: Optional[str], seed: Optional[int]) -> Dict[str, Any]:
    out = {name: getattr(args, name, None) for name in FIELDS if FIELDS[name].metadata.get('cli', True)}
    out.update(task=task, method=method, seed=seed)
    capaboost = {f.name: getattr(args, flag) for f, flag in _capaboost_fields() if getattr(args, flag) is not None}
    if capaboost:
        out['capaboost'] = capaboost
    if args.peft_args:
        out['peft'] = _key_values(args.peft_args, '--peft-args', 'r=4')
    return out


def _key_values(items: List[str], flag: str, example: str) -> Dict[str, Any]:
    """``r=4 alpha=8`` -> {'r': 4, 'alpha': 8} (each value read as YAML); RunError naming ``flag``."""
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise RunError(f'{flag} {item!r}: expected KEY=VALUE, e.g. {example}')
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RunError(f'{flag} {item!r}: the value is not valid YAML') from None
    return out


def _check_method(cfg: RunConfig, where: str) -> None:
    from .methods import check_method  # torch: only once every torch-free check has passed
    check_method(cfg, where)


def build_run_config(args: argparse.Namespace, task: str, method: Optional[str], seed: Optional[int],
                     **changes: Any) -> RunConfig:
    """The resolved config of one run of ``args`` (``changes``: settings a sweep or search sets per run)."""
    return resolve_config({**_overrides(args, task, method, seed), **changes}, args.config, _check_method)


def cmd_train(args: argparse.Namespace) -> int:
    if args.run:  # a planned run: exactly its file
        given = sorted(k for k, v in _overrides(args, args.task, args.method, args.seed).items() if v is not None)
        if given or args.config:
            raise RunError(f'--run runs {args.run} exactly as planned: other settings ({", ".join(given) or "--config"}'
                           f') are not allowed with it')
        cfg = planned_config(Path(args.run))
    else:
        cfg = build_run_config(args, args.task, args.method, args.seed)  # bad settings answer before torch loads
    from .engine import train
    train(cfg)
    return 0


def _split_settings(args: argparse.Namespace, cfg: Optional[RunConfig] = None):
    """The split settings of the data flags, else of ``cfg`` (a run's), else the defaults."""
    from .sources import SplitSettings
    base = SplitSettings.of(cfg) if cfg is not None else SplitSettings()
    given = {name: getattr(args, name) for name in SplitSettings.__dataclass_fields__
             if getattr(args, name) is not None}
    return SplitSettings(**{**base.__dict__, **given})


def cmd_check(args: argparse.Namespace) -> int:
    from .sources import check_source, open_source, source_warnings
    root = Path(args.data_path) if args.data_path else None
    if root is not None and not root.is_dir():
        raise RunError(f'--data-path {root} does not exist or is not a folder')
    if args.tasks == ['all'] and root is None:
        raise RunError('--data-path is required to check all VTAB-1k tasks (or name the task folders with --tasks)')
    bad = 0
    with tempfile.TemporaryDirectory(prefix='capaboost-check-') as tmp:  # an HF dataset's arrow files
        for name in expand_tasks(args.tasks, root):
            source = open_source(name, args.data_path or '', _split_settings(args), Path(tmp))
            print(f'{source.task.name}: {source.describe_layout()}, {source.task.num_classes} classes')
            for split in check_source(source):
                status = 'ok' if not split.problem_count else f'{split.problem_count} problem(s)'
                print(f'{source.task.name:22s} {split.split:15s} {split.lines:6d} images  {status}')
                counts = ', '.join(f'{source.label_names[c]}: {n}' for c, n in sorted(split.class_counts.items()))
                print(f'    per class: {counts}' if counts else '    per class: none')
                for problem in split.problems:
                    print(f'    {problem}')
                bad += split.problem_count
            for warning in source_warnings(source):
                print(f'    warning: {warning}')
    print('all tasks ok' if not bad else f'{bad} problem(s) found')
    return 1 if bad else 0


def make_launcher(settings: LaunchSettings, output: Path, in_process: Callable[[List[str]], int]) -> 'Launcher':
    """The launcher ``--launcher`` names; RunError (one line) when its package or scheduler is missing here."""
    if settings.launcher == 'local':
        from .launch import LocalLauncher
        return LocalLauncher(settings, in_process)
    from ..extras import require
    require({'slurm': 'submitit', 'ray': 'ray'}[settings.launcher], f'--launcher {settings.launcher}')
    if settings.launcher == 'slurm':
        from .slurm import SlurmLauncher as launcher_class
    else:
        from .ray_runs import RayLauncher as launcher_class
    return launcher_class(settings, output)


def _each_once(values: List[Any], flag: str) -> List[Any]:
    """``values``, or RunError for one given twice (after expansion: a task alias and its name are one task), which
    would plan the same runs twice."""
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise RunError(f'{flag}: {twice} is given twice: name each once')
    return values


def _grid(args: argparse.Namespace) -> List[str]:
    """The tasks of a sweep or search (``--tasks`` expanded), each of tasks, methods and seeds given once."""
    _each_once(args.methods, '--methods')
    _each_once(args.seeds, '--seeds')
    return _each_once(expand_tasks(args.tasks, Path(args.data_path) if args.data_path else None), '--tasks')


def cmd_sweep(args: argparse.Namespace) -> int:
    """task x method x seed; on GPUs, ``--runs-per-gpu`` runs at once on each; finished runs are skipped."""
    settings = _launch_settings(args)
    tasks = _grid(args)
    configs = [build_run_config(args, task, method, seed, resume=True)  # every run validated before any
               for task in tasks for method in args.methods for seed in args.seeds]  # starts (or torch loads)
    from .launch import pending_runs
    launcher = make_launcher(settings, Path(configs[0].output), main)
    failures = launcher.run(pending_runs(configs))
    if failures:
        print(f'{len(failures)} run(s) did not finish:\n  ' + '\n  '.join(failures), file=sys.stderr)
        return 1
    print(f'all {len(configs)} run(s) finished')
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Per task and method: lr grid on train800 -> val200 (extended at an edge), then the chosen lr on
    train800val200 -> test for every seed."""
    from .search import SearchJob, records_markdown, search
    bad_lr = next((lr for lr in args.lrs if not in_range(lr, FIELDS['lr'].metadata['range'])), None)
    if bad_lr is not None:
        raise RunError(f'--lrs {bad_lr:g} is invalid: every rate must lie in {FIELDS["lr"].metadata["range"]}')
    if not 0 <= args.max_extensions <= 100:
        raise RunError(f'--max-extensions {args.max_extensions} is invalid: an integer in [0, 100] is required (grid '
                       f'steps added in each direction)')
    settings = _launch_settings(args)
    tasks = _grid(args)
    jobs = []
    for task in tasks:
        for method in args.methods:
            output = Path(build_run_config(args, task, method, args.seeds[0]).output)  # every run validated first
            jobs.append(SearchJob(task, method, sorted(set(args.lrs))))
    from .launch import pending_runs, results_of  # torch loads once every run is validated
    from .run_folder import run_directory

    def plan(request: Dict[str, Any]) -> RunConfig:
        return build_run_config(args, request['task'], request['method'], request['seed'], lr=request['lr'],
                                protocol=request['protocol'], name=request['name'], resume=True)

    def record_dir(job: SearchJob) -> Path:
        return run_directory(build_run_config(args, job.task, job.name, args.seeds[0])).parent.parent.parent / \
            'search'

    launcher = make_launcher(settings, output, main)
    records = search(jobs, args.seeds, args.seeds[0], args.max_extensions,
                     lambda requests: launcher.run(pending_runs([plan(r) for r in requests])),
                     lambda request: results_of(plan(request)), record_dir)
    family = record_dir(jobs[0]).parent.parent.name  # <output>/<family>/<task>/search
    print(records_markdown([dict(r, family=family) for r in records.values()]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import collect, write_report
    from .run_folder import check_output_file
    from .search import read_records
    runs_dir = Path(args.runs_dir)
    prefix = Path(args.prefix or runs_dir / 'report')
    check_output_file(prefix, '--prefix')  # the report rewrites its own files, never a run's
    comparisons, pairing = None, ''
    if args.compare and args.compare_pairing:
        raise RunError('--compare and --compare-pairing choose the pairs two ways: pass one of them')
    if args.compare:  # computed, and refused on bad pairs, before anything is written
        from .compare import compare
        comparisons = compare(collect(runs_dir), args.compare)
    if args.compare_pairing:
        from .compare import compare
        from .curve import PAIRINGS, curve_points, pairs
        results, pairing = collect(runs_dir), PAIRINGS[args.compare_pairing]
        found = pairs(curve_points(results)[0], args.compare_pairing)
        if not found:
            raise RunError(f'--compare-pairing {args.compare_pairing}: no CapaBoost-LoRA row of {runs_dir} has its '
                           f'LoRA partner (pairs at {pairing})')
        comparisons = [c for candidate, baseline in found for c in compare(results, [candidate, baseline])]
    paths = write_report(runs_dir, prefix)
    if comparisons:
        from .compare import write_comparison
        paths.update(write_comparison(comparisons, read_records(runs_dir), prefix, pairing))
    for kind, path in paths.items():
        print(f'{kind}: {path}')
    return 0


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument('--weights', help='base weights file (.safetensors, or .pth read with weights_only=True) '
                                     '(default: a run folder\'s own, else the hub id the adapter records)')
    p.add_argument('--batch-size', type=int, default=field_default(FIELDS['eval_batch_size']),
                   help='images per forward pass (default: %(default)s, the runs\' evaluation batch size)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (default: auto)')
    p.add_argument('--workers', type=int, default=0, help='data loader workers (default: 0)')


def _device(name: str):
    """The torch device of --device (one process: the GPU when there is one for auto)."""
    from .loop import Distributed
    if name not in ('auto', 'cpu', 'cuda') and not name.startswith('cuda:'):
        raise RunError(f'--device {name!r} is invalid: choose auto, cpu, cuda or cuda:N')
    return Distributed(name).device


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5 of an adapter on a task split, with the difference from what its card or results.json states."""
    from .inference import check_fits, load_trained, logits_over, topk_accuracy
    from .sources import open_source
    if args.batch_size < 1:
        raise RunError(f'--batch-size {args.batch_size} is invalid: at least 1')
    trained = load_trained(args.adapter, args.weights)
    cfg = trained.run_config
    task = args.task or (cfg.task if cfg is not None else None)
    if not task:
        raise RunError(f'--task is required: {args.adapter} is not a run folder (whose task would be the default)')
    data_path = args.data_path if args.data_path is not None else (cfg.data_path if cfg and not args.task else '')
    device = _device(args.device)
    with tempfile.TemporaryDirectory(prefix='capaboost-eval-') as tmp:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        source = open_source(task, data_path, _split_settings(args, cfg), cache_dir / 'hfds')
        check_fits(trained, source, args.adapter)
        dataset = source.dataset(args.split, trained.img_size)
        logits, labels = logits_over(trained.model, dataset, trained, device, args.batch_size, cache_dir,
                                     args.workers)
    top1, top5 = topk_accuracy(logits, labels, 1), topk_accuracy(logits, labels, 5)
    print(f'{args.adapter} on {source.task.name} {args.split} ({len(labels)} images, {trained.img_size} px): '
          f'top-1 {top1:.2f}%  top-5 {top5:.2f}%')
    from ..card import dataset_name
    names = {source.task.name, dataset_name(source.task.name, source.task.group)}
    for claim in trained.claims:
        if claim.dataset in names and claim.split == args.split:
            print(f'stated: {claim.top1:.2f}% top-1 ({claim.dataset}, {claim.split} split): difference '
                  f'{round(top1 - claim.top1, 6) + 0.0:+.2f}')  # + 0.0: no '-0.00'
    if not any(c.dataset in names and c.split == args.split for c in trained.claims):
        print(f'stated: no result for {source.task.name} {args.split} in the adapter\'s card or results')
    return 0


def _is_adapter_source(item: str) -> bool:
    """True for ``hf-hub:...`` and for a folder holding an adapter (config.json) or a run (config.yaml)."""
    return item.startswith('hf-hub:') or any((Path(item) / name).is_file() for name in ('config.json', 'config.yaml'))


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k class names and probabilities per image (printed; CSV with --output), for one adapter or several on one
    backbone (the leading arguments that are adapters: ``predict A B C images/``)."""
    from .inference import files_split, image_files, load_trained, load_trained_together, logits_over, \
        write_predictions
    from .run_folder import check_output_file
    if args.top_k < 1 or args.batch_size < 1:
        raise RunError(f'--top-k {args.top_k} and --batch-size {args.batch_size} must be at least 1')
    if args.output:
        check_output_file(Path(args.output), '--output', replace=args.overwrite)
    adapters, items = [args.adapter], list(args.images)
    while len(items) > 1 and _is_adapter_source(items[0]):
        adapters.append(items.pop(0))
    files = image_files(items)
    if len(adapters) == 1:  # one adapter: LoRA merged into the weights, zero extra cost
        together = [load_trained(args.adapter, args.weights, merged=True)]
    else:  # several: one backbone, each adapter set in turn
        from ..multi import set_adapter
        together = load_trained_together(adapters, args.weights)
    groups = []
    for adapter, trained in zip(adapters, together):
        if len(together) > 1:
            set_adapter(trained.model, trained.adapter_name)
        logits, _ = logits_over(trained.model, files_split(files, trained.img_size), trained, _device(args.device),
                                args.batch_size, None, args.workers)
        groups.append((adapter, logits.softmax(-1), trained.label_names))
    for row, f in enumerate(files):
        cells = []
        for adapter, probs, names in groups:
            top = probs[row].topk(min(args.top_k, len(names)))
            cells.append(('' if len(groups) == 1 else f'[{adapter}] ') +
                         '  '.join(f'{names[i]} {v:.3f}' for v, i in zip(top.values.tolist(), top.indices.tolist())))
        print(f'{f}  ' + '  '.join(cells))
    if args.output:
        write_predictions(Path(args.output), files, groups, args.top_k)
        print(f'predictions: {args.output}')
    return 0


def load_run_adapter(run_dir: Path):
    """The CapaBoost model of a finished run folder with its trained adapter on a random backbone: for tools that
    read only the adapter (rank, the offline suite's rank column)."""
    import json
    import yaml
    from ..hub import load_adapter
    from .methods import kind_of
    for name in ('config.yaml', 'results.json', 'config.json'):
        if not (run_dir / name).is_file():
            raise RunError(f'{run_dir / name} does not exist: expected a finished CapaBoost run folder')
    try:
        cfg = RunConfig.from_dict(yaml.safe_load((run_dir / 'config.yaml').read_text()))
        results = json.loads((run_dir / 'results.json').read_text())
    except (TypeError, ValueError, yaml.YAMLError) as e:
        raise RunError(f'{run_dir} does not hold a readable run config/results ({type(e).__name__})') from None
    kind = kind_of(cfg)
    if not kind.has_capaboost_adapter:
        raise RunError(f'{run_dir} is a {cfg.form!r} run: only CapaBoost runs have a CapaBoost adapter'
                       + (' (an HF PEFT run folder loads with peft.PeftModel.from_pretrained)'
                          if (run_dir / 'adapter_config.json').is_file() else ''))
    cfg.pretrained, cfg.weights = False, ''
    return load_adapter(kind.build(cfg, results['num_classes']), run_dir, check_base=False), results


def cmd_push(args: argparse.Namespace) -> int:
    """Push a finished run's adapter folder (config.json, adapter, model card with its results) as it is."""
    from ..hub import push_folder_to_hub
    run_dir = Path(args.run_dir)
    if not (run_dir / 'results.json').is_file():
        raise RunError(f'{run_dir} is not a finished run folder (no results.json)')
    if (run_dir / 'adapter_config.json').is_file():
        raise RunError(f'{run_dir} holds an HF PEFT baseline (adapter_config.json), not a CapaBoost adapter: push '
                       f'it with PeftModel.push_to_hub or huggingface_hub.upload_folder')
    print(push_folder_to_hub(run_dir, args.repo_id, private=args.private, revision=args.revision))
    return 0


def cmd_from_checkpoint(args: argparse.Namespace) -> int:
    """A state dict or timm train.py checkpoint of a CapaBoost model, written as an adapter folder."""
    from ..checkpoint import model_from_checkpoint
    from ..hub import save_adapter
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RunError(f'--output {output} exists and is not an empty folder: choose a new folder')
    kwargs = _key_values(args.model_kwargs or [], '--model-kwargs', 'img_size=224')
    bad = next((key for key in kwargs if not key.isidentifier()), None)
    if bad is not None:
        raise RunError(f'--model-kwargs {bad!r}: a keyword argument name is required, e.g. img_size=224')
    model = model_from_checkpoint(args.checkpoint, args.model, args.num_classes, **kwargs)
    save_adapter(model, output, repo_id=output.name)
    print(f'adapter: {output} ({(output / "adapter.safetensors").stat().st_size / 1e6:.2f} MB, '
          f'{model.pretrained_cfg["architecture"]}, {model.num_classes} classes, base {model.capaboost_base_weights})')
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """Singular values and effective rank of ΔW per updated layer (the form says what its ΔW is), printed and
    plotted."""
    from ..rank import rank_table, singular_values
    if args.source.startswith('hf-hub:'):
        from ..hub import create_model_from_hub
        model = create_model_from_hub(args.source, pretrained=False)
    else:
        model = load_run_adapter(Path(args.source))[0]
    try:
        rows = rank_table(model, args.threshold)
    except ValueError as e:  # a form without a weight update
        raise RunError(f'{args.source}: {e}') from None
    if not rows:
        raise RunError(f'{args.source} has no updated layers to take singular values of')
    print(f'| layer | max rank d*r | effective rank (entropy) | rank (sigma > {args.threshold:g} max) |')
    print('|---|---|---|---|')
    for r in rows:
        print(f"| {r['layer']} | {r['max_rank']} | {r['entropy']:.2f} | {r['threshold']} |")
    print(f'mean effective rank {sum(r["entropy"] for r in rows) / len(rows):.2f} over {len(rows)} layers')
    if args.plot:
        from .report import save_singular_value_plot
        save_singular_value_plot(singular_values(model), Path(args.plot), title=args.source)
        print(f'plot: {args.plot}')
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download the base weights of ``--model`` into the Hugging Face cache (on a cluster's login node), so that jobs
    on offline compute nodes run with HF_HUB_OFFLINE=1; each is loaded once to prove the file is complete."""
    import timm
    from huggingface_hub import try_to_load_from_cache
    from .building import base_model_name, family_of, is_registered_family
    for model in args.model:
        name = base_model_name(family_of(model)) if is_registered_family(model) else model
        timm.create_model(name, pretrained=True, num_classes=0)
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
        files = [try_to_load_from_cache(hub_id, f) for f in ('model.safetensors', 'open_clip_pytorch_model.bin',
                                                              'pytorch_model.bin')] if hub_id else []
        where = next((f for f in files if isinstance(f, str)), "timm's download cache")
        print(f'{model}: {name} -> {where}')
    print('jobs can now run with HF_HUB_OFFLINE=1 (same HF_HOME / HF_HUB_CACHE as here)')
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it (the settings' flags, whose argparse default is None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if '(default:' in (action.help or '') else super()._get_help_string(action)


def _parser_with(parent: argparse.ArgumentParser):
    """A subparser class that inherits ``parent``'s flags."""
    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, parents=[parent], **kwargs)
    return SubParser


def make_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsHelp
    parser = argparse.ArgumentParser(prog='capaboost-vtab', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    debug = argparse.ArgumentParser(add_help=False)  # --debug before or after the command
    debug.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                       help='show the full traceback of an error (default: off; or set CAPABOOST_DEBUG=1)')
    parser._add_container_actions(debug)
    sub = parser.add_subparsers(dest='command', required=True, parser_class=_parser_with(debug))

    p = sub.add_parser('check', help='integrity of tasks: VTAB-1k lists, image folders, HF datasets')
    p.add_argument('--tasks', nargs='+', default=['all'], help='task names, task folders, hfds/... or "all" '
                                                               '(default: all)')
    _add_flags(p, list(DATA_FLAGS))
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser('train', help='one run: task x model x method x seed')
    p.add_argument('--run', metavar='CONFIG_YAML', help='run exactly this planned config.yaml (what sweep and search '
                                                        'write in a run folder): no method or task YAML is layered '
                                                        'under it (default: none)')
    _add_run_flags(p, ('train', 'run'))
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser('sweep', help='grid of tasks x methods x seeds (finished runs are skipped)', formatter_class=fmt)
    p.add_argument('--tasks', nargs='+', required=True, help='task names or "all"')
    p.add_argument('--methods', nargs='+', required=True, help=', '.join(method_names()))
    p.add_argument('--seeds', nargs='+', type=int, default=[0], help='training seeds')
    _add_launch_flags(p)
    _add_run_flags(p, ('run',))
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser('search', formatter_class=fmt,
                       help='lr search per task and method on train800 -> val200, then final runs with the chosen lr')
    p.add_argument('--tasks', nargs='+', required=True, help='task names or "all"')
    p.add_argument('--methods', nargs='+', required=True, help=', '.join(method_names()))
    p.add_argument('--lrs', nargs='+', type=float, default=[1e-3, 3e-3, 1e-2], help='the starting grid')
    p.add_argument('--max-extensions', type=int, default=2,
                   help='grid steps added at most in each direction when the best rate sits at an edge')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2],
                   help='final-run seeds; the first one is also the search seed')
    _add_launch_flags(p)
    _add_run_flags(p, ('run',))
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser('report', help='aggregate results.json files into the standard table and plot',
                       formatter_class=fmt)
    p.add_argument('runs_dir', help='an --output folder')
    p.add_argument('--prefix', help='output path prefix (default: <runs_dir>/report)')
    p.add_argument('--compare', nargs='+', metavar='ROW',
                   help='candidate row (a method name of the report) then one or more baselines: paired test top-1 '
                        'differences over tasks (t-interval, bootstrap, sign test, per VTAB group), cost and lr '
                        'sensitivity, in <prefix>_compare.{md,csv} and <prefix>_compare_lr.png (default: none)')
    p.add_argument('--compare-pairing', choices=['equal-params', 'equal-rank'],
                   help='instead of --compare: pair every CapaBoost-LoRA row with its LoRA row at equal stored '
                        'parameters (rank r vs r) or at equal rank of the update (rank r, d masks vs d*r); the '
                        'output says which (default: none)')
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser('push', help="push a finished run's adapter and model card to the Hugging Face Hub",
                       formatter_class=fmt)
    p.add_argument('run_dir', help='a run folder <output>/<model>/<task>/<method>/seed<N>')
    p.add_argument('--repo-id', required=True, help='org/name')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', help='branch to push to, created if missing (default: main)')
    p.set_defaults(fn=cmd_push)

    p = sub.add_parser('from-checkpoint', help='turn a state dict or timm train.py checkpoint of a CapaBoost model '
                                               'into an adapter folder', formatter_class=fmt)
    p.add_argument('checkpoint', help='a .safetensors state dict, or a torch checkpoint (timm train.py\'s '
                                      'checkpoint-N.pth.tar / model_best.pth.tar, read with weights_only=True)')
    p.add_argument('--output', required=True, help='a new (or empty) folder for config.json, adapter.safetensors '
                                                   'and the model card')
    p.add_argument('--model', help='the CapaBoost model name (default: the checkpoint\'s arch)')
    p.add_argument('--num-classes', type=int, help='classes of the head (default: the checkpoint\'s args)')
    p.add_argument('--model-kwargs', nargs='+', metavar='KEY=VALUE',
                   help='create_model keywords it was trained with, e.g. img_size=224 rank=4 (default: the '
                        'checkpoint\'s args.model_kwargs)')
    p.set_defaults(fn=cmd_from_checkpoint)

    p = sub.add_parser('eval', help='top-1/top-5 of an adapter on a task split, beside the result its model card '
                                    'or run states')
    p.add_argument('adapter', help='a run folder (CapaBoost or HF PEFT), an adapter folder, or hf-hub:org/repo[@rev]')
    p.add_argument('--task', help='task name, task folder or hfds/... (default: a run folder\'s own task)')
    p.add_argument('--split', help='split to evaluate (default: test)', default='test')
    _add_inference_flags(p)
    _add_flags(p, list(DATA_FLAGS) + ['cache_dir'])
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser('predict', help='classify image files with an adapter (LoRA merged into the weights)',
                       formatter_class=fmt)
    p.add_argument('adapter', help='a run folder (CapaBoost or HF PEFT), an adapter folder, or hf-hub:org/repo[@rev]')
    p.add_argument('images', nargs='+', help='image files, folders (searched recursively) or glob patterns; '
                                             'further adapters first (predict A B C images/: one backbone, one '
                                             'group of columns per adapter)')
    p.add_argument('--top-k', type=int, default=5, help='classes per image')
    p.add_argument('--output', help='write a CSV (path, label_i, prob_i) here (default: print only); never into a '
                                    'run or adapter folder')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --output file')
    _add_inference_flags(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser('fetch', formatter_class=fmt,
                       help='download base weights into the Hugging Face cache for offline compute nodes')
    p.add_argument('--model', nargs='+', default=[field_default(FIELDS['model'])],
                   help='CapaBoost model families or timm model names, as --model of train takes them')
    p.set_defaults(fn=cmd_fetch)

    p = sub.add_parser('rank', help='singular values and effective rank of the learned LoRA updates',
                       formatter_class=fmt)
    p.add_argument('source', help='a finished run folder, or hf-hub:org/repo[@revision]')
    p.add_argument('--threshold', type=float, default=1e-3, help='relative singular-value threshold')
    p.add_argument('--plot', help='write a PNG of the singular values per layer to this path (default: none)')
    p.set_defaults(fn=cmd_rank)
    return parser


def _one_line(error: Exception, network: bool) -> str:
    """The error's first line; for a Hub or network failure, what it means and the way out (``explain_hub_error``,
    imported only then: it loads torch)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    if network or isinstance(error, (HfHubHTTPError, LocalEntryNotFoundError, ConnectionError)):
        from ..hub import explain_hub_error
        return explain_hub_error(error)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _user_errors() -> tuple:
    """Exception types that are the user's input, shown as one line (imported only once a command runs)."""
    from huggingface_hub.errors import HfHubHTTPError
    from ..extras import MissingExtra
    return RunError, ValueError, OSError, HfHubHTTPError, MissingExtra


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    debug = getattr(args, 'debug', False) or bool(os.environ.get('CAPABOOST_DEBUG'))
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # outside a run's training loop (a run stops with Stopped, below)
        print('interrupted; the last finished epoch is checkpointed (use --resume)', file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, Stopped) and not debug:
            print(f'error: {e}', file=sys.stderr)
            return 128 + e.signum
        network = type(e).__module__.split('.')[0].startswith('httpx')  # huggingface_hub's HTTP client's errors
        if debug or not (isinstance(e, _user_errors()) or network):
            raise
        print(f'error: {_one_line(e, network)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
