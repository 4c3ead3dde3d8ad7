"""Using a trained adapter: ``eval`` re-checks the accuracy an adapter (a run folder, an adapter folder or an
``hf-hub:`` repo) states, ``predict`` classifies image files with it.

Both read images through the training pipeline (``data.load_resized`` then ``to_float_normalized``, the size and
normalisation from the adapter's config), so ``eval`` on a run's own split reproduces the run's top-1 exactly
(same model code, unmerged, fp32 on CPU, same batch size). ``predict`` folds a LoRA update into the weights first.
"""
import csv
import glob
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml
from torchvision.datasets.folder import IMG_EXTENSIONS

from .._io import atomic_path
from ..classifier import load_classifier
from ..card import CardResult, dataset_name
from ..hub import CONFIG_NAME, card_results
from .data import ImageSplit, Sample
from .data_cache import make_loader, prepare_split
from .run_config import RunConfig, RunError
from .sources import TaskSource
from ..extras import require


@dataclass
class Trained:
    """A trained classifier and what it was trained with."""
    model: nn.Module
    label_names: Tuple[str, ...]
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    claims: List[Any] = field(default_factory=list)  # hub.CardResult: what its card or results.json states
    run_config: Optional[RunConfig] = None  # a run folder's config
    adapter_name: str = 'default'  # its adapter on ``model`` (several adapters on one backbone: ``set_adapter``)


def _run_config(folder: Path) -> Optional[RunConfig]:
    """The config.yaml of a run folder (None for an adapter folder or repo)."""
    path = folder / 'config.yaml'
    if not path.is_file():
        return None
    try:
        return RunConfig.from_dict(yaml.safe_load(path.read_text()))
    except (TypeError, ValueError, yaml.YAMLError) as e:
        raise RunError(f'{path} is not a readable run config ({type(e).__name__})') from None


def _results_claims(folder: Path) -> Tuple[List[Any], Dict[str, Any]]:
    path = folder / 'results.json'
    if not path.is_file():
        return [], {}
    from .report import read_results
    try:
        results = read_results(path)  # validated, naming the file
    except ValueError as e:
        raise RunError(str(e)) from None
    names = results.get('label_names')
    if names is not None and not (isinstance(names, list) and len(names) == results.get('num_classes')
                                  and all(isinstance(n, str) for n in names)):
        raise RunError(f'{path}: label_names must be a list of its num_classes ({results.get("num_classes")!r}) '
                       f'names')
    return [CardResult(dataset_name(results['task'], results.get('group')), results.get('eval_split'),
                       float(results['top1']))], results


def _rebuilt_run(folder: Path, cfg: RunConfig, weights: Optional[str], merged: bool) -> Trained:
    """A finished run folder rebuilt as its run built it (same seed, base weights, random init included), then its
    trained weights loaded: a CapaBoost adapter, or an HF PEFT baseline's PEFT weights."""
    from ..hub import load_adapter
    from ..forms import can_merge
    from ..tuner import merge
    from .building import base_of, create
    from .methods import kind_of
    claims, results = _results_claims(folder)
    if not results:
        raise RunError(f'{folder} holds no results.json: expected a finished run folder')
    kind = kind_of(cfg)
    cfg.weights = weights or cfg.weights
    if cfg.weights and not Path(cfg.weights).is_file():
        raise RunError(f'--weights {cfg.weights}: file does not exist (the run\'s base weights; pass --weights)')
    torch.manual_seed(cfg.seed)  # as the engine does before building: a random-init base comes out the same
    if kind.has_capaboost_adapter:
        model = load_adapter(kind.build(cfg, results['num_classes']), folder)
        model = merge(model) if merged and can_merge(cfg.form) else model
    elif (folder / 'adapter_config.json').is_file():
        model = require('peft', f'{folder} (an HF PEFT run)').PeftModel.from_pretrained(create(cfg, base_of(cfg), results['num_classes']), str(folder))
        model = model.merge_and_unload() if merged else model
    else:
        raise RunError(f'{folder} is a {cfg.form!r} run: only CapaBoost and HF PEFT runs are adapters')
    names = tuple(results.get('label_names') or (str(i) for i in range(results['num_classes'])))
    return Trained(model.eval(), names, int(results['img_size']), tuple(results['mean']), tuple(results['std']),
                   claims, cfg)


def load_trained(source: str, weights: Optional[str] = None, merged: bool = False) -> Trained:
    """The classifier of ``source``: a finished run folder (rebuilt from its config.yaml: CapaBoost or HF PEFT), an
    adapter folder or ``hf-hub:org/repo[@rev]`` (base weights from ``weights``, else the hub id it records)."""
    folder = Path(source)
    local = not source.startswith('hf-hub:')
    if local and not folder.is_dir():
        raise RunError(f'adapter {source} is neither a folder nor hf-hub:org/repo[@revision]')
    cfg = _run_config(folder) if local else None
    if cfg is not None:
        return _rebuilt_run(folder, cfg, weights, merged)
    if local and not (folder / CONFIG_NAME).is_file():
        raise RunError(f'{folder} holds no {CONFIG_NAME} (a CapaBoost adapter) nor config.yaml (a run folder)')
    clf = load_classifier(source, weights=weights, merged=merged)
    return Trained(clf.model, clf.label_names, clf.img_size, clf.mean, clf.std, card_results(source))


