"""Adapter-only repos: save/load locally, push to and load from the Hugging Face Hub, export to stock PEFT.

A repo (or folder) holds ``config.json`` in timm's format (its ``pretrained_cfg`` names the BASE weights; its
``model_args`` carry every CapaBoost setting) plus a ``capaboost`` block with the format version,
``adapter.safetensors`` (CapaBoost parameters, masks, head — never the frozen backbone) and a model card.
Only JSON and safetensors are ever read back.
"""
import hashlib
import json
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, \
    RepositoryNotFoundError, RevisionNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf

from ._io import atomic_path, write_text_atomic
from .card import CardResult, adapter_card, results_of_card
from .config import MAX_CLASSES, CapaBoostConfig, config_keys, in_range
from .forms import COMMON_MATCHING_KEYS, FORMS
from .backbones import backbone_of, transformer_blocks
from .tuner import head_module, head_name, is_capaboost_key
from .lora import CapaBoostLoRALinear
from .masks import is_all_ones_mask, pack_mask, unpack_mask

FORMAT_VERSION = 1
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'adapter.safetensors'


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the model is left untouched."""


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """CapaBoost parameters and masks plus the classifier head: everything an adapter file holds."""
    state = {k: v for k, v in model.state_dict().items() if is_capaboost_key(k)}
    state.update({f'{head_name(model)}.{k}': v for k, v in head_module(model).state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _capaboost_config(model: nn.Module):
    config = getattr(model, 'capaboost_config', None)
    if config is None:
        raise AdapterError('model has no CapaBoost applied (no capaboost_config); build it with a *_capaboost_* '
                           'name or apply_capaboost first')
    return config


def base_weights_id(model: nn.Module) -> str:
    """What the base weights actually are: the hub id they were loaded from, ``file:<name>`` for a local file, or
    ``random-init`` (``pretrained=False``). Recorded by ``create_capaboost`` when the model is built."""
    return getattr(model, 'capaboost_base_weights', None) or registered_base_id(model)


def registered_base_id(model: nn.Module) -> str:
    """The hub id of the base weights registered for the architecture (where ``hf-hub:`` loading fetches them)."""
    cfg = model.pretrained_cfg
    arch, tag = cfg.get('architecture'), cfg.get('tag')
    registered = timm.models.get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    return (registered.hf_hub_id if registered else None) or cfg.get('hf_hub_id') or ''


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of a few fixed base tensors (the first three and last three base parameters, head excluded):
    tells two base checkpoints apart without hashing the whole backbone."""
    head = set(head_module(model).parameters())
    base = [(n, p) for n, p in model.named_parameters() if not is_capaboost_key(n) and p not in head]
    digest = hashlib.sha256()
    for name, p in base[:3] + base[-3:]:
        digest.update(name.encode())
        digest.update(p.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def refuse_non_finite(state: Dict[str, torch.Tensor], action: str, where: str = '') -> None:
    """AdapterError when any floating tensor of ``state`` holds NaN/inf: a diverged adapter is never saved,
    pushed or loaded."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterError(f'{where}refusing to {action} an adapter with non-finite values ({len(bad)} tensors, '
                           f'e.g. {bad[0]}): the training diverged')


def card_results(source: Union[str, Path]) -> List[CardResult]:
    """The results the model card (README.md) of an adapter folder or ``hf-hub:`` repo states in its metadata; []
    when it has no card or states none."""
    try:
        card = ModelCard.load(_fetch(str(source), 'README.md'))
    except (AdapterError, ValueError, OSError):
        return []
    return results_of_card(card)


def save_adapter(model: nn.Module, folder: Union[str, Path], results: Optional[Union[str, Path, dict]] = None,
                 label_names: Optional[Sequence[str]] = None, repo_id: Optional[str] = None) -> Path:
    """Write config.json, adapter.safetensors and README.md (model card) into ``folder``; each file atomically."""
    config = _capaboost_config(model)
    state = adapter_state_dict(model)
    refuse_non_finite(state, 'save')
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    packed = {k: list(v.shape) for k, v in state.items() if v.dtype == torch.bool}
    state.update({k: pack_mask(state[k]) for k in packed})  # masks as bits: 8x smaller than bool bytes
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={'format': 'capaboost', 'version': str(FORMAT_VERSION),
                                        'packed_masks': json.dumps(packed)})
    model_config: Dict[str, Any] = {
        'pretrained_cfg': {'hf_hub_id': registered_base_id(model)},
        'capaboost': {'format_version': FORMAT_VERSION, 'weights': WEIGHTS_NAME, 'config': config.to_dict(),
                      'base_weights': base_weights_id(model), 'base_fingerprint': base_fingerprint(model)},
    }
    if results and results.get('mean') and results.get('std'):  # the normalisation the adapter was trained with
        model_config['pretrained_cfg'].update(mean=tuple(results['mean']), std=tuple(results['std']))
    if results and results.get('img_size'):  # and its squash-resize, so timm's resolve_data_config gives it
        model_config['pretrained_cfg'].update(input_size=(3, results['img_size'], results['img_size']),
                                              interpolation='bicubic', crop_pct=1.0, crop_mode='squash')
    label_names = label_names or model.pretrained_cfg.get('label_names')  # a loaded adapter keeps its classes
    if label_names:
        model_config['label_names'] = list(label_names)
    model_args, pretrained_cfg = getattr(model, '_model_args', {}), model.pretrained_cfg
    model._model_args = {k: v for k, v in model_args.items() if k != 'adapter'}  # the repo IS the adapter
    # class names travel at the top level (timm reads them from there into pretrained_cfg)
    model.pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in BASE_ONLY_CFG_KEYS}
    try:
        with atomic_path(folder / CONFIG_NAME) as tmp:
            save_config_for_hf(model, tmp, model_config=model_config)
    finally:
        model._model_args, model.pretrained_cfg = model_args, pretrained_cfg
    write_card(folder, repo_id or folder.name, results)
    return folder


def write_card(folder: Path, repo_id: str, results: Optional[Dict[str, Any]] = None) -> None:
    """README.md of an adapter folder: the card of what its config.json and weights hold, as ``repo_id``."""
    adapter = read_adapter(folder)
    card = adapter_card(adapter.meta, adapter.state, adapter.weights_file.stat().st_size, repo_id, results)
    write_text_atomic(folder / 'README.md', str(card))


def explain_hub_error(error: Exception) -> str:
    """One line for a Hub failure, with the way out (network, cache, token); other errors: their first line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, LocalEntryNotFoundError):
        return ('cannot fetch from the Hugging Face Hub: no network (or HF_HUB_OFFLINE=1) and not in the local cache. '
                'Connect once without HF_HUB_OFFLINE=1 to fill the cache, or use a local folder')
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        if status in (401, 403):
            return (f'the Hugging Face Hub refused the request ({status}): {text}. Check your token: set HF_TOKEN '
                    'or run `hf auth login`')
        return f'the Hugging Face Hub answered an error: {text}'
    if type(error).__module__.startswith('httpx') or isinstance(error, ConnectionError):
        return (f'cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(error).__name__}: {text}); '
                'check the network, HF_ENDPOINT, or work offline from a local folder')
    return text


