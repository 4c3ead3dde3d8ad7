"""HF PEFT methods (LoRA, DoRA, LoHa, LoKr, VeRA, HiRA, RandLoRA, FourierFT, ...) as baselines in the same engine.

A method YAML's ``peft:`` block names a PEFT config class and its arguments, e.g.
``{type: LOHA, r: 4, alpha: 8, target_modules: [qkv]}``. PEFT's own implementations are used unchanged: this module
turns the block into a config with one-line errors that name the file and key, wraps the timm model with
``peft.get_peft_model`` (the classifier head as a module to save, so the PEFT folder alone restores the
classifier), and writes PEFT's own adapter format. ``peft`` is an optional dependency, imported only here and only
when a PEFT method is used.
"""
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch.nn as nn

from ..extras import require


def _peft():
    return require('peft', 'an HF PEFT method')


def peft_types() -> Dict[str, type]:
    """PEFT's adapter (non prompt-learning) method names -> config classes: what a ``peft.type`` may name."""
    _peft()
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    return {str(t.value): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
            if not issubclass(cls, PromptLearningConfig)}


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def peft_config(spec: Dict[str, Any], head: str, where: str):
    """The PEFT config of a ``peft:`` block, with ``head`` added to its modules to save. ValueError naming ``where``
    (the YAML file or flag) and the key on an unknown type, an unknown argument or one PEFT rejects."""
    spec = dict(spec)
    peft_type = spec.pop('type', None)
    types = peft_types()
    if not isinstance(peft_type, str) or peft_type.upper() not in types:
        raise ValueError(f'{where}: peft.type: {peft_type!r} is not a PEFT adapter method: choose one of '
                         f'{", ".join(sorted(types))}')
    cls = types[peft_type.upper()]
    arguments = {f.name for f in dataclasses.fields(cls) if f.init} - {'peft_type', 'task_type'}
    for key in spec:
        if key not in arguments:
            raise ValueError(f'{where}: peft.{key}: not an argument of {cls.__name__} (PEFT {_peft().__version__})')
    spec['modules_to_save'] = [*(spec.get('modules_to_save') or []), head]
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: peft: {cls.__name__} rejects {spec}: {_first_line(e)}') from None


def _check_targets(model: nn.Module, config, where: str) -> None:
    """Every listed target module must name modules of the model by PEFT's rule for lists (the full name or its
    last dotted parts); PEFT itself only asks that one of them does."""
    targets = config.target_modules
    if not isinstance(targets, (list, set, tuple)):
        return  # a regex string: PEFT's own check (no match at all) applies
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith('.' + target) for name in names):
            raise ValueError(f'{where}: peft.target_modules: {target!r} matches no module of this timm model '
                             f'(its blocks have e.g. attn.qkv, attn.proj, mlp.fc1, mlp.fc2)')


def apply_peft(model: nn.Module, spec: Dict[str, Any], head: str, where: str = 'peft'):
    """``get_peft_model`` on a timm model: only what PEFT marks trainable (and the head) trains. ValueError naming
    ``where`` and the key when the block does not fit the model."""
    config = peft_config(spec, head, where)
    _check_targets(model, config, where)
    try:
        return _peft().get_peft_model(model, config)
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f'{where}: peft: PEFT cannot apply {type(config).__name__} to {type(model).__name__}: '
                         f'{_first_line(e)}') from None


def is_peft_model(model: nn.Module) -> bool:
    peft = sys.modules.get('peft')  # a PeftModel exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def save_peft(model: nn.Module, folder: Path) -> None:
    """PEFT's own format (adapter_config.json, adapter_model.safetensors, PEFT's README.md) via ``save_pretrained``,
    written into a temporary folder and moved into ``folder`` file by file (each move atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix='.peft.') as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in sorted(Path(tmp).iterdir()):
            shutil.move(str(path), str(folder / path.name))


def peft_version() -> str:
    return _peft().__version__
