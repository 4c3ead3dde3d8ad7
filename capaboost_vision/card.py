"""The model card of an adapter repo: one writer for every path that makes one (``save_adapter``, a run folder,
``push_adapter_to_hub``, ``capaboost-vtab push``), built from the adapter's own config.json and weights so it
states what the repo holds, under the repo id it is pushed to.

The card follows the Hub's conventions: YAML metadata (``library_name: timm``, ``base_model`` when the base
weights are a Hub repo, ``pipeline_tag``, tags, ``datasets`` where known, a ``model-index`` with the evaluated
split's top-1 and top-5), then how to use it (every line runs as written), the settings of the adapter's form only,
the evaluation and its provenance.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import VTAB_GROUPS, CapaBoostConfig, setting_defaults
from .forms import COMMON_MATCHING_KEYS, FORMS, can_merge
from .tuner import is_capaboost_key


def dataset_name(task: str, group: Optional[str]) -> str:
    """How a card names the data a result is on: 'VTAB-1k cifar' for the 19 tasks' groups, else the task name."""
    return f'VTAB-1k {task}' if group in VTAB_GROUPS else task


@dataclass
class CardResult:
    """A result a model card states: dataset name, split and top-1 (%)."""
    dataset: str
    split: Optional[str]
    top1: float


TOP1, TOP5 = 'top-1 accuracy', 'top-5 accuracy'


def results_of_card(card: ModelCard) -> List[CardResult]:
    """The top-1 results a card's metadata states."""
    return [CardResult(r.dataset_name, r.dataset_split, float(r.metric_value)) for r in card.data.eval_results or []
            if r.metric_type == 'accuracy' and (r.metric_name or TOP1) == TOP1]


def form_settings(config: CapaBoostConfig) -> Dict[str, Any]:
    """The settings that mean something for ``config``'s form: the shared ones and its own section (a config holds
    no other), N:M only for N:M masks."""
    return {k: v for k, v in config.to_dict().items() if k != 'nm' or config.mask_type == 'nm'}


