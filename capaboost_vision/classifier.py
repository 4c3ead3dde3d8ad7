"""A trained adapter as a ready classifier: the timm model with its adapter applied (a CapaBoost-LoRA update folded
into the base weights: zero extra inference cost), the eval transform its config.json records, and its class names.

    import capaboost_vision
    clf = capaboost_vision.load_classifier('hf-hub:org/vit-b-capaboost-lora-cifar')
    probs = clf.model(clf.transform(img).unsqueeze(0)).softmax(-1)
    print(clf.label_names[int(probs.argmax())])
"""
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.data import create_transform

from .hub import AdapterError, apply_adapter, check_adapter, check_repo_config, explain_hub_error, read_adapter
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


def squash_transform(img_size: int, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform for the VTAB-1k preprocessing every adapter of ours is trained with: squash-resize to
    ``img_size`` (bicubic, no crop), ToTensor, Normalize."""
    return create_transform(img_size, interpolation='bicubic', crop_pct=1.0, crop_mode='squash', mean=mean, std=std)


def load_classifier(source: Union[str, Path], weights: Optional[Union[str, Path]] = None, merged: bool = True,
                    device: Union[str, torch.device] = 'cpu') -> Classifier:
    """The classifier of a CapaBoost adapter: a local adapter folder (a finished run folder is one) or
    ``hf-hub:org/repo[@revision]``.

    The base weights load from the hub id the adapter records (the Hugging Face cache offline), or from ``weights``
    (a local .safetensors/.pth of the base model). ``merged`` folds a LoRA update into the weights (adapter and
    prompt forms are not linear and stay as they are). AdapterError (one line) for anything that does not fit.
    """
    adapter = read_adapter(source)  # config.json schema, safetensors, finite values: before anything is built
    # what timm builds from the file's model_args: CapaBoost settings and bounded sizes only, never a path, overlay
    # or checkpoint of the file's choosing (the check create_model('hf-hub:...') and rank run)
    check_repo_config(adapter.meta, adapter.config_file, building=True)
    meta = adapter.meta
    cfg = meta.get('pretrained_cfg') or {}
    kwargs = dict(meta.get('model_args') or {}, num_classes=meta['num_classes'])
    if weights is not None:
        if not Path(weights).is_file():
            raise AdapterError(f'base weights file {weights} does not exist')
        kwargs['pretrained_cfg_overlay'] = dict(file=str(weights))
    try:
        model = timm.create_model(meta['architecture'], pretrained=True, **kwargs)
    except (OSError, RuntimeError) as e:
            raise AdapterError(f'base weights of {source}: {explain_hub_error(e)}; pass a local base weights '
                           f'file (weights=...)') from None
    check_adapter(model, adapter)
    apply_adapter(model, adapter)
    if merged and adapter.config.method == 'lora':
        model = merge(model)
    img_size = int((cfg.get('input_size') or [3, 224, 224])[-1])
    mean = tuple(cfg.get('mean') or model.pretrained_cfg['mean'])
    std = tuple(cfg.get('std') or model.pretrained_cfg['std'])
    names = tuple(meta.get('label_names') or (str(i) for i in range(meta['num_classes'])))
    return Classifier(model.to(device).eval(), squash_transform(img_size, mean, std), names, img_size, mean, std)
