"""Adapter-only repos: save/load locally, push to and load from the Hugging Face Hub, export to stock PEFT.

A repo (or folder) holds ``config.json`` in timm's format (its ``pretrained_cfg`` names the BASE weights; its
``model_args`` carry every CapaBoost setting) plus a ``capaboost`` block with the format version,
``adapter.safetensors`` (CapaBoost parameters, masks, head — never the frozen backbone) and a model card.
Only JSON and safetensors are ever read back.
"""
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, \
    RevisionNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf

from ._io import atomic_path, write_text_atomic
from .tuner import head_module, is_capaboost_key, model_family
from .lora import CapaBoostLoRALinear
from .masks import pack_mask, unpack_mask

FORMAT_VERSION = 1
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'adapter.safetensors'
# settings that must agree between an adapter file and the model it is loaded into (masks travel in the file)
_MATCHING_KEYS = ('method', 'num_masks', 'rank', 'lora_alpha', 'target_modules', 'adapter_bottleneck',
                  'adapter_scale', 'adapter_placement', 'prompt_length', 'prompt_rank')


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the model is left untouched."""


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """CapaBoost parameters and masks plus the classifier head: everything an adapter file holds."""
    state = {k: v for k, v in model.state_dict().items() if is_capaboost_key(k)}
    head_prefix = 'head.' if model_family(model) == 'vit' else 'head.fc.'
    state.update({head_prefix + k: v for k, v in head_module(model).state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _capaboost_config(model: nn.Module):
    config = getattr(model, 'capaboost_config', None)
    if config is None:
        raise AdapterError('model has no CapaBoost applied (no capaboost_config); build it with a *_capaboost_* '
                           'name or apply_capaboost first')
    return config


def base_weights_id(model: nn.Module) -> str:
    """The base weights' hub id recorded in the model's pretrained cfg (e.g. timm/vit_base_patch16_224.orig_in21k)."""
    import timm
    cfg = model.pretrained_cfg
    arch, tag = cfg.get('architecture'), cfg.get('tag')
    registered = timm.models.get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    return (registered.hf_hub_id if registered else None) or cfg.get('hf_hub_id') or ''


def _model_card(model: nn.Module, repo_id: str, results: Optional[Dict[str, Any]], size: int) -> ModelCard:
    config = _capaboost_config(model)
    arch = model.pretrained_cfg['architecture']
    base = base_weights_id(model)
    tags = ['capaboost', 'peft', 'vtab-1k', config.method, 'image-classification', 'timm']
    eval_results = None
    if results and results.get('top1') is not None:
        from huggingface_hub import EvalResult
        eval_results = [EvalResult(task_type='image-classification', dataset_type='vtab-1k',
                                   dataset_name=f'VTAB-1k {results["task"]}', metric_type='accuracy',
                                   metric_value=float(results['top1']), dataset_split=results.get('eval_split'))]
    data = ModelCardData(library_name='timm', base_model=base or None, tags=tags, license='apache-2.0',
                         model_name=repo_id.split('/')[-1], eval_results=eval_results)
    settings = '\n'.join(f'| `{k}` | `{v}` |' for k, v in config.to_dict().items())
    capaboost_params = sum(v.numel() for k, v in model.named_parameters() if is_capaboost_key(k))
    result_text = ''
    if results:
        result_text = (f'\n## Evaluation\n\nVTAB-1k `{results["task"]}` ({results.get("protocol", "final")} '
                       f'protocol, {results.get("eval_split", "test")} split, last epoch, seed {results.get("seed")}): '
                       f'**{results["top1"]:.2f}%** top-1 after {results.get("epochs")} epochs.\n')
    content = f"""---
{data.to_yaml()}
---

# {repo_id.split('/')[-1]}

