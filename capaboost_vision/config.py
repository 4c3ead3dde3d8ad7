"""The one configuration object for every CapaBoost form (LoRA, adapter, prompt).

Each setting is defined once, here: a dataclass field with its help text (and choices where the set is closed) in
``metadata``, from which ``create_model`` kwargs, the CLI flags, the YAML keys and the model card derive.
This module imports no torch, so the CLI can build its parser before the heavy imports.
"""
import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from numbers import Real
from typing import Any, Dict, Tuple

METHODS = ('lora', 'adapter', 'prompt')
MASK_TYPES = ('random', 'nm')
LORA_TARGETS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')
ADAPTER_PLACEMENTS = ('parallel', 'sequential')
MASK_SCALINGS = ('none', 'expected')
LORA_INITS = ('peft', 'official')
MAX_CLASSES = 1_000_000  # a class count above this is a typo or a hostile file, not a head to allocate


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text (and CLI hints: choices, short, nargs, flag, scope, cli; for numbers
    the allowed ``range``, an interval such as '[0, 1)' or '(0, inf)') in metadata; a dict default becomes a
    default_factory."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=dict(help=help, **meta))
    return field(default=default, metadata=dict(help=help, **meta))


def field_default(f: Field) -> Any:
    """A dataclass field's default value (calling its default_factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


class SettingError(ValueError):
    """A setting with a value outside what it allows; ``name`` is the setting, so callers can say where it came
    from (a YAML file, a flag)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def in_range(value: Any, interval: str) -> bool:
    """True when ``value`` is a finite real number (not a bool) inside ``interval``, e.g. '[0, 1)' or '(0, inf)'."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return False
    low, high = (float(bound) for bound in interval[1:-1].split(','))
    above = low <= value if interval[0] == '[' else low < value
    below = value <= high if interval[-1] == ']' else value < high
    return above and below


def describe_range(interval: str, integer: bool) -> str:
    """What ``interval`` allows, in words: 'an integer >= 1 is required', 'must be > 0 and finite',
    'must lie in [0, 1)'."""
    low, high = (bound.strip() for bound in interval[1:-1].split(','))
    if low == '-inf':
        return 'must be a finite number'
    if high == 'inf':
        op = '>=' if interval[0] == '[' else '>'
        return f'an integer {op} {low} is required' if integer else f'must be {op} {low} and finite'
    return f'an integer in {interval} is required' if integer else f'must lie in {interval}'


def check_setting(f: Field, value: Any) -> None:
    """SettingError when ``value`` is not of the field's kind (integer or number) or outside its ``range``."""
    interval = f.metadata.get('range')
    if interval is None:
        return
    integer = isinstance(field_default(f), int) and not isinstance(field_default(f), bool)
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise SettingError(f.name, f'{f.name}={value!r} is invalid: an integer is required')
    if isinstance(value, bool) or not isinstance(value, Real):
        raise SettingError(f.name, f'{f.name}={value!r} is invalid: a number is required')
    if not in_range(value, interval):
        allowed = f.metadata.get('range_help') or describe_range(interval, integer)
        raise SettingError(f.name, f'{f.name}={value!r} is invalid: {allowed}')


