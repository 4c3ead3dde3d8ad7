"""The method kinds the engine trains, one ``MethodKind`` each: a CapaBoost form, an HF PEFT method, a linear
probe, full fine-tuning. A kind builds its model, says what a run saves and what goes into results.json; the engine,
the run folder and the command line only ever ask ``kind_of(cfg)``, never test ``cfg.form`` themselves.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from .._io import atomic_path
from ..config import CapaBoostConfig
from ..hub import WEIGHTS_NAME, save_adapter
from ..models._builder import loaded_weights_id
from ..tuner import apply_capaboost, head_module, head_name, is_capaboost_key, parameter_report
from .building import base_of, create, is_registered_family, family_of, model_errors
from .peft_baselines import apply_peft, is_peft_model, peft_version, save_peft
from .run_config import RunConfig, RunError, is_capaboost_form


@dataclass
class StoredParameters:
    """What a method ships beside the backbone, counted the same way for every row (CapaBoost, HF PEFT, linear,
    full): the trainable parameters excluding the classifier head (the literature's column), the head, and the
    non-trainable tensors the method needs (CapaBoost masks, VeRA/RandLoRA random bases), shared ones counted once."""
    trainable_excl_head: int
    head: int
    fixed: int


def _fixed_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """A method's own non-trainable tensors: CapaBoost's mask buffers, or the buffers of PEFT's tuner layers beyond
    their base layers' (VeRA's and RandLoRA's random bases: one shared tensor referenced by every layer)."""
    if not is_peft_model(model):
        yield from (b for n, b in model.named_buffers() if is_capaboost_key(n))
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = {id(b) for b in module.get_base_layer().buffers()}
            yield from (b for b in module.buffers() if id(b) not in base)


def stored_parameters(model: nn.Module) -> StoredParameters:
    """The one parameter count of every results row and report (see ``StoredParameters``)."""
    timm_model = model.get_base_model() if is_peft_model(model) else model
    head_ids = {id(p) for p in head_module(timm_model).parameters()}
    trainable = head = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            head += p.numel()
        else:
            trainable += p.numel()
    fixed = sum(b.numel() for b in {id(b): b for b in _fixed_tensors(model)}.values())  # shared ones once
    return StoredParameters(trainable, head, fixed)


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What a run saves: trainable parameters plus CapaBoost buffers (masks) — never the frozen backbone."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if is_capaboost_key(n)})
    return state


class MethodKind:
    """One kind of method. ``has_capaboost_adapter``: its run folder loads with ``load_adapter``; ``packages``:
    the packages beyond the core ones whose versions its results depend on (recorded in their provenance)."""
    name = ''
    has_capaboost_adapter = False
    packages: Tuple[str, ...] = ()

    def build(self, cfg: RunConfig, num_classes: int) -> nn.Module:
        """The model to train (trainable parts unfrozen), before it moves to the device."""
        raise NotImplementedError

    def check(self, cfg: RunConfig, where: str) -> None:
        """RunError naming ``where`` when the method's own block does not fit ``--model`` (at resolve time)."""

    def describe(self, model: nn.Module) -> str:
        """What is trained, printed when the run starts."""
        counts = stored_parameters(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (f'trainable parameters {trainable:,} (excl. head {counts.trainable_excl_head:,}; fixed tensors '
                f'{counts.fixed:,})')

    def results(self, model: nn.Module, cfg: RunConfig) -> Dict[str, Any]:
        """The kind's own fields of results.json."""
        return {'max_rank': None, 'capaboost': None, 'peft': None}

    def save(self, model: nn.Module, run_dir: Path, results: Dict[str, Any], cfg: RunConfig) -> Path:
        """Write the finished run's weights into ``run_dir``; returns the weights file."""
        weights = run_dir / 'trainable.safetensors'
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, tmp)
        return weights


class CapaBoostKind(MethodKind):
    """A CapaBoost form: a registered ``<family>_capaboost_<form>`` model, or CapaBoost applied to any timm ViT/Swin.
    The finished run folder is itself an adapter folder (``load_adapter``, ``adapter=``, ``push``)."""
    name, has_capaboost_adapter = 'capaboost', True

    def build(self, cfg: RunConfig, num_classes: int) -> nn.Module:
        settings = cfg.capaboost.to_dict()
        settings.pop('method')
        if is_registered_family(cfg.model):
            return create(cfg, f'{family_of(cfg.model)}_capaboost_{cfg.form}', num_classes, **settings)
        model = create(cfg, cfg.model, num_classes)
        model.capaboost_base_weights = loaded_weights_id(model, cfg.pretrained or bool(cfg.weights))
        with model_errors(cfg, settings):  # as apply_capaboost users do
            apply_capaboost(model, CapaBoostConfig(**dict(settings, method=cfg.form)))
        return model

    def describe(self, model: nn.Module) -> str:
        return str(parameter_report(model))

    def results(self, model: nn.Module, cfg: RunConfig) -> Dict[str, Any]:
        return {'max_rank': parameter_report(model).max_rank, 'capaboost': model.capaboost_config.to_dict(),
                'peft': None}

    def save(self, model: nn.Module, run_dir: Path, results: Dict[str, Any], cfg: RunConfig) -> Path:
        save_adapter(model, run_dir, results=results or None, label_names=results.get('label_names'),
                     repo_id=f'{results.get("task", cfg.task)}-{cfg.name or cfg.method}')  # push writes the card anew
        return run_dir / WEIGHTS_NAME


class PeftKind(MethodKind):
    """An HF PEFT method on the plain timm model; saved in PEFT's own format (``PeftModel.from_pretrained``)."""
    name, packages = 'peft', ('peft',)

    def build(self, cfg: RunConfig, num_classes: int) -> nn.Module:
        model = create(cfg, base_of(cfg), num_classes)
        try:  # check has vetted the block against this architecture
            return apply_peft(model, cfg.peft, head_name(model), f'method {cfg.method}')
        except ValueError as e:
            raise RunError(str(e)) from None

    def check(self, cfg: RunConfig, where: str) -> None:
        """Built on the meta device (no weights, no memory), so a sweep or search refuses a bad block before any
        run starts."""
        try:
            with torch.device('meta'):
                model = timm.create_model(base_of(cfg), pretrained=False, num_classes=2, img_size=cfg.img_size)
        except Exception:  # noqa: BLE001  a bad --model/--img-size: build reports it in its own words
            return
        try:
            apply_peft(model, cfg.peft, head_name(model), where)
        except ValueError as e:
            raise RunError(str(e)) from None

    def results(self, model: nn.Module, cfg: RunConfig) -> Dict[str, Any]:
        return {'max_rank': None, 'capaboost': None, 'peft': dict(cfg.peft, version=peft_version())}

    def save(self, model: nn.Module, run_dir: Path, results: Dict[str, Any], cfg: RunConfig) -> Path:
        save_peft(model, run_dir)
        return run_dir / 'adapter_model.safetensors'


class LinearKind(MethodKind):
    """A linear probe: the plain model with only its head trained."""
    name = 'linear'

    def build(self, cfg: RunConfig, num_classes: int) -> nn.Module:
        model = create(cfg, base_of(cfg), num_classes)
        model.requires_grad_(False)
        head_module(model).requires_grad_(True)
        return model


class FullKind(MethodKind):
    """Full fine-tuning: the plain model, every parameter trained."""
    name = 'full'

    def build(self, cfg: RunConfig, num_classes: int) -> nn.Module:
        return create(cfg, base_of(cfg), num_classes)


KINDS: Dict[str, MethodKind] = {'capaboost': CapaBoostKind(), 'peft': PeftKind(), 'linear': LinearKind(),
                                'full': FullKind()}


def kind_of(cfg: RunConfig) -> MethodKind:
    """The kind of ``cfg``'s method (by its YAML's ``form``: every registered CapaBoost form is the CapaBoost
    kind)."""
    return KINDS['capaboost' if is_capaboost_form(cfg.form) else cfg.form]


def check_method(cfg: RunConfig, where: str) -> None:
    """The kind's resolve-time check (``run_config.resolve_config``'s ``check_method``)."""
    kind_of(cfg).check(cfg, where)


def build_model(cfg: RunConfig, num_classes: int, kind: Optional[MethodKind] = None) -> nn.Module:
    """The model of ``cfg``'s method kind."""
    return (kind or kind_of(cfg)).build(cfg, num_classes)