def load_kwargs(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments ``timm.create_model(<architecture>, adapter=...)`` needs for this adapter: its classes,
    its input size when not the architecture's default, and the shape-giving settings that are not defaults
    (mask density, seed and type travel with the masks in the file)."""
    config = meta['capaboost']['config']
    defaults = setting_defaults()
    kwargs: Dict[str, Any] = {'num_classes': meta['num_classes']}
    registered = timm.models.get_pretrained_cfg(meta['architecture'])
    size = list((meta.get('pretrained_cfg') or {}).get('input_size') or [])[1:]
    if registered is not None and size and size != list(registered.input_size[1:]):
        kwargs['img_size'] = size[0] if size[0] == size[1] else size
    for key in COMMON_MATCHING_KEYS + FORMS[config['method']].matching_keys:
        default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]  # as JSON holds it
        if key != 'method' and key in config and config[key] != default:
            kwargs[key] = config[key]
    return kwargs


def _arguments(kwargs: Dict[str, Any]) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


def _usage(meta: Dict[str, Any], repo_id: str) -> str:
    """The "how to use" code: every line runs as written once the base weights are where the card says."""
    arch, block = meta['architecture'], meta['capaboost']
    base, mergeable = block.get('base_weights') or '', can_merge(block['config']['method'])
    local = base.startswith('file:')
    base_arg = ', pretrained_cfg_overlay=dict(file=BASE)' if local else ''
    lines = ['import timm, capaboost_vision  # pip install capaboost-vision (registers the CapaBoost models in timm)',
             'from timm.data import create_transform, resolve_data_config']
    if local:
        lines.append(f"BASE = '{base[len('file:'):]}'  # path to the base weights file this adapter was trained on")
    lines += [f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True{base_arg}).eval()",
              'transform = create_transform(**resolve_data_config({}, model=model))  # the training preprocessing',
              "print(model.pretrained_cfg.get('label_names'))  # the class names, in output order",
              '# the same adapter loaded onto the registered architecture',
              f"model = timm.create_model('{arch}', pretrained=True{base_arg}, adapter='hf-hub:{repo_id}',",
              f"                          {_arguments(load_kwargs(meta))}).eval()",
              ]
    if base != 'random-init':  # a random base is rebuilt by its run only (capaboost-vtab eval)
        lines.append(f"clf = capaboost_vision.load_classifier('hf-hub:{repo_id}'" + (', weights=BASE)' if local else ')')
                     + '  # model, transform and class names in one')
    if mergeable:
        lines += ['merged = capaboost_vision.merge(model)  # a plain timm model: the update folded into the weights',
                  "# timm.models.push_to_hf_hub(merged, 'org/merged-model') ships it to users without this package"]
    return '\n'.join(lines)


def _provenance_text(block: Optional[Dict[str, Any]]) -> str:
    """The card's account of what produced the result (results.json's ``provenance``)."""
    if not isinstance(block, dict):
        return ''
    versions = ', '.join(f'{k} {v}' for k, v in (block.get('versions') or {}).items() if v)
    hardware = block.get('hardware') or {}
    where = hardware.get('gpu') or f'{hardware.get("cpu")} ({hardware.get("cpu_capability")}, ' \
                                   f'{hardware.get("threads")} threads)'
    data = ', '.join(f'{split} `{(digest or "?")[:16]}`' for split, digest in (block.get('data_sha256') or {}).items())
    commit = f'; code at commit `{block["git_commit"]}`' if block.get('git_commit') else ''
    return (f'\n## Provenance\n\nTrained with {versions}, on {where}, autocast {hardware.get("amp") or "off (fp32)"}'
            f'{commit}. Data (SHA-256 of each split\'s list and image bytes): {data or "not recorded"}. The same '
            f'command on the same machine kind gives bit-identical results; other hardware or thread counts give '
            f'slightly different floats.\n')


def _eval_results(results: Dict[str, Any]) -> List[EvalResult]:
    common = dict(task_type='image-classification', dataset_name=dataset_name(results['task'], results.get('group')),
                  dataset_type=results.get('hub_dataset') or ('vtab-1k' if results.get('group') in VTAB_GROUPS
                                                               else 'custom'),
                  dataset_split=results.get('eval_split'), metric_type='accuracy')
    out = [EvalResult(metric_name=TOP1, metric_value=float(results['top1']), **common)]
    if results.get('top5') is not None:
        out.append(EvalResult(**dict(common, metric_type='top-5-accuracy'), metric_name=TOP5,
                              metric_value=float(results['top5'])))
    return out


def _evaluation_text(results: Dict[str, Any]) -> str:
    top5 = f', {results["top5"]:.2f}% top-5' if results.get('top5') is not None else ''
    text = (f'\n## Evaluation\n\n{dataset_name(results["task"], results.get("group"))} '
            f'({results.get("protocol", "final")} protocol, {results.get("eval_split", "test")} split, last epoch, '
            f'seed {results.get("seed")}): **{results["top1"]:.2f}%** top-1{top5} after {results.get("epochs")} '
            f'epochs.\n')
    if results.get('img_size') and results.get('mean'):
        norm = f'`--norm {results["norm"]}`, ' if results.get('norm') else ''
        text += (f'\nInputs: squash-resized to {results["img_size"]} px (bicubic, no crop), normalised with {norm}mean '
                 f'{results["mean"]} and std {results.get("std")}; recorded in config.json, so timm\'s '
                 f'`resolve_data_config` on the loaded model gives this preprocessing.\n')
    names = results.get('label_names') or []
    if names:
        shown = ', '.join(f'`{n}`' for n in names[:20]) + (f' and {len(names) - 20} more' if len(names) > 20 else '')
        text += f'\nClasses ({len(names)}, in output order; `label_names` in config.json): {shown}.\n'
    if results.get('source'):
        text += f'\nData: {results["source"]}, split sizes {results.get("split_sizes")}.\n'
    return text + _provenance_text(results.get('provenance'))


def adapter_card(meta: Dict[str, Any], state: Dict[str, torch.Tensor], weights_size: int, repo_id: str,
                 results: Optional[Dict[str, Any]] = None) -> ModelCard:
    """The model card of the adapter whose config.json is ``meta`` and whose tensors are ``state``, pushed as
    ``repo_id``; ``results`` (a run's results.json) adds the evaluation."""
    block = meta['capaboost']
    config = CapaBoostConfig.from_record(block['config'])
    arch = meta['architecture']
    base, fingerprint = block.get('base_weights') or 'unknown', block.get('base_fingerprint')
    hub_base = base if '/' in base and not base.startswith('file:') else None  # base_model takes a Hub id only
    if hub_base:
        base_text = f'[`{hub_base}`](https://huggingface.co/{hub_base})'
    elif base.startswith('file:'):
        base_text = (f'the local file `{base[len("file:"):]}` (fingerprint `{fingerprint}`; not on the Hub: pass '
                     f'its path as below)')
    else:
        base_text = f'`{base}`'
    vtab = results is not None and results.get('group') in VTAB_GROUPS
    tags = ['capaboost', f'capaboost-{config.method}', 'peft', 'image-classification', 'timm'] + (['vtab-1k'] if vtab
                                                                                                   else [])
    datasets = [results['hub_dataset']] if results and results.get('hub_dataset') else None
    data = ModelCardData(library_name='timm', base_model=hub_base, pipeline_tag='image-classification', tags=tags,
                         datasets=datasets, license=(meta.get('pretrained_cfg') or {}).get('license') or 'apache-2.0',
                         model_name=repo_id, eval_results=_eval_results(results) if results else None)
    settings = '\n'.join(f'| `{k}` | `{v}` |' for k, v in form_settings(config).items())
    capaboost = sum(v.numel() for k, v in state.items() if is_capaboost_key(k) and v.is_floating_point())
    head = sum(v.numel() for k, v in state.items() if not is_capaboost_key(k))
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A {FORMS[config.method].summary.split(' (')[0]} adapter ("Increasing Model Capacity for Free", ICLR 2024) for the timm model `{arch}`,
base weights {base_text}. The repo holds only the adapter ({weights_size / 1e6:.2f} MB): {capaboost:,} CapaBoost
parameters, the {head:,}-parameter classifier head and the static masks. The base weights load from their own
source.

## How to use

```python
{_usage(meta, repo_id)}
```

## CapaBoost settings

| setting | value |
|---|---|
{settings}
{_evaluation_text(results) if results else ''}"""
    return ModelCard(content)