@dataclass
class CapaBoostConfig:
    """CapaBoost settings. Defaults follow the official code: d=2 masks of density 0.5, scaling alpha/r.

    ``num_masks=1, mask_density=1.0`` turns each form into its plain baseline (LoRA, adapter, low-rank prompt);
    ``prompt_rank=0`` gives plain, unfactorised VPT-deep prompts (0, not None: timm's create_model drops
    None-valued keyword arguments).
    """
    method: str = setting('lora', 'CapaBoost form', choices=METHODS, cli=False)
    num_masks: int = setting(2, 'number d of masked branches of the shared weights (1 = the plain method)',
                             range='[1, 64]')
    mask_density: float = setting(0.5, 'fraction rho of entries each static mask keeps, in (0, 1]', range='(0, 1]')
    mask_type: str = setting('random', 'random: exact-count uniform masks; nm: N:M structured masks',
                              choices=MASK_TYPES)
    nm: Tuple[int, int] = setting((2, 4), 'N and M for mask_type=nm (N of every M entries kept)', nargs=2)
    mask_scaling: str = setting('none', "none: the d masked branches are summed unscaled (official code); expected: "
                                         "the sum is divided by d*rho^2, so the expected update equals the plain "
                                         "form's at the same alpha and lr", choices=MASK_SCALINGS)
    seed: int = setting(0, 'mask seed (the CLI uses the run seed unless --mask-seed is given)', flag='mask_seed',
                         range='[0, inf)')
    # LoRA
    rank: int = setting(8, 'LoRA rank r of the shared factors', range='[1, 65536]')
    lora_alpha: float = setting(8.0, 'LoRA alpha: the update is scaled by alpha / r (must be > 0)', range='(0, inf)',
                                 range_help='must be > 0 and finite (alpha = 0 makes the update zero: nothing '
                                            'would be learned)')
    lora_dropout: float = setting(0.0, 'dropout on the LoRA input, in [0, 1)', range='[0, 1)')
    lora_init: str = setting('peft', 'init of A: peft = loralib/PEFT kaiming U(+-1/sqrt(in)); official = the '
                                     'CapaBoost code\'s U(+-1/sqrt(r)) (B is zero either way)', choices=LORA_INITS)
    use_dora: bool = setting(False, 'DoRA on the CapaBoost-LoRA update: a learned magnitude per output row times the '
                                     'row-normalised W0 + dW (the norm detached, as DoRA and HF PEFT do); the '
                                     'magnitude is not masked and starts as the row norms of the weights present '
                                     'when CapaBoost is applied')
    target_modules: Tuple[str, ...] = setting(('attn.qkv',), 'LoRA target linears in every block',
                                               choices=LORA_TARGETS, nargs='+', flag='targets')
    # adapter
    adapter_bottleneck: int = setting(8, 'adapter bottleneck width b', range='[1, 65536]')
    adapter_scale: float = setting(0.1, 'adapter output scale s', range='(-inf, inf)')
    adapter_placement: str = setting('parallel', 'parallel: beside the MLP (AdaptFormer); sequential: after it',
                                      choices=ADAPTER_PLACEMENTS)
    # prompt
    prompt_length: int = setting(10, 'prompt tokens per block (VPT-deep)', range='[1, 4096]')
    prompt_rank: int = setting(8, 'rank of the factorised prompts; 0 = plain, unfactorised VPT-deep',
                               range='[0, 65536]', range_help='an integer >= 1, or 0 for plain (unfactorised) '
                                                              'VPT-deep prompts, at most 65536')
    prompt_dropout: float = setting(0.0, 'dropout on the prompts, in [0, 1)', range='[0, 1)')
    autocast_adapter_dtype: bool = setting(True, 'keep CapaBoost weights in float32 on a float16/bfloat16 base (as '
                                                  'HF PEFT does); inputs are cast at the boundary', cli=False)
    # what else trains
    train_head: bool = setting(True, 'train the classifier head', cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = tuple(self.target_modules)
        if isinstance(self.nm, (list, tuple)):
            self.nm = tuple(self.nm)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the parameter and what is allowed."""
        def bad(name: str, allowed: str) -> None:
            raise SettingError(name, f'{name}={getattr(self, name)!r} is invalid: {allowed}')

        for f in fields(self):  # every number: its kind and its range, from the field's metadata
            check_setting(f, getattr(self, f.name))
        if self.method not in METHODS:
            bad('method', f'choose one of {", ".join(METHODS)}')
        if self.mask_type not in MASK_TYPES:
            bad('mask_type', f'choose one of {", ".join(MASK_TYPES)}')
        if self.mask_type == 'nm':
            n, m = self.nm if isinstance(self.nm, tuple) and len(self.nm) == 2 else (0, 0)
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
                bad('nm', 'a pair (N, M) of integers with 0 < N <= M is required')
            if abs(self.mask_density - n / m) > 1e-9:
                bad('mask_density', f'with mask_type="nm" and nm={self.nm} it must equal N/M = {n / m}')
        if self.mask_scaling not in MASK_SCALINGS:
            bad('mask_scaling', f'choose one of {", ".join(MASK_SCALINGS)}')
        if self.lora_init not in LORA_INITS:
            bad('lora_init', f'choose one of {", ".join(LORA_INITS)}')
        if not isinstance(self.target_modules, tuple) or not self.target_modules \
                or any(t not in LORA_TARGETS for t in self.target_modules):
            bad('target_modules', f'choose from {", ".join(LORA_TARGETS)}')
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            bad('adapter_placement', f'choose one of {", ".join(ADAPTER_PLACEMENTS)}')
        for name in ('use_dora', 'autocast_adapter_dtype', 'train_head'):
            if not isinstance(getattr(self, name), bool):
                bad(name, 'true or false')
        if self.use_dora and self.method != 'lora':
            bad('use_dora', 'DoRA applies to the LoRA form only (method="lora")')

    @property
    def branch_scale(self) -> float:
        """Factor on the sum of the d masked branches: 1 (official code), or 1/(d*rho^2) for
        ``mask_scaling='expected'`` (each of the d branches keeps a rho^2 share of a product's terms on average)."""
        if self.mask_scaling == 'none':
            return 1.0
        return 1.0 / (self.num_masks * self.mask_density ** 2)

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha/r times ``branch_scale``."""
        return self.lora_alpha / self.rank * self.branch_scale

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly settings (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> 'CapaBoostConfig':
        """Build a config from the CapaBoost keys of ``kwargs``, removing them from it (for create_model)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})


CONFIG_KEYS = tuple(f.name for f in fields(CapaBoostConfig))
# the settings only one form reads: given for another form they would be silently ignored
FORM_ONLY_KEYS = {'lora': ('rank', 'lora_alpha', 'lora_dropout', 'lora_init', 'use_dora', 'target_modules'),
                  'adapter': ('adapter_bottleneck', 'adapter_scale', 'adapter_placement'),
                  'prompt': ('prompt_length', 'prompt_rank', 'prompt_dropout')}


def check_given_settings(given: Any, config: CapaBoostConfig) -> None:
    """SettingError for a setting given explicitly (``given``: its names) with a value other than its default that
    ``config`` would ignore: another form's setting, or N:M values without N:M masks. A default is never an error
    (a resolved config.yaml records every setting); only a value someone chose."""
    defaults = {f.name: field_default(f) for f in fields(CapaBoostConfig)}
    given = [key for key in given if key in defaults and getattr(config, key) != defaults[key]]
    for form, keys in FORM_ONLY_KEYS.items():
        for key in keys:
            if key in given and form != config.method:
                raise SettingError(key, f'{key} applies to the {form} form only; this method has form '
                                        f'{config.method!r}, which would ignore it')
    if 'nm' in given and config.mask_type != 'nm':
        raise SettingError('nm', f'nm applies to mask_type="nm" only; with mask_type={config.mask_type!r} it would be '
                                 f'ignored')
