"""Several adapters on one backbone: named adapters loaded beside each other, switched, disabled, deleted, and mixed
in one batch (what HF PEFT's ``set_adapter``, ``disable_adapter`` and ``adapter_names=`` do for its LoRA, here for
every CapaBoost form).

The active adapter's tensors are where a one-adapter model has them, under their usual names, so saving, pushing,
merging and timm's tools see a plain one-adapter model (``using_adapter`` makes another one active for a ``with``
block). Every other adapter's tensors (CapaBoost weights, masks, its own head) are non-persistent buffers of one
``NamedAdapter`` each, in ``model.adapter_bank``: they move with ``model.to()`` and stay out of the model's state dict
and out of what a run saves.

A mixed batch, ``model(x, adapter_names=[...])`` (one name per sample), runs the backbone once: every layer of the
form swaps in its mixed subclass for that forward (the form's ``mixed_layers``: LoRA adds each group's low-rank update
to the one shared base product, the adapter runs each group's bottleneck, prompts are per sample), and the head runs
each group's own head. The adapters of one batch must have the same number of classes.
"""
import contextlib
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .forms import MIXED_LAYERS
from .hub import (AdapterError, adapter_pretrained_cfg, base_mismatch, check_adapter, load_adapter as load_one,
                  read_adapter)
from .tuner import head_module, head_name, is_capaboost_key

DEFAULT_NAME = 'default'
# settings a named adapter may have of its own (its masks travel in its file; the rest only matter in training);
# every other setting shapes or scales the layers all adapters share
OWN_SETTINGS = ('seed', 'mask_type', 'nm', 'lora_init', 'lora_dropout', 'prompt_dropout', 'train_head',
                'autocast_adapter_dtype')


class NamedAdapter(nn.Module):
    """One inactive adapter: its tensors (non-persistent buffers ``t0, t1, ...`` under ``keys``, the model's state
    dict names), its settings, data config and class count."""

    def __init__(self, state: Dict[str, torch.Tensor], config: Any, pretrained_cfg: Dict[str, Any],
                 num_classes: int) -> None:
        super().__init__()
        self.keys = list(state)
        for i, key in enumerate(self.keys):
            self.register_buffer(f't{i}', state[key], persistent=False)
        self.config, self.pretrained_cfg, self.num_classes = config, pretrained_cfg, num_classes

    def state(self) -> Dict[str, torch.Tensor]:
        return {key: getattr(self, f't{i}') for i, key in enumerate(self.keys)}


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter whose tensors the model runs (``'default'`` for a model loaded the one-adapter way)."""
    _config(model)
    return getattr(model, 'capaboost_active_adapter', DEFAULT_NAME)


def list_adapters(model: nn.Module) -> List[str]:
    """Every adapter on the model, in the order they were loaded."""
    _config(model)
    return list(getattr(model, 'capaboost_adapter_names', [active_adapter(model)]))


def _config(model: nn.Module) -> Any:
    config = getattr(model, 'capaboost_config', None)
    if config is None:
        raise ValueError('the model has no CapaBoost applied: named adapters need a CapaBoost model (a '
                         '*_capaboost_* name or apply_capaboost)')
    return config


def _bank(model: nn.Module) -> nn.ModuleDict:
    """The inactive adapters, created with the mixed-batch hooks on first use."""
    if 'adapter_bank' not in model._modules:
        model.adapter_bank = nn.ModuleDict()  # keys 'a0', 'a1', ...: an adapter's name is no part of a tensor's name
        model.capaboost_bank_keys = {}  # adapter name -> its key in the bank
        model.capaboost_adapter_names = [active_adapter(model)]
        model.register_forward_pre_hook(_begin_mixed_batch, with_kwargs=True)
        model.register_forward_hook(_end_mixed_batch, with_kwargs=True, always_call=True)
    return model.adapter_bank


def _stored(model: nn.Module, name: str) -> NamedAdapter:
    if name not in list_adapters(model):
        raise ValueError(f'no adapter named {name!r}: the model has {", ".join(map(repr, list_adapters(model)))}')
    return model.adapter_bank[model.capaboost_bank_keys[name]]


def live_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The active adapter's tensors, by state-dict name (CapaBoost weights and masks, head), on the model's device."""
    state = {k: v for k, v in model.state_dict().items() if is_capaboost_key(k)}
    state.update({f'{head_name(model)}.{k}': v for k, v in head_module(model).state_dict().items()})
    return state