def _fetch(source: str, filename: str) -> Path:
    """A file of an adapter source: a local folder, or ``hf-hub:org/repo[@revision]`` (cache-aware, offline-aware).

    ``filename`` is resolved inside the folder or repo only: a name with a path in it is refused.
    """
    if Path(filename).name != filename or filename in ('', '.', '..'):
        raise AdapterError(f'adapter file name {filename!r} is invalid: a plain file name inside the adapter folder '
                           f'is required')
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
        raise AdapterError(f'cannot fetch {filename} of {repo_id}: no network and not in the Hugging Face cache '
                           f'(not in the local cache at {constants.HF_HUB_CACHE}). Connect once (without '
                           f'HF_HUB_OFFLINE=1) to fill the cache, or load from a local folder (save_adapter / '
                           f'snapshot_download)') from None
    except EntryNotFoundError:  # LocalEntryNotFoundError subclasses it, so it is caught first, above
        raise AdapterError(f'adapter repo {repo_id} has no file {filename}') from None


@dataclass
class AdapterFile:
    """What an adapter source holds, read and schema-checked, not yet applied."""
    source: str
    config_file: Path
    weights_file: Path
    meta: Dict[str, Any]
    config: CapaBoostConfig
    state: Dict[str, torch.Tensor]


def _schema_error(config_file: Path, what: str) -> AdapterError:
    return AdapterError(f'{config_file} is not a CapaBoost adapter config: {what}')


