"""A trained adapter as a ready classifier: the timm model with its adapter applied (a CapaBoost-LoRA update folded
into the base weights: zero extra inference cost), the eval transform its config.json records, and its class names.

    import capaboost_vision
    clf = capaboost_vision.load_classifier('hf-hub:org/vit-b-capaboost-lora-cifar')
    probs = clf.model(clf.transform(img).unsqueeze(0)).softmax(-1)
    print(clf.label_names[int(probs.argmax())])
"""
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import create_transform

from .hub import AdapterError, AdapterFile, apply_adapter, base_mismatch, check_adapter, check_repo_config, \
    explain_hub_error, read_adapter
from .config import CapaBoostConfig, config_keys
from .forms import can_merge
from .multi import data_config, load_together
from .tuner import merge


class Classifier(NamedTuple):
    """What ``load_classifier`` returns: the model (eval mode), its transform (PIL image -> normalised tensor), the
    class names in output order, and the preprocessing (squash-resize to ``img_size``, then ``mean``/``std``)."""
    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    label_names: Tuple[str, ...]
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    adapter_name: str = 'default'  # its adapter on ``model`` (several sources: ``set_adapter`` before using it)


def squash_transform(img_size: int, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform for the VTAB-1k preprocessing every adapter of ours is trained with: squash-resize to
    ``img_size`` (bicubic, no crop), ToTensor, Normalize."""
    return create_transform(img_size, interpolation='bicubic', crop_pct=1.0, crop_mode='squash', mean=mean, std=std)


def recorded_base_file(source: Union[str, Path]) -> Optional[Path]:
    """The base weights file a finished run folder was trained with (its config.yaml's ``weights``), or None for
    an adapter folder or repo, or a run on Hub weights."""
    path = Path(str(source)) / 'config.yaml'
    if str(source).startswith('hf-hub:') or not path.is_file():
        return None
    try:
        weights = (yaml.safe_load(path.read_text()) or {}).get('weights')
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        raise AdapterError(f'{path} is not a readable run config') from None
    return Path(weights) if isinstance(weights, str) and weights else None


def _base_weights(source: Union[str, Path], adapter: AdapterFile, weights: Optional[Union[str, Path]]) -> Optional[Path]:
    """The base weights file to build on (None: the Hub weights the adapter records), or AdapterError naming the
    base the adapter was trained on when it cannot be had: never another base in silence."""
    block = adapter.meta['capaboost']
    recorded, fingerprint = block.get('base_weights') or '', block.get('base_fingerprint')
    given = weights if weights is not None else recorded_base_file(source)
    if given is not None:
        if not Path(given).is_file():
            what = 'base weights file' if weights is not None else f'the base weights file {source} was trained with'
            raise AdapterError(f'{what} {given} does not exist (pass it: weights=PATH, --weights PATH)')
        return Path(given)
    if recorded == 'random-init':
        raise AdapterError(f'{source} was trained on a randomly initialised base (pretrained=False), which no weights '
                           f'file holds: only its run folder rebuilds it (`capaboost-vtab eval RUN_FOLDER` replays '
                           f'its seed)')
    if recorded.startswith('file:'):
        raise AdapterError(f'{source} was trained on the local base weights file {recorded[5:]} (fingerprint '
                           f'{fingerprint}), not on Hub weights: pass that file (weights=PATH, --weights PATH)')
    return None


def load_classifier(source: Union[str, Path, Sequence[Union[str, Path]]], weights: Optional[Union[str, Path]] = None,
                    merged: bool = True, device: Union[str, torch.device] = 'cpu') -> Union[Classifier,
                                                                                             List[Classifier]]:
    """The classifier of a CapaBoost adapter: a local adapter folder (a finished run folder is one) or
    ``hf-hub:org/repo[@revision]``, on the base weights it was trained on. A list of sources gives a list of
    classifiers on one backbone (``multi``: every adapter beside the first, named by its source, nothing merged);
    ``set_adapter(clf.model, clf.adapter_name)`` before using one, or a mixed batch.

    The base weights load from the hub id the adapter records (the Hugging Face cache offline), from ``weights``
    (a local .safetensors/.pth of the base model), or, for a run folder, from the file its config.yaml names. An
    adapter trained on a local file needs that file; base weights other than the recorded ones (by fingerprint)
    are an error, not a warning. ``merged`` folds a LoRA update into the weights (adapter and prompt forms are not
    linear and stay as they are). AdapterError (one line) for anything that does not fit.
    """
    if isinstance(source, (list, tuple)):
        return _load_together([str(s) for s in source], weights, device)
    adapter = read_adapter(source)  # config.json schema, safetensors, finite values: before anything is built
    # what timm builds from the file's model_args: CapaBoost settings and bounded sizes only, never a path, overlay
    # or checkpoint of the file's choosing (the check create_model('hf-hub:...') and rank run)
    check_repo_config(adapter.meta, adapter.config_file, building=True)
    meta = adapter.meta
    cfg = meta.get('pretrained_cfg') or {}
    recorded = meta.get('model_args') or {}
    settings = CapaBoostConfig.from_record({**{k: v for k, v in recorded.items() if k in config_keys()},
                                            'method': adapter.config.method}).to_dict()  # the form's own only
    settings.pop('method')
    kwargs = dict({k: v for k, v in recorded.items() if k not in config_keys()}, **settings,
                  num_classes=meta['num_classes'])
    base_file = _base_weights(source, adapter, weights)
    if base_file is not None:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(base_file))
    name = f'{meta["architecture"]}.{cfg["tag"]}' if cfg.get('tag') else meta['architecture']
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as e:
        raise AdapterError(f'base weights of {source}: {explain_hub_error(e)}; pass a local base weights '
                           f'file (weights=...)') from None
    check_adapter(model, adapter, check_base=False)
    mismatch = base_mismatch(model, adapter)
    if mismatch:
        raise AdapterError(f'{mismatch}: pass the base weights it was trained on (weights=PATH, --weights PATH)')
    apply_adapter(model, adapter)
    if merged and can_merge(adapter.config.method):
        model = merge(model)
    return _classifier(model.to(device).eval(), 'default')


def _classifier(model: nn.Module, adapter_name: str) -> Classifier:
    """The model with the named adapter's preprocessing and class names (its config.json's data config)."""
    names, img_size, mean, std = data_config(model, adapter_name)
    return Classifier(model, squash_transform(img_size, mean, std), names, img_size, mean, std, adapter_name)


def _load_together(sources: List[str], weights: Optional[Union[str, Path]], device: Union[str, torch.device]
                   ) -> List[Classifier]:
    """Several adapters on one backbone: the first built as ``load_classifier`` builds it (unmerged), the others
    loaded beside it by name (their source)."""
    model = load_classifier(sources[0], weights=weights, merged=False, device=device).model
    names = load_together(model, sources)
    model.to(device).eval()
    return [_classifier(model, name) for name in names]
