"""Shared helpers for the CapaBoost model entry points: the base model is built (and its pretrained weights
loaded) by timm itself, then CapaBoost is applied and its settings recorded for ``push_to_hf_hub``."""
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Sequence, Tuple

import torch.nn as nn
from timm.models import PretrainedCfg, get_pretrained_cfg, register_model
from timm.layers import Format
from timm.models._features import FeatureGetterNet
from timm.models._builder import pretrained_cfg_for_features

from ..config import CapaBoostConfig, config_keys
from ..forms import FORMS
from ..hub import check_repo, load_adapter, registered_base_id
from ..tuner import apply_capaboost


CAPABOOST_PAPER = 'arXiv:2407.01320'


def base_cfg(name_tag: str, base_papers: Sequence[str], **overrides: Any) -> Dict[str, Any]:
    """A pretrained cfg that loads the base weights ``name_tag`` (with its full hub id) for our architecture, with
    the CapaBoost and base papers (the family file names its own), the base weights' license and a note naming
    them."""
    cfg = get_pretrained_cfg(name_tag).to_dict()
    for key in ('architecture', 'tag'):
        cfg.pop(key, None)
    cfg.update(paper_ids=', '.join([CAPABOOST_PAPER, *base_papers]),
               notes=(f'base weights: timm/{name_tag} ({cfg.get("license") or "see the base model"}); CapaBoost '
                      f'weights start untrained (zero update) and are the only trainable part with the head',))
    cfg.update(overrides)
    return cfg


_FAMILY_MODULES: Dict[str, Tuple[Tuple[str, ...], Callable[..., nn.Module]]] = {}
"""{model file's module: (its families, its create function)}: where a form registered later adds its entry
points."""