def load_trained_together(sources: Sequence[str], weights: Optional[str] = None) -> List[Trained]:
    """Several CapaBoost adapters on one backbone, built once: the first source as ``load_trained`` builds it
    (unmerged), every other one loaded beside it by name (``multi.load_together``, so they must share its base
    weights and shape settings). Each Trained shares the one model and has its own classes and preprocessing;
    ``set_adapter(model, trained.adapter_name)`` before using it."""
    from ..multi import data_config, load_together
    for source in sources[1:]:
        if not source.startswith('hf-hub:') and not (Path(source) / CONFIG_NAME).is_file():
            raise RunError(f'{source} holds no {CONFIG_NAME}: only CapaBoost adapters share one backbone')
    first = load_trained(sources[0], weights, merged=False)
    if not hasattr(first.model, 'capaboost_config'):
        raise RunError(f'{sources[0]} is not a CapaBoost adapter: only CapaBoost adapters share one backbone')
    names = load_together(first.model, sources)
    return [first] + [Trained(first.model, *data_config(first.model, name), adapter_name=name) for name in names[1:]]


def check_fits(trained: Trained, source: TaskSource, adapter: str) -> None:
    """RunError when the task's classes are not the adapter's: another count, or other names in another order."""
    task = source.task
    if len(trained.label_names) != task.num_classes:
        raise RunError(f'adapter {adapter} has {len(trained.label_names)} classes, task {task.name} has '
                       f'{task.num_classes}: evaluate it on the task it was trained for')
    numbered = tuple(str(i) for i in range(task.num_classes))
    if numbered not in (trained.label_names, source.label_names) and trained.label_names != source.label_names:
        diff = next(i for i, (a, b) in enumerate(zip(trained.label_names, source.label_names)) if a != b)
        raise RunError(f'adapter {adapter} class {diff} is {trained.label_names[diff]!r}, task {task.name} class '
                       f'{diff} is {source.label_names[diff]!r}: the classes differ or are in another order')


def logits_over(model: nn.Module, dataset: ImageSplit, trained: Trained, device: torch.device, batch_size: int,
                cache_dir: Optional[Path], workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) float32 on the CPU, labels (N,)) of every image of ``dataset``, in its order; from the decoded
    cache when ``cache_dir`` is given, else decoded as read."""
    data = prepare_split(dataset, cache_dir, int(8e9), None, show_progress=False) if cache_dir else dataset
    loader = make_loader(data, batch_size, range(len(data)), device, trained.mean, trained.std, workers)
    outputs, labels = [], []
    model.to(device).eval()
    with torch.no_grad():
        for x, y in loader:
            outputs.append(model(x).float().cpu())
            labels.append(y.cpu())
    return torch.cat(outputs), torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Top-k accuracy (%)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * int((top == labels[:, None]).any(dim=1).sum()) / max(len(labels), 1)  # as loop.evaluate


def image_files(items: Sequence[str]) -> List[Path]:
    """Files, folders (their image files, recursively, sorted) and globs, in the order given; RunError for a path
    that does not exist, a glob that matches nothing, or a folder without images."""
    files: List[Path] = []
    for item in items:
        path = Path(item)
        if any(c in item for c in '*?[') and not path.exists():
            matched = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matched:
                raise RunError(f'{item}: the pattern matches no file')
            files += matched
        elif path.is_dir():
            found = sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise RunError(f'{item}: the folder holds no image files ({", ".join(IMG_EXTENSIONS)})')
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise RunError(f'{item}: no such file or folder')
    return files


def files_split(files: Sequence[Path], img_size: int) -> ImageSplit:
    """The files as a split (labels unknown: -1) for the training pipeline's decode path."""
    samples = [Sample(str(f.resolve()), -1, i + 1) for i, f in enumerate(files)]
    text = ''.join(f'{s.path} -1\n' for s in samples).encode()
    return ImageSplit(Path('/'), Path('images.txt'), text, samples, img_size, listed=False)


def write_predictions(path: Path, files: Sequence[Path], groups: Sequence[Tuple[str, torch.Tensor, Sequence[str]]],
                      k: int) -> None:
    """CSV: path, then for each (adapter, probabilities (N, C), class names) of ``groups`` its label_i and prob_i for
    the top ``k`` classes (columns prefixed '<adapter>:' when there are several); written atomically."""
    out = io.StringIO()
    writer = csv.writer(out)
    prefix = [f'{adapter}:' if len(groups) > 1 else '' for adapter, _, _ in groups]
    writer.writerow(['path'] + [f'{p}{col}_{i}' for p, (_, probs, names) in zip(prefix, groups)
                                for i in range(1, min(k, len(names)) + 1) for col in ('label', 'prob')])
    tops = [(probs.topk(min(k, len(names)), dim=1), names) for _, probs, names in groups]
    for row, f in enumerate(files):
        writer.writerow([str(f)] + [x for top, names in tops for v, i in zip(top.values[row].tolist(),
                                                                             top.indices[row].tolist())
                                    for x in (names[i], f'{v:.6f}')])
    with atomic_path(path) as tmp:
        Path(tmp).write_text(out.getvalue())