def _sizes(low: int) -> Callable[[Any], bool]:
    """An integer, or a list of integers, in [low, 65536] (image, patch and window sizes, widths, depths, heads)."""
    def ok(value: Any) -> bool:
        values = value if isinstance(value, (list, tuple)) and 0 < len(value) <= 64 else [value]
        return all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= 65536 for v in values)
    return ok


# The timm ViT/Swin constructor arguments a saved config.json may carry in model_args, each with what it allows.
# Anything else (adapter=, pretrained_cfg_overlay=, a file or URL) is refused: a repo is someone else's data.
BASE_MODEL_ARGS: Dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(('img_size', 'patch_size', 'window_size', 'embed_dim', 'depth', 'depths', 'num_heads',
                     'in_chans'), _sizes(1)),
    'reg_tokens': _sizes(0),
    'num_classes': lambda v: isinstance(v, int) and in_range(v, f'[0, {MAX_CLASSES}]'),
    **dict.fromkeys(('drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate',
                     'patch_drop_rate'), lambda v: in_range(v, '[0, 1)')),
    **dict.fromkeys(('class_token', 'no_embed_class', 'dynamic_img_size', 'dynamic_img_pad', 'qkv_bias',
                     'pre_norm'), lambda v: isinstance(v, bool)),
    'global_pool': lambda v: v in ('', 'token', 'avg', 'avgmax', 'max', 'map'),
    'mlp_ratio': lambda v: in_range(v, '(0, 64]'),
    'init_values': lambda v: v is None or in_range(v, '(-inf, inf)'),
}


# What a config.json may hold at its top level (timm's save_config_for_hf, plus our block), and in its pretrained_cfg:
# timm's fields except those that say where weights come from (a repo never chooses a file, URL or state dict).
TOP_LEVEL_KEYS = ('architecture', 'num_classes', 'num_features', 'global_pool', 'label_names', 'label_descriptions',
                  'model_args', 'pretrained_cfg', 'capaboost')
CAPABOOST_KEYS = ('format_version', 'weights', 'config', 'base_weights', 'base_fingerprint')
def _text(value: Any) -> bool:
    """None, a string, or a list of strings (notes, paper ids)."""
    return value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str)
                                                                                      for x in value))


PRETRAINED_CFG_KEYS: Dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(('hf_hub_id', 'tag', 'interpolation', 'classifier', 'first_conv', 'license', 'description',
                     'origin_url', 'paper_name', 'paper_ids', 'notes'), _text),
    **dict.fromkeys(('input_size', 'test_input_size', 'min_input_size'),
                    lambda v: v is None or (isinstance(v, list) and len(v) == 3 and _sizes(1)(v))),
    **dict.fromkeys(('pool_size', 'test_pool_size'), lambda v: v is None or (isinstance(v, list) and _sizes(1)(v))),
    **dict.fromkeys(('mean', 'std'), lambda v: isinstance(v, list) and 0 < len(v) <= 64 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1e4 for x in v)),
    **dict.fromkeys(('crop_pct', 'test_crop_pct'), lambda v: v is None or in_range(v, '(0, 4]')),
    'crop_mode': lambda v: v in ('center', 'squash', 'border'),
    **dict.fromkeys(('fixed_input_size', 'custom_load'), lambda v: isinstance(v, bool)),
    'num_classes': lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CLASSES,
    'label_offset': lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1),
}