def _entry_point(module: str, variant: str, form: str, create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``variant(pretrained=False, **kwargs)`` as a function of ``module``, registered in timm (which reads the
    module's ``default_cfgs``)."""
    def create_variant(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(variant, pretrained, **kwargs)
    create_variant.__name__ = create_variant.__qualname__ = variant
    create_variant.__module__ = module
    create_variant.__doc__ = f'{FORMS[form].summary} on {variant.split("_capaboost_")[0]}; frozen backbone.'
    return register_model(create_variant)


def register_entry_points(module: str, families: Iterable[str],
                          create: Callable[..., nn.Module]) -> Dict[str, Callable[..., nn.Module]]:
    """Register ``<family>_capaboost_<form>(pretrained=False, **kwargs)`` in timm for every family and registered
    form, as functions of ``module`` (timm reads the module's ``default_cfgs``); returns them by name."""
    _FAMILY_MODULES[module] = (tuple(families), create)
    return {f'{family}_capaboost_{form}': _entry_point(module, f'{family}_capaboost_{form}', form, create)
            for family in families for form in FORMS}


def register_form_entry_points(form: str) -> None:
    """``<family>_capaboost_<form>`` for every family already registered, for a form registered after the model
    files (a form from outside the package calls this after ``register_form``); each variant's pretrained cfg is its
    family's (the base weights do not depend on the form)."""
    for module, (families, create) in _FAMILY_MODULES.items():
        cfgs = sys.modules[module].default_cfgs
        for family in families:
            variant = f'{family}_capaboost_{form}'
            cfgs[variant] = next(cfg for name, cfg in cfgs.items() if name.startswith(f'{family}_capaboost_'))
            setattr(sys.modules[module], variant, _entry_point(module, variant, form, create))


def loaded_weights_id(model: nn.Module, pretrained: bool) -> str:
    """What was actually loaded: 'random-init', 'file:<name>' (a local checkpoint) or the weights' hub id."""
    if not pretrained:
        return 'random-init'
    if model.pretrained_cfg.get('file'):
        return f'file:{Path(model.pretrained_cfg["file"]).name}'
    return registered_base_id(model) or 'unknown'


def create_capaboost(create_base: Callable[..., nn.Module], variant: str, base_name: str, pretrained: bool,
                     **kwargs: Any) -> nn.Module:
    """Build ``variant`` = '<base>_capaboost_<method>': timm base model, then CapaBoost from the kwargs.

    ``base_name`` is the plain timm model and tag the variant adds CapaBoost to ('vit_base_patch16_224.orig_in21k'):
    ``merge`` gives that model back.
    CapaBoost settings (rank, num_masks, mask_density, ...) are keyword arguments; every setting, defaults
    included, lands in ``model._model_args`` so a pushed config.json rebuilds the same model.
    ``adapter='hf-hub:org/repo[@rev]'`` or a local folder loads trained adapter weights after the base weights.
    ``features_only=True`` (with ``out_indices``) returns timm's ``FeatureGetterNet`` around the CapaBoost model:
    CapaBoost is applied to the whole model first, then the feature wrapper prunes what the indices do not need.
    """
    method = variant.rsplit('_', 1)[-1]
    adapter = kwargs.pop('adapter', None)
    source_cfg = kwargs.get('pretrained_cfg')
    source_cfg = source_cfg.to_dict() if isinstance(source_cfg, PretrainedCfg) else source_cfg
    from_repo = isinstance(source_cfg, dict) and source_cfg.get('source') in ('hf-hub', 'local-dir')
    if from_repo:
        # an adapter repo (timm's 'hf-hub:'/'local-dir:' names): the repo holds the adapter, and its recorded tag
        # names the base weights, which load from their own source. Its config.json is someone else's data: its
        # schema is checked before anything is built from it (no adapter path, file or overlay of its choosing)
        repo = f'hf-hub:{source_cfg["hf_hub_id"]}' if source_cfg['source'] == 'hf-hub' else source_cfg['file']
        check_repo(repo)
        adapter = repo if pretrained else None
        kwargs['pretrained_cfg'] = source_cfg.get('tag') or None
    if kwargs.get('method', method) != method:
        raise ValueError(f'method={kwargs["method"]!r} is invalid for {variant}: its method is {method!r}')
    kwargs.pop('method', None)
    # validated before anything is built; the settings of a repo's config.json are a record: one written before the
    # per-form sections holds every form's settings, and another form's are left out, as the form never read them
    config = CapaBoostConfig.from_record({k: v for k, v in dict(kwargs, method=method).items() if k in config_keys()}) \
        if from_repo else CapaBoostConfig.from_kwargs(dict(kwargs, method=method))
    base_kwargs = {k: v for k, v in kwargs.items() if k not in config_keys()}
    features_only = base_kwargs.pop('features_only', False)
    feature_kwargs = {k: base_kwargs.pop(k) for k in ('out_indices', 'feature_cls') if k in base_kwargs}
    if feature_kwargs.pop('feature_cls', 'getter') != 'getter':
        raise ValueError(f'feature_cls={kwargs["feature_cls"]!r} is invalid for {variant}: CapaBoost feature '
                         f'extraction uses feature_cls="getter" (forward_intermediates)')
    model = create_base(variant, pretrained=pretrained, **base_kwargs)
    model.capaboost_base_weights = loaded_weights_id(model, pretrained)
    model.capaboost_base_architecture = base_name
    apply_capaboost(model, config)
    recorded = config.to_dict()
    recorded.pop('method')
    model._model_args = dict(getattr(model, '_model_args', {}), **recorded)
    if adapter:
        load_adapter(model, adapter)
    if features_only:
        return _feature_getter(model, feature_kwargs.get('out_indices'))
    return model


class NHWCFeatureGetter(FeatureGetterNet):
    """timm's FeatureGetterNet with NHWC outputs, as the base Swin's ``features_only`` model gives them (Swin's
    ``forward_intermediates`` returns NCHW only), and ``output_fmt`` saying so, as the base's ``FeatureListNet``
    does (timm's feature tests and necks read it). A getter keeps the whole model, prompts included, as ``.model``."""

    def __init__(self, model: nn.Module, out_indices: Any) -> None:
        super().__init__(model, out_indices=out_indices)
        self.output_fmt = Format.NHWC

    def forward(self, x):
        features = self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm, output_fmt='NCHW',
                                                    intermediates_only=True)
        return [f.permute(0, 2, 3, 1) for f in features]  # (B, C, H, W) -> (B, H, W, C)


def _feature_getter(model: nn.Module, out_indices: Any) -> nn.Module:
    """The feature wrapper ``features_only=True`` gives the base model, over the CapaBoost model (ViT: the last 3
    blocks by default, NCHW; Swin: every stage, NHWC)."""
    if out_indices is None:
        out_indices = 3 if hasattr(model, 'blocks') else tuple(range(len(model.layers)))
    nhwc = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
    features = (NHWCFeatureGetter if nhwc else FeatureGetterNet)(model, out_indices=out_indices)
    features.pretrained_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    features.default_cfg = features.pretrained_cfg
    features.capaboost_config = model.capaboost_config
    return features