A CapaBoost-{config.method} adapter (ICLR 2024, "Increasing Model Capacity for Free") for the timm model
`{arch}`, base weights [`{base}`](https://huggingface.co/{base}). The repo holds only the adapter:
{capaboost_params:,} CapaBoost parameters plus the classifier head and the static masks, {size / 1e6:.2f} MB
(`{WEIGHTS_NAME}`). The base weights load from their own source.

## How to load

```python
import timm, capaboost_vision
m = timm.create_model('hf-hub:{repo_id}', pretrained=True)
# or: timm.create_model('{arch}', pretrained=True, adapter='hf-hub:{repo_id}', num_classes={model.num_classes})
```

## CapaBoost settings

| setting | value |
|---|---|
{settings}
{result_text}"""
    return ModelCard(content)


def save_adapter(model: nn.Module, folder: Union[str, Path], results: Optional[Union[str, Path, dict]] = None,
                 label_names: Optional[Sequence[str]] = None, repo_id: Optional[str] = None) -> Path:
    """Write config.json, adapter.safetensors and README.md (model card) into ``folder``; each file atomically."""
    config = _capaboost_config(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    state = adapter_state_dict(model)
    packed = {k: list(v.shape) for k, v in state.items() if v.dtype == torch.bool}
    state.update({k: pack_mask(state[k]) for k in packed})  # masks as bits: 8x smaller than bool bytes
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={'format': 'capaboost', 'version': str(FORMAT_VERSION),
                                        'packed_masks': json.dumps(packed)})
    model_config: Dict[str, Any] = {
        'pretrained_cfg': {'hf_hub_id': base_weights_id(model)},
        'capaboost': {'format_version': FORMAT_VERSION, 'weights': WEIGHTS_NAME, 'config': config.to_dict()},
    }
    if label_names:
        model_config['label_names'] = list(label_names)
    model_args = getattr(model, '_model_args', {})
    model._model_args = {k: v for k, v in model_args.items() if k != 'adapter'}  # the repo IS the adapter
    try:
        with atomic_path(folder / CONFIG_NAME) as tmp:
            save_config_for_hf(model, tmp, model_config=model_config)
    finally:
        model._model_args = model_args
    card = _model_card(model, repo_id or folder.name, results, (folder / WEIGHTS_NAME).stat().st_size)
    write_text_atomic(folder / 'README.md', str(card))
    return folder


def _fetch(source: str, filename: str) -> Path:
    """A file of an adapter source: a local folder, or ``hf-hub:org/repo[@revision]`` (cache-aware, offline-aware)."""
    if not source.startswith('hf-hub:'):
        path = Path(source) / filename
        if not path.is_file():
            raise AdapterError(f'{path} does not exist (adapter source {source!r} must be a folder holding '
                               f'{CONFIG_NAME} and {WEIGHTS_NAME}, or hf-hub:org/repo[@revision])')
        return path
    repo_id, _, revision = source[len('hf-hub:'):].partition('@')
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except RepositoryNotFoundError:
        raise AdapterError(f'adapter repo {repo_id} does not exist on the Hub (or is private: log in with '
                           '`hf auth login` or set HF_TOKEN)') from None
    except RevisionNotFoundError:
        raise AdapterError(f'adapter repo {repo_id} has no revision {revision!r}') from None
    except LocalEntryNotFoundError:
        raise AdapterError(f'cannot fetch {filename} of {repo_id}: no network and not in the Hugging Face cache. '
                           'Connect once (without HF_HUB_OFFLINE=1) to fill the cache, or load from a local folder '
                           '(save_adapter / snapshot_download)') from None
    except EntryNotFoundError:  # LocalEntryNotFoundError subclasses it, so it is caught first, above
        raise AdapterError(f'adapter repo {repo_id} has no file {filename}') from None


def load_adapter(model: nn.Module, source: Union[str, Path]) -> nn.Module:
    """Load an adapter (folder or ``hf-hub:org/repo[@rev]``) into a CapaBoost model, all or nothing.

    Checks the format version, the architecture, the CapaBoost settings and every key and shape before copying
    anything, so a bad adapter leaves the model exactly as it was.
    """
    source = str(source)
    config = _capaboost_config(model)
    config_file = _fetch(source, CONFIG_NAME)
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f'{config_file} is not valid JSON ({e})') from None
    block = meta.get('capaboost') or {}
    if block.get('format_version') != FORMAT_VERSION:
        raise AdapterError(f'{config_file}: unknown capaboost format_version {block.get("format_version")!r} '
                           f'(this version reads {FORMAT_VERSION})')
    expected_arch, found_arch = model.pretrained_cfg.get('architecture'), meta.get('architecture')
    if expected_arch != found_arch:
        raise AdapterError(f'adapter is for architecture {found_arch!r}, the model is {expected_arch!r}')
    if meta.get('num_classes') != model.num_classes:
        raise AdapterError(f'adapter has num_classes={meta.get("num_classes")}, the model has {model.num_classes}; '
                           f'build the model with num_classes={meta.get("num_classes")}')
    saved = block.get('config', {})
    mine = config.to_dict()
    diffs = [f'{k}: model has {mine[k]!r}, adapter has {saved.get(k)!r}' for k in _MATCHING_KEYS
             if saved.get(k) != mine[k]]
    if diffs:
        raise AdapterError('adapter settings do not match the model: ' + '; '.join(diffs))
    weights_file = _fetch(source, block.get('weights', WEIGHTS_NAME))
    try:
        state = load_file(str(weights_file))
        with safe_open(str(weights_file), 'pt') as f:
            packed = json.loads((f.metadata() or {}).get('packed_masks', '{}'))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f'{weights_file} is not a readable safetensors file ({e})') from None
    for key, shape in packed.items():
        if key in state:
            if state[key].dtype != torch.uint8 or state[key].numel() != -(-math.prod(shape) // 8):
                raise AdapterError(f'{weights_file}: packed mask {key} does not hold {shape} bits')
            state[key] = unpack_mask(state[key], shape)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f'{weights_file} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}')
    for key, value in state.items():
        if value.shape != expected[key].shape or value.dtype.is_floating_point != expected[key].dtype.is_floating_point:
            raise AdapterError(f'{weights_file}: {key} has shape {tuple(value.shape)} ({value.dtype}), '
                               f'the model expects {tuple(expected[key].shape)} ({expected[key].dtype})')
    model.load_state_dict(state, strict=False)
    return model


def push_adapter_to_hub(model: nn.Module, repo_id: str, results: Optional[Union[str, Path, dict]] = None,
                        private: bool = False, revision: Optional[str] = None, token: Optional[str] = None,
                        label_names: Optional[Sequence[str]] = None,
                        commit_message: str = 'Upload CapaBoost adapter') -> str:
    """Create (or reuse) ``repo_id`` and upload the adapter folder; returns the commit URL.

    The token comes from huggingface_hub's usual sources (``token=``, HF_TOKEN, ``hf auth login``); never logged.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, results=results, label_names=label_names, repo_id=repo_id)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(getattr(info, 'commit_url', info))


def export_peft(model: nn.Module, folder: Union[str, Path]) -> Path:
    """Write a stock PEFT LoRA adapter for the plain timm base model (CapaBoost-LoRA only).

    The CapaBoost update is linear, so it IS a rank-d*r LoRA with factors A_cat, B_cat. PEFT scales by
    lora_alpha / r_peft; with r_peft = d*r we set lora_alpha = (alpha / r) * d * r to reproduce alpha / r.
    """
    config = _capaboost_config(model)
    if config.method != 'lora':
        raise AdapterError(f'export_peft needs method="lora", the model has method={config.method!r}')
    folder = Path(folder)
    state: Dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, CapaBoostLoRALinear):
            a_cat, b_cat = module.masked_factors()
            state[f'base_model.model.{name}.lora_A.weight'] = a_cat.detach().contiguous().cpu()
            state[f'base_model.model.{name}.lora_B.weight'] = b_cat.detach().contiguous().cpu()
    head_name = 'head' if model_family(model) == 'vit' else 'head.fc'
    for k, v in head_module(model).state_dict().items():
        state[f'base_model.model.{head_name}.{k}'] = v.detach().contiguous().cpu()
    peft_rank = config.num_masks * config.rank
    adapter_config = {
        'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': base_weights_id(model) or None,
        'r': peft_rank, 'lora_alpha': config.scaling * peft_rank, 'lora_dropout': config.lora_dropout,
        'target_modules': list(config.target_modules), 'modules_to_save': [head_name], 'bias': 'none',
        'fan_in_fan_out': False, 'init_lora_weights': True, 'inference_mode': True, 'use_rslora': False,
        'use_dora': False,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / 'adapter_model.safetensors') as tmp:
        save_file(state, tmp)
    write_text_atomic(folder / 'adapter_config.json', json.dumps(adapter_config, indent=2))
    return folder