def check_repo_config(meta: Any, config_file: Path, building: bool) -> CapaBoostConfig:
    """The schema of an adapter's config.json, checked before anything is built or read from it (a Hub repo's file
    is data from someone else); returns its CapaBoost config. Every key is known and every value of the shape and
    range it must have: ``model_args`` hold CapaBoost settings and bounded timm constructor arguments only, never a
    path, overlay or checkpoint; ``label_names`` one distinct name per class. ``building``: the model itself is
    built from the file (``create_model('hf-hub:...')``, ``load_classifier``), so its architecture must also be a
    registered CapaBoost model."""
    if not isinstance(meta, dict):
        raise _schema_error(config_file, f'a JSON object is required, not {type(meta).__name__}')
    _refuse_unknown_keys(meta, TOP_LEVEL_KEYS, '', config_file)
    block = meta.get('capaboost')
    if not isinstance(block, dict):
        raise _schema_error(config_file, 'the "capaboost" object is missing')
    if block.get('format_version') != FORMAT_VERSION:
        raise AdapterError(f'{config_file}: unknown capaboost format_version {block.get("format_version")!r} '
                           f'(this version reads {FORMAT_VERSION})')
    _refuse_unknown_keys(block, CAPABOOST_KEYS, 'capaboost.', config_file)
    for key, kind in (('architecture', str), ('num_classes', int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise _schema_error(config_file, f'"{key}" must be a {kind.__name__}')
    if not 1 <= meta['num_classes'] <= MAX_CLASSES:
        raise _schema_error(config_file, f'"num_classes" {meta["num_classes"]} is outside [1, {MAX_CLASSES:,}]')
    for key in ('weights', 'base_weights', 'base_fingerprint'):
        if not isinstance(block.get(key, ''), str):
            raise _schema_error(config_file, f'"capaboost.{key}" must be a string')
    saved = block.get('config')
    if not isinstance(saved, dict) or set(saved) - set(config_keys()):
        raise _schema_error(config_file, f'"capaboost.config" must be an object with keys from '
                                         f'{", ".join(config_keys())}')
    try:  # a file from before the per-form sections holds every form's settings: another form's are left out
        config = CapaBoostConfig.from_record(saved)
    except (TypeError, ValueError) as e:
        raise _schema_error(config_file, f'"capaboost.config": {e}') from None
    _check_label_names(meta, config_file)
    _check_model_args(meta.get('model_args', {}), config_file, config.method)
    _check_pretrained_cfg(meta, config_file)
    if building:
        arch = meta['architecture']
        if not (arch.endswith(f'_capaboost_{config.method}') and timm.is_model(arch)):
            raise _schema_error(config_file, f'"architecture" {arch!r} is not a registered CapaBoost-{config.method} '
                                             f'model (timm.list_models("*_capaboost_*"))')
    return config


def _refuse_unknown_keys(block: Dict[str, Any], known: Sequence[str], prefix: str, config_file: Path) -> None:
    unknown = sorted(str(k) for k in set(block) - set(known))
    if unknown:
        raise _schema_error(config_file, f'unknown key "{prefix}{unknown[0]}" (allowed: {", ".join(known)})')


def _check_label_names(meta: Dict[str, Any], config_file: Path) -> None:
    """One distinct, non-empty name per class, in output order (what predict prints and writes)."""
    names = meta.get('label_names')
    if names is None:
        return
    if not (isinstance(names, list) and len(names) == meta['num_classes']
            and all(isinstance(n, str) and n.strip() for n in names)):
        raise _schema_error(config_file, f'"label_names" must be a list of {meta["num_classes"]} non-empty strings '
                                         f'(one per class)')
    if len(set(names)) != len(names):
        raise _schema_error(config_file, f'"label_names" repeats {next(n for n in names if names.count(n) > 1)!r}')
    descriptions = meta.get('label_descriptions', {})
    if not (isinstance(descriptions, dict) and all(isinstance(v, str) for v in descriptions.values())):
        raise _schema_error(config_file, '"label_descriptions" must be an object of strings')


def _check_model_args(model_args: Any, config_file: Path, method: str) -> None:
    """What timm builds the model from: every entry a CapaBoost setting or a bounded timm constructor argument."""
    if not isinstance(model_args, dict):
        raise _schema_error(config_file, '"model_args" must be an object')
    for key, value in model_args.items():
        if key in config_keys() and key != 'method':
            continue
        if key not in BASE_MODEL_ARGS:
            raise _schema_error(config_file, f'"model_args.{key}" is not allowed: model_args hold CapaBoost settings '
                                             f'and timm size/rate arguments only')
        if not BASE_MODEL_ARGS[key](value):
            raise _schema_error(config_file, f'"model_args.{key}" {value!r} is out of range')
    try:
        CapaBoostConfig.from_record({**{k: v for k, v in model_args.items() if k in config_keys()}, 'method': method})
    except (TypeError, ValueError) as e:
        raise _schema_error(config_file, f'"model_args": {e}') from None


def _check_pretrained_cfg(meta: Dict[str, Any], config_file: Path) -> None:
    """timm's data config (sizes, mean/std, crop) in shape and range, no weights location, and a base weights tag
    registered for the architecture."""
    pretrained_cfg = meta.get('pretrained_cfg', {})
    if not isinstance(pretrained_cfg, dict):
        raise _schema_error(config_file, '"pretrained_cfg" must be an object')
    for key, value in pretrained_cfg.items():
        if key not in PRETRAINED_CFG_KEYS:
            raise _schema_error(config_file, f'"pretrained_cfg.{key}" is not allowed (the base weights load from the '
                                             f'architecture\'s own registered tag)')
        if not PRETRAINED_CFG_KEYS[key](value):
            raise _schema_error(config_file, f'"pretrained_cfg.{key}" {value!r} is out of range')
    channels = (pretrained_cfg.get('input_size') or [3])[0]
    for key in ('mean', 'std'):
        if key in pretrained_cfg and len(pretrained_cfg[key]) != channels:
            raise _schema_error(config_file, f'"pretrained_cfg.{key}" must hold {channels} values (one per channel)')
    if 0 in pretrained_cfg.get('std', ()):
        raise _schema_error(config_file, '"pretrained_cfg.std" must be positive')
    arch, tag = meta['architecture'], pretrained_cfg.get('tag')
    if tag is not None and f'{arch}.{tag}' not in timm.list_pretrained(f'{arch}.*'):
        raise _schema_error(config_file, f'"pretrained_cfg.tag" {tag!r} is not a pretrained tag of {arch}')


def check_repo(source: str) -> None:
    """Fetch (or read) the config.json of ``source`` (``hf-hub:org/repo[@rev]`` or a folder) and check it as
    ``check_repo_config(building=True)`` does, before timm builds anything from it."""
    config_file = _fetch(source, CONFIG_NAME)
    check_repo_config(_read_json(config_file), config_file, building=True)


def _read_json(config_file: Path) -> Any:
    try:
        return json.loads(config_file.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f'{config_file} is not valid JSON text ({type(e).__name__})') from None
    except RecursionError:
        raise AdapterError(f'{config_file} is not a CapaBoost adapter config: nested too deeply') from None


def read_adapter(source: Union[str, Path]) -> AdapterFile:
    """Read and validate config.json (schema) and the weights (safetensors, unpacked masks, finite values)."""
    source = str(source)
    config_file = _fetch(source, CONFIG_NAME)
    meta = _read_json(config_file)
    config = check_repo_config(meta, config_file, building=False)
    weights = meta['capaboost'].get('weights', WEIGHTS_NAME)
    weights_file = _fetch(source, weights)
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
    refuse_non_finite(state, 'load', where=f'{weights_file}: ')
    return AdapterFile(source, config_file, weights_file, meta, config, state)


def drop_all_ones_masks(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    """Plain LoRA and adapter files written before plain forms held no masks carry one all-ones mask per factor:
    nothing to apply, so they are dropped; any other mask the model lacks stays an unexpected key."""
    for key in [k for k in state if k not in expected and is_all_ones_mask(state[k])]:
        del state[key]


def check_adapter(model: nn.Module, adapter: AdapterFile, check_base: bool = True, own_head: bool = False) -> None:
    """Architecture, classes, every setting that shapes the model, and every key and shape; warns when the base
    weights differ from the ones the adapter was trained on. ``own_head``: the adapter brings a head of its own class
    count (a named adapter beside others), so only the head's input width must fit."""
    config = _capaboost_config(model)
    expected_arch, found_arch = model.pretrained_cfg.get('architecture'), adapter.meta['architecture']
    if expected_arch != found_arch:
        raise AdapterError(f'adapter is for architecture {found_arch!r}, the model is {expected_arch!r}')
    if adapter.meta['num_classes'] != model.num_classes and not own_head:
        raise AdapterError(f'adapter has num_classes={adapter.meta["num_classes"]}, the model has {model.num_classes}; '
                           f'build the model with num_classes={adapter.meta["num_classes"]}')
    saved, mine = adapter.config.to_dict(), config.to_dict()
    matching = COMMON_MATCHING_KEYS + FORMS[config.method].matching_keys  # masks travel in the file
    diffs = [f'{k}: model has {mine[k]!r}, adapter has {saved.get(k)!r}' for k in matching
             if saved.get(k) != mine[k]]
    if diffs:
        raise AdapterError('adapter settings do not match the model: ' + '; '.join(diffs))
    expected = adapter_state_dict(model)
    drop_all_ones_masks(adapter.state, expected)
    state, weights_file = adapter.state, adapter.weights_file
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f'{weights_file} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}')
    head = f'{head_name(model)}.'
    for key, value in state.items():
        if own_head and key.startswith(head) and value.shape[0] == adapter.meta['num_classes'] \
                and value.shape[1:] == expected[key].shape[1:]:
            continue  # its own classes, the model's feature width
        if value.shape != expected[key].shape or value.dtype.is_floating_point != expected[key].dtype.is_floating_point:
            raise AdapterError(f'{weights_file}: {key} has shape {tuple(value.shape)} ({value.dtype}), '
                               f'the model expects {tuple(expected[key].shape)} ({expected[key].dtype})')
    mismatch = base_mismatch(model, adapter) if check_base else None
    if mismatch:
        warnings.warn(f'{mismatch}: outputs will differ from the adapter\'s reported results', stacklevel=3)


def base_mismatch(model: nn.Module, adapter: AdapterFile) -> Optional[str]:
    """What differs when the model's base weights are not the ones the adapter was trained on (by fingerprint);
    None when they are the same or the adapter records none."""
    block = adapter.meta['capaboost']
    trained_on, fingerprint = block.get('base_weights'), block.get('base_fingerprint')
    current = base_fingerprint(model) if fingerprint else None
    if current == fingerprint:
        return None
    return (f'adapter {adapter.source} was trained on base weights {trained_on!r} (fingerprint {fingerprint}); '
            f'this model has {base_weights_id(model)!r} (fingerprint {current})')


# timm's data config fields an adapter's config.json records (the preprocessing it was trained with)
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')
# fields of the base's pretrained_cfg that describe the base's own training and would be wrong for the adapter
BASE_ONLY_CFG_KEYS = ('test_input_size', 'test_crop_pct', 'test_pool_size', 'label_offset', 'label_names',
                      'label_descriptions')


def adapter_pretrained_cfg(model: nn.Module, meta: Dict[str, Any]) -> Dict[str, Any]:
    """The model's ``pretrained_cfg`` with the adapter's data config (input size, interpolation, crop, mean/std),
    classes and class names: what timm's ``resolve_data_config`` and ``inference.py`` read. The base weights'
    location fields stay (they say where the base came from)."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in BASE_ONLY_CFG_KEYS}
    recorded = meta.get('pretrained_cfg') or {}
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in DATA_CONFIG_KEYS})
    cfg['num_classes'] = meta['num_classes']
    if meta.get('label_names'):
        cfg['label_names'] = tuple(meta['label_names'])
        cfg['label_descriptions'] = meta.get('label_descriptions') or None
    return cfg


def apply_adapter(model: nn.Module, adapter: AdapterFile) -> nn.Module:
    """Copy the checked weights and masks in; the model's CapaBoost config becomes the file's (mask density,
    seed, type travel with the masks), so a later save writes what the model really holds, and its
    ``pretrained_cfg`` the adapter's data config and class names (timm's preprocessing then matches training)."""
    model.load_state_dict(adapter.state, strict=False)
    model.capaboost_config = adapter.config
    recorded = adapter.config.to_dict()
    recorded.pop('method')
    model._model_args = dict(getattr(model, '_model_args', {}), **recorded)
    model.pretrained_cfg = model.default_cfg = adapter_pretrained_cfg(model, adapter.meta)
    return model


def load_adapter(model: nn.Module, source: Union[str, Path], check_base: bool = True) -> nn.Module:
    """Load an adapter (folder or ``hf-hub:org/repo[@rev]``) into a CapaBoost model, all or nothing.

    Reads and validates the files, checks them against the model, then applies them: a bad adapter leaves the
    model exactly as it was. ``check_base=False`` skips the base-weights warning, for tools that only read the
    adapter (rank).
    """
    _capaboost_config(model)
    adapter = read_adapter(source)
    check_adapter(model, adapter, check_base)
    return apply_adapter(model, adapter)


def create_model_from_hub(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)`` for an ``hf-hub:`` adapter repo (random backbone unless ``pretrained``), with
    one-line errors (AdapterError) instead of huggingface_hub's generic ones."""
    check_repo(name)  # one AdapterError line for a missing repo or a config.json that is not ours to build
    try:
        model = timm.create_model(name, **kwargs)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise AdapterError(f'{name}: {explain_hub_error(e)}') from None
    return load_adapter(model, name, check_base=False) if not kwargs.get('pretrained') else model


def _refuse_unregistered(architecture: str) -> None:
    """A repo loads with ``create_model('hf-hub:...')`` only when its architecture is a registered CapaBoost model;
    an adapter trained on a plain timm model (apply_capaboost, ``--model <timm name>``) would load as the bare base
    model, silently without the adapter. Such adapters stay local (``load_adapter``)."""
    if '_capaboost_' not in architecture:
        raise AdapterError(f'cannot push an adapter of the plain timm model {architecture!r}: '
                           f"timm.create_model('hf-hub:...') would build {architecture} without the adapter. Train "
                           f'with a registered CapaBoost family (timm.list_models("*capaboost*")) to push, or load '
                           f'this one locally with load_adapter')


def push_adapter_to_hub(model: nn.Module, repo_id: str, results: Optional[Union[str, Path, dict]] = None,
                        private: bool = False, revision: Optional[str] = None, token: Optional[str] = None,
                        label_names: Optional[Sequence[str]] = None,
                        commit_message: str = 'Upload CapaBoost adapter') -> str:
    """Create (or reuse) ``repo_id`` and upload the adapter folder; returns the commit URL.

    The token comes from huggingface_hub's usual sources (``token=``, HF_TOKEN, ``hf auth login``); never logged.
    """
    _capaboost_config(model)
    _refuse_unregistered(model.pretrained_cfg.get('architecture', ''))
    refuse_non_finite(adapter_state_dict(model), 'push')  # before any request: nothing is created on the Hub
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp, results=results, label_names=label_names, repo_id=repo_id)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
    return str(getattr(info, 'commit_url', info))