def _like(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` on the device and in the floating dtype of the model's own tensors of the same names."""
    mine = live_state(model)
    return {k: v.to(device=mine[k].device, dtype=mine[k].dtype if v.is_floating_point() else v.dtype).clone()
            for k, v in state.items()}


def load_adapter(model: nn.Module, source: Union[str, Path], adapter_name: Optional[str] = None,
                 check_base: bool = True) -> nn.Module:
    """Load an adapter (folder or ``hf-hub:org/repo[@rev]``). Without ``adapter_name``: into the active adapter, as
    ``hub.load_adapter``. With it: beside the adapters already loaded (same architecture, form and shape settings;
    its own masks, head and class count), not made active (``set_adapter``). All or nothing either way."""
    if adapter_name is None:
        return load_one(model, source, check_base)
    config = _config(model)
    if not isinstance(adapter_name, str) or not adapter_name.strip():
        raise ValueError(f'adapter_name={adapter_name!r} is invalid: a non-empty name is required')
    if adapter_name in list_adapters(model):
        raise ValueError(f'adapter_name={adapter_name!r} is already loaded (delete_adapter first to replace it)')
    adapter = read_adapter(source)
    check_adapter(model, adapter, check_base=False, own_head=True)
    saved, mine = adapter.config.to_dict(), config.to_dict()
    diffs = [f'{k}: model has {mine[k]!r}, adapter has {saved.get(k)!r}' for k in mine
             if k not in OWN_SETTINGS and saved.get(k) != mine[k]]
    if diffs:
        raise AdapterError(f'{source} cannot sit beside the loaded adapters: ' + '; '.join(diffs))
    mismatch = base_mismatch(model, adapter) if check_base else None
    if mismatch:
        raise AdapterError(f'{mismatch}: every named adapter shares the one backbone, so it must have been trained on '
                           f'these base weights')
    bank = _bank(model)
    key = f'a{len(bank)}'
    while key in bank:
        key = f'a{int(key[1:]) + 1}'
    state = _like({k: v for k, v in adapter.state.items() if not k.startswith(f'{head_name(model)}.')}, model)
    head = head_module(model).weight
    state.update({k: v.to(device=head.device, dtype=head.dtype) for k, v in adapter.state.items()
                  if k.startswith(f'{head_name(model)}.')})
    bank[key] = NamedAdapter(state, adapter.config, adapter_pretrained_cfg(model, adapter.meta),
                             adapter.meta['num_classes'])
    model.capaboost_bank_keys[adapter_name] = key
    model.capaboost_adapter_names.append(adapter_name)
    return model


def load_together(model: nn.Module, sources: Sequence[Union[str, Path]]) -> List[str]:
    """``model`` holds ``sources[0]`` (active); load every other source beside it, named by the source as given. The
    adapter names in the order of ``sources``; all or nothing (those loaded before a failure are removed)."""
    names = [str(s) for s in sources]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise AdapterError(f'adapter {twice} is given twice')
    loaded: List[str] = []
    try:
        for source, name in zip(sources[1:], names[1:]):
            load_adapter(model, source, adapter_name=name)
            loaded.append(name)
    except BaseException:
        for name in loaded:
            delete_adapter(model, name)
        raise
    return [active_adapter(model)] + loaded


class DataConfig(NamedTuple):
    """What an adapter was trained with besides its tensors: class names in output order, and the preprocessing
    (squash-resize to ``img_size``, then ``mean``/``std``)."""
    label_names: Tuple[str, ...]
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def data_config(model: nn.Module, adapter_name: Optional[str] = None) -> DataConfig:
    """The classes and preprocessing of a named adapter (default: the active one), from the data config its file
    put in ``pretrained_cfg``."""
    if adapter_name is None or adapter_name == getattr(model, 'capaboost_active_adapter', DEFAULT_NAME):
        cfg, num_classes = model.pretrained_cfg, model.num_classes
    else:
        stored = _stored(model, adapter_name)
        cfg, num_classes = stored.pretrained_cfg, stored.num_classes
    names = tuple(cfg.get('label_names') or (str(i) for i in range(num_classes)))
    img_size = int((cfg.get('input_size') or [3, 224, 224])[-1])
    return DataConfig(names, img_size, tuple(cfg['mean']), tuple(cfg['std']))


def _activate(model: nn.Module, stored: NamedAdapter) -> None:
    """Put ``stored``'s tensors where the model runs them (a new head where its class count differs)."""
    head = head_module(model)
    if stored.num_classes != model.num_classes:
        trainable, ref = head.weight.requires_grad, head.weight
        model.reset_classifier(stored.num_classes)
        head_module(model).to(device=ref.device, dtype=ref.dtype).requires_grad_(trainable)
    with torch.no_grad():
        unexpected = model.load_state_dict(stored.state(), strict=False).unexpected_keys
    if unexpected:
        raise AdapterError(f'named adapter does not fit the model: unexpected {unexpected[:3]}')
    model.capaboost_config = stored.config
    model.pretrained_cfg = model.default_cfg = stored.pretrained_cfg


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the adapter the model runs (its weights, masks, head, settings and data config); the one
    active until now keeps its current tensors in the bank."""
    current = active_adapter(model)
    if adapter_name == current:
        return model
    stored = _stored(model, adapter_name)
    key = model.capaboost_bank_keys.pop(adapter_name)
    model.adapter_bank[key] = NamedAdapter({k: v.detach().clone() for k, v in live_state(model).items()},
                                           model.capaboost_config, model.pretrained_cfg, model.num_classes)
    model.capaboost_bank_keys[current] = key
    _activate(model, stored)
    model.capaboost_active_adapter = adapter_name
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an inactive adapter (the active one cannot be removed: ``set_adapter`` to another first)."""
    if adapter_name == active_adapter(model):
        raise ValueError(f'{adapter_name!r} is the active adapter: set_adapter to another one before deleting it')
    _stored(model, adapter_name)
    del model.adapter_bank[model.capaboost_bank_keys.pop(adapter_name)]
    model.capaboost_adapter_names.remove(adapter_name)
    return model


@contextlib.contextmanager
def using_adapter(model: nn.Module, adapter_name: str) -> Iterator[nn.Module]:
    """``adapter_name`` active inside the block (to save, push, merge or export it), the previous one after."""
    previous = active_adapter(model)
    set_adapter(model, adapter_name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the backbone runs without any adapter: every module CapaBoost changed runs the timm class it
    replaced (``capaboost_base_class``) with the attributes it had (``capaboost_base_attrs``), so the features are
    exactly the base model's. The head stays the active adapter's (the base model has none for this task)."""
    _config(model)
    swapped: List[Tuple[nn.Module, type]] = []
    changed: List[Tuple[nn.Module, Dict[str, Any]]] = []
    try:
        for module in model.modules():
            base_class = getattr(module, 'capaboost_base_class', None)
            if base_class is not None and type(module) is not base_class:
                swapped.append((module, type(module)))
                module.__class__ = base_class
            base_attrs = getattr(module, 'capaboost_base_attrs', None)
            if base_attrs:
                changed.append((module, {k: getattr(module, k) for k in base_attrs}))
                for k, v in base_attrs.items():
                    setattr(module, k, v)
        yield model
    finally:
        for module, cls in swapped:
            module.__class__ = cls
        for module, values in changed:
            for k, v in values.items():
                setattr(module, k, v)


def _begin_mixed_batch(model: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """Forward pre-hook: ``adapter_names=`` (one per sample) swaps every layer of the form to its mixed subclass with
    its groups, and the head to a per-group head, for this forward."""
    names = kwargs.pop('adapter_names', None)
    if names is None:
        return args, kwargs
    x = args[0]
    names = list(names)
    if len(names) != x.shape[0]:
        raise ValueError(f'adapter_names has {len(names)} names for a batch of {x.shape[0]}: one name per sample')
    unknown = sorted(set(names) - set(list_adapters(model)))
    if unknown:
        raise ValueError(f'adapter_names: no adapter named {unknown[0]!r}; the model has '
                         f'{", ".join(map(repr, list_adapters(model)))}')
    used = list(dict.fromkeys(names))
    active = active_adapter(model)
    classes = {n: model.num_classes if n == active else _stored(model, n).num_classes for n in used}
    if len(set(classes.values())) > 1:
        raise ValueError(f'adapter_names mixes adapters with different class counts ({classes}): one batch needs one '
                         f'output width; run them in separate batches')
    # each inactive adapter's tensors by layer: {layer name: {tensor name: tensor}}, read once per batch
    stored = {n: _by_layer(_stored(model, n).state()) for n in used if n != active}
    groups = [(n, torch.tensor([i for i, m in enumerate(names) if m == n], device=x.device)) for n in used]
    swapped = []
    for layer_name, module in model.named_modules():
        mixed_class = MIXED_LAYERS.get(type(module))
        if mixed_class is None:
            continue
        own = _own_tensors(module, f'{layer_name}.')  # the active adapter's: read from the layer itself
        module.capaboost_groups = [(idx, own if n == active else stored[n].get(layer_name, {})) for n, idx in groups]
        module.capaboost_batch = x.shape[0]
        swapped.append((module, type(module)))
        module.__class__ = mixed_class
    if not swapped:
        raise ValueError(f'the {model.capaboost_config.method} form registers no mixed-batch layers '
                         f'(forms.register_mixed_layer): it cannot mix adapters in one batch')
    head, head_prefix = head_module(model), head_name(model)
    head_state = {n: _own_tensors(head, f'{head_prefix}.', head=True) if n == active else stored[n][head_prefix]
                  for n in used}
    heads = [(idx, head_state[n]['weight'], head_state[n].get('bias')) for n, idx in groups]

    def per_group_head(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output
        for idx, weight, bias in heads:
            out = out.index_copy(0, idx, F.linear(inputs[0][idx], weight, bias))
        return out

    model.capaboost_mixed_state = (swapped, head.register_forward_hook(per_group_head))
    return args, kwargs


def _by_layer(state: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{'blocks.0.attn.qkv.lora_A': t, ...}`` -> ``{'blocks.0.attn.qkv': {'lora_A': t}, ...}``."""
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer, _, name = key.rpartition('.')
        layers.setdefault(layer, {})[name] = tensor
    return layers


def _own_tensors(module: nn.Module, prefix: str, head: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of ``module`` itself (not its children) that an adapter stores, by their short names, detached:
    its CapaBoost weights and masks (``is_capaboost_key`` of the full name), or every one for the head."""
    tensors = dict(module._parameters)
    tensors.update((k, v) for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set)
    return {k: v.detach() for k, v in tensors.items() if v is not None and (head or is_capaboost_key(prefix + k))}


def _end_mixed_batch(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook (always called): the layers' own classes back, the per-group head removed."""
    state = model.__dict__.pop('capaboost_mixed_state', None)
    if state is None:
        return
    swapped, head_hook = state
    for module, cls in swapped:
        module.__class__ = cls
        del module.capaboost_groups, module.capaboost_batch
    head_hook.remove()
