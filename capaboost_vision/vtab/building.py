"""Model building for a run: which timm model ``--model`` names, creating it with the run's settings (every timm
failure as one RunError line), and its input normalisation. What each method kind does with the model is in
``methods``."""
import contextlib
from typing import Any, Dict, Iterator, Tuple

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

from .run_config import RunConfig, RunError


def family_of(model: str) -> str:
    """'vit_base_capaboost_lora.orig_in21k' or 'vit_base' -> 'vit_base' (a registered CapaBoost family); a plain
    timm model name ('deit_small_patch16_224.fb_in1k') -> its architecture, to which CapaBoost is applied."""
    name = model.split('.')[0]
    family = name.split('_capaboost_')[0]
    if timm.is_model(f'{family}_capaboost_lora'):
        return family
    if '_capaboost_' not in name and timm.is_model(name):
        return name
    families = sorted({n.split('_capaboost_')[0] for n in timm.list_models('*_capaboost_*')})
    raise RunError(f'--model {model!r} is neither a CapaBoost model family ({", ".join(families)}, or e.g. '
                   f'{families[0]}_capaboost_lora) nor a timm ViT/Swin model name')


def is_registered_family(model: str) -> bool:
    """True when ``--model`` names a registered CapaBoost family (its entry points build the CapaBoost model)."""
    return timm.is_model(f'{family_of(model)}_capaboost_lora')


def base_model_name(family: str) -> str:
    """The plain timm model (with its VTAB-standard weights tag) under a CapaBoost family, e.g.
    'vit_base' -> 'vit_base_patch16_224.orig_in21k'; a plain timm name is its own base."""
    if not timm.is_model(f'{family}_capaboost_lora'):
        return family
    return timm.models.get_pretrained_cfg(f'{family}_capaboost_lora').hf_hub_id.split('/', 1)[1]


def base_of(cfg: RunConfig) -> str:
    """The plain timm model name under ``--model``."""
    return base_model_name(family_of(cfg.model)) if is_registered_family(cfg.model) else cfg.model


@contextlib.contextmanager
def model_errors(cfg: RunConfig, settings: Dict[str, Any]) -> Iterator[None]:
    """Any failure of building ``--model`` (with ``settings``) as one RunError naming it."""
    try:
        yield
    except TypeError as e:
        if not is_registered_family(cfg.model):  # e.g. a CNN's constructor has no img_size
            raise RunError(f'--model {cfg.model}: not a timm VisionTransformer/SwinTransformer ({e})') from None
        raise RunError(f'bad model setting in {settings}: {e}') from None
    except ValueError as e:  # not a ViT/Swin, an unsupported block, a bad CapaBoost setting
        raise RunError(f'--model {cfg.model}: {str(e).splitlines()[0]}') from None
    except RuntimeError as e:
        if cfg.weights and 'state_dict' in str(e):  # load_state_dict: missing keys, unexpected keys, other shapes
            raise RunError(f'--weights {cfg.weights} does not fit --model {cfg.model} (another architecture?): '
                           f'{" ".join(str(e).split())[:300]}') from None
        raise RunError(f'--model {cfg.model} cannot be built with --img-size {cfg.img_size}: '
                       f'{str(e).splitlines()[0] or type(e).__name__}') from None
    except AssertionError as e:  # timm's shape asserts (e.g. an image smaller than a patch)
        raise RunError(f'--model {cfg.model} cannot be built with --img-size {cfg.img_size}: '
                       f'{str(e).splitlines()[0] or type(e).__name__}') from None


def create(cfg: RunConfig, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)`` with the run's image size, drop-path and base weights (``kwargs``: the
    CapaBoost settings of a CapaBoost entry point)."""
    args: Dict[str, Any] = dict(num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    if cfg.weights:
        args['pretrained_cfg_overlay'] = dict(file=str(cfg.weights))
    with model_errors(cfg, kwargs or args):
        return timm.create_model(name, pretrained=cfg.pretrained or bool(cfg.weights), **args, **kwargs)


def input_normalization(norm: str, model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) for ``--norm``: ImageNet's, the model's pretrained cfg's, or none ([0, 1] inputs)."""
    if norm == 'imagenet':
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if norm == 'model':
        data_cfg = resolve_data_config(model=model)
        return tuple(data_cfg['mean']), tuple(data_cfg['std'])
    return (0., 0., 0.), (1., 1., 1.)
