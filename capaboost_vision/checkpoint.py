"""From timm's own training to an adapter: a state dict or a timm ``train.py`` checkpoint of a CapaBoost model
(tens of MB: the whole model) becomes the CapaBoost model it was saved from, ready for ``save_adapter`` (about
1 MB: the CapaBoost weights, masks and head).

timm's scripts have no plugin discovery, so they run with this package imported first
(``python -m capaboost_vision.timm_script PATH/train.py ...``); their checkpoints hold ``arch`` (the model name),
``args`` (``num_classes``, ``model_kwargs``, ``pretrained``) and ``state_dict``. Read with
``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed for ``args``) or safetensors, never unpickled
otherwise.
"""
import argparse
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .hub import AdapterError, drop_all_ones_masks, registered_base_id, refuse_non_finite
from .tuner import is_capaboost_key


def read_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, what the checkpoint says about its model: ``arch``, ``num_classes``, ``model_kwargs``,
    ``pretrained``) of a .safetensors state dict or a torch checkpoint (timm's train.py format or a bare state
    dict). AdapterError naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f'checkpoint {path} does not exist')
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path)), {'arch': None, 'num_classes': None, 'model_kwargs': {}, 'pretrained': None}
        except (SafetensorError, OSError) as e:
            raise AdapterError(f'{path} is not a readable safetensors file ({e})') from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(str(path), map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise AdapterError(f'{path} is not a torch checkpoint of tensors (read with weights_only=True: '
                           f'{str(e).splitlines()[0] if str(e) else type(e).__name__})') from None
    if not isinstance(loaded, dict):
        raise AdapterError(f'{path} holds a {type(loaded).__name__}, not a state dict or a timm checkpoint')
    state = loaded.get('state_dict', loaded)
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise AdapterError(f'{path} holds no state dict of tensors (a timm checkpoint keeps it under "state_dict")')
    args = loaded.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else {}
    described = {'arch': loaded.get('arch'), 'num_classes': args.get('num_classes'),
                 'model_kwargs': args.get('model_kwargs') or {}, 'pretrained': args.get('pretrained')}
    return {k.removeprefix('module.'): v for k, v in state.items()}, described


def model_from_checkpoint(path: Union[str, Path], model_name: Optional[str] = None, num_classes: Optional[int] = None,
                          **model_kwargs: Any) -> nn.Module:
    """The CapaBoost model a checkpoint was saved from, with every weight loaded (strict). The model name, classes
    and keyword arguments come from a timm checkpoint's ``arch`` and ``args``, or from the arguments (which win).
    Its base weights are recorded as the architecture's registered Hub weights when the training started from
    them (``--pretrained``), else as the checkpoint file; the base fingerprint is the checkpoint's own frozen base."""
    state, described = read_checkpoint(path)
    name = model_name or described['arch']
    if not name or '_capaboost_' not in name or not timm.is_model(name):
        raise AdapterError(f'{path}: model {name!r} is not a registered CapaBoost model (pass model_name= / --model; '
                           f'timm.list_models("*_capaboost_*"))')
    if not any(is_capaboost_key(k) for k in state):
        raise AdapterError(f'{path} holds no CapaBoost weights: not a checkpoint of a CapaBoost model')
    kwargs = dict(described['model_kwargs'], **model_kwargs)
    classes = num_classes if num_classes is not None else described['num_classes']
    if classes is not None:
        kwargs['num_classes'] = classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
        drop_all_ones_masks(state, model.state_dict())  # a plain LoRA/adapter checkpoint of an older version
        model.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise AdapterError(f'{path} does not fit {name} with {kwargs}: {str(e).splitlines()[0]} (pass the model '
                           f'name, num_classes and model kwargs it was trained with)') from None
    refuse_non_finite({k: v for k, v in state.items() if is_capaboost_key(k)}, 'convert', f'{path}: ')
    model.capaboost_base_weights = registered_base_id(model) if described['pretrained'] else f'file:{Path(path).name}'
    return model.eval()