def folder_results(folder: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """A run folder's results.json (what its card states), None when the folder has none; AdapterError naming the
    file when it is not a result (not JSON, no task name, no top-1 accuracy in [0, 100])."""
    path = Path(folder) / 'results.json'
    if not path.is_file():
        return None
    results = _read_json(path)
    if not (isinstance(results, dict) and isinstance(results.get('task'), str)
            and in_range(results.get('top1'), '[0, 100]')):
        raise AdapterError(f'{path} is not a run result (a task name and a top1 accuracy in [0, 100] are required)')
    return results


def push_folder_to_hub(folder: Union[str, Path], repo_id: str, private: bool = False,
                       revision: Optional[str] = None, token: Optional[str] = None,
                       commit_message: str = 'Upload CapaBoost adapter') -> str:
    """Upload an adapter folder (e.g. a finished run folder) after the same checks ``load_adapter`` makes (schema,
    finite values): its config.json and weights as they are, and a model card written for ``repo_id`` from them and
    the folder's results.json (the folder's own README.md is not uploaded: it may name another repo). Returns the
    commit URL."""
    adapter = read_adapter(folder)
    _refuse_unregistered(adapter.meta['architecture'])
    card = adapter_card(adapter.meta, adapter.state, adapter.weights_file.stat().st_size, repo_id,
                        folder_results(folder))
    operations = [CommitOperationAdd(CONFIG_NAME, str(adapter.config_file)),
                  CommitOperationAdd(adapter.weights_file.name, str(adapter.weights_file)),
                  CommitOperationAdd('README.md', str(card).encode())]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.create_commit(repo_id=repo_id, operations=operations, revision=revision,
                             commit_message=commit_message)
    return str(getattr(info, 'commit_url', info))


def export_peft(model: nn.Module, folder: Union[str, Path]) -> Path:
    """Write a stock PEFT LoRA (DoRA with ``use_dora``) adapter for the plain timm base model (CapaBoost-LoRA only).

    The CapaBoost update is linear, so it IS a rank-d*r LoRA with factors A_cat, B_cat. PEFT scales by
    lora_alpha / r_peft; with r_peft = d*r we set lora_alpha = (alpha / r) * d * r to reproduce alpha / r.
    """
    config = _capaboost_config(model)
    if FORMS[config.method].peft_type != 'LORA':
        raise AdapterError(f'export_peft needs a form that stock PEFT serves as LoRA (method="lora"), the model has '
                           f'method={config.method!r}')
    backbone = backbone_of(model)
    blocker = backbone.peft_blocker(model)
    if blocker:
        raise AdapterError(f'export_peft: {type(model).__name__} cannot be served by stock PEFT: {blocker}')
    # PEFT's target_modules: the linears each target is in this family ('attn.qkv', or 'attn.q_proj', 'mlp.fc1_g')
    targets = list(dict.fromkeys(linear for _, block in transformer_blocks(model)
                                 for target in config.target_modules for linear in backbone.lora_linears(block, target)))
    folder = Path(folder)
    state: Dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, CapaBoostLoRALinear):
            a_cat, b_cat = module.masked_factors()
            state[f'base_model.model.{name}.lora_A.weight'] = a_cat.detach().contiguous().cpu()
            state[f'base_model.model.{name}.lora_B.weight'] = b_cat.detach().contiguous().cpu()
            if module.use_dora:
                state[f'base_model.model.{name}.lora_magnitude_vector'] = module.lora_magnitude.detach().cpu()
    head = head_name(model)
    for k, v in head_module(model).state_dict().items():
        state[f'base_model.model.{head}.{k}'] = v.detach().contiguous().cpu()
    peft_rank = config.num_masks * config.rank
    adapter_config = {
        'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': registered_base_id(model) or None,
        'r': peft_rank, 'lora_alpha': config.scaling * peft_rank, 'lora_dropout': config.lora_dropout,
        'target_modules': targets, 'modules_to_save': [head], 'bias': 'none',
        'fan_in_fan_out': False, 'init_lora_weights': True, 'inference_mode': True, 'use_rslora': False,
        'use_dora': config.use_dora,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / 'adapter_model.safetensors') as tmp:
        save_file(state, tmp)
    write_text_atomic(folder / 'adapter_config.json', json.dumps(adapter_config, indent=2))
    return folder
