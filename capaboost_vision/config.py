"""The one configuration object for every CapaBoost form: shared mask settings plus the active form's own section.

Each setting is defined once: a dataclass field with its help text (and choices where the set is closed) in
``metadata``, from which ``create_model`` kwargs, the CLI flags, the YAML keys and the model card derive. The shared
settings are ``CapaBoostConfig``'s fields; each form's own settings are a section (``LoRASettings``, ...) registered
under the form's name with ``register_form_settings``, so a run, an adapter file and a card hold only the settings
their form reads, and a form added from outside the package brings its own section. This module imports no torch,
so the CLI can build its parser before the heavy imports.
"""
import dataclasses
import math
from dataclasses import MISSING, Field, dataclass, field, fields
from numbers import Real
from typing import Any, Dict, Iterator, List, Tuple

MASK_TYPES = ('random', 'nm')
LORA_TARGETS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')
ADAPTER_PLACEMENTS = ('parallel', 'sequential')
MASK_SCALINGS = ('none', 'expected')
LORA_INITS = ('peft', 'official')
MAX_CLASSES = 1_000_000  # a class count above this is a typo or a hostile file, not a head to allocate
VTAB_GROUPS = ('natural', 'specialized', 'structured')  # VTAB-1k's groups: cards' vtab-1k tag, report columns


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
class LoRASettings:
    """The LoRA form's own settings."""
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

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (str, list)):
            self.target_modules = (self.target_modules,) if isinstance(self.target_modules, str) \
                else tuple(self.target_modules)

    def validate(self) -> None:
        if not isinstance(self.target_modules, tuple) or not self.target_modules:
            raise SettingError('target_modules', f'target_modules={self.target_modules!r} is invalid: choose from '
                                                 f'{", ".join(LORA_TARGETS)}')


@dataclass
class AdapterSettings:
    """The adapter form's own settings."""
    adapter_bottleneck: int = setting(8, 'adapter bottleneck width b', range='[1, 65536]')
    adapter_scale: float = setting(0.1, 'adapter output scale s', range='(-inf, inf)')
    adapter_placement: str = setting('parallel', 'parallel: beside the MLP (AdaptFormer); sequential: after it',
                                      choices=ADAPTER_PLACEMENTS)


@dataclass
class PromptSettings:
    """The prompt form's own settings."""
    prompt_length: int = setting(10, 'prompt tokens per block (VPT-deep)', range='[1, 4096]')
    prompt_rank: int = setting(8, 'rank of the factorised prompts; 0 = plain, unfactorised VPT-deep',
                               range='[0, 65536]', range_help='an integer >= 1, or 0 for plain (unfactorised) '
                                                              'VPT-deep prompts, at most 65536')
    prompt_dropout: float = setting(0.0, 'dropout on the prompts, in [0, 1)', range='[0, 1)')


FORM_SETTINGS: Dict[str, type] = {}
"""{form name: the dataclass of its own settings}; its keys are the CapaBoost forms there are."""
SETTING_FORM: Dict[str, str] = {}
"""{setting name: the form it belongs to}, for every form's own settings (kept by ``register_form_settings``)."""


def register_form_settings(form: str, settings: type) -> type:
    """Make ``form`` a CapaBoost form with the settings dataclass ``settings`` (its fields declared with
    ``setting``). A form name is a plain identifier without '_' ('<family>_capaboost_<form>' is split at the last
    '_'), and a setting name belongs to one form only (create_model kwargs and CLI flags are flat)."""
    if not form.isidentifier() or '_' in form or not form.islower():
        raise ValueError(f'form name {form!r} is invalid: lower-case letters and digits only (no "_": model names '
                         f'end in "_capaboost_<form>")')
    taken = {name: owner for name, owner in SETTING_FORM.items() if owner != form}
    taken.update({f.name: 'every form' for f in fields(CapaBoostConfig)})
    for f in fields(settings):
        if f.name in taken:
            raise ValueError(f'setting {f.name!r} of form {form!r} is already a setting of {taken[f.name]}')
    for name in [name for name, owner in SETTING_FORM.items() if owner == form]:  # registered again: replaced
        del SETTING_FORM[name]
    FORM_SETTINGS[form] = settings
    SETTING_FORM.update({f.name: form for f in fields(settings)})
    return settings


def form_names() -> Tuple[str, ...]:
    """The registered CapaBoost forms, in registration order ('lora', 'adapter', 'prompt', ...)."""
    return tuple(FORM_SETTINGS)


def setting_fields() -> Iterator[Field]:
    """Every setting: the shared ones, then each registered form's own (the CLI's flags, ``create_model``'s
    CapaBoost kwargs)."""
    yield from (f for f in fields(CapaBoostConfig) if f.name != 'section')
    for cls in FORM_SETTINGS.values():
        yield from fields(cls)


def config_keys() -> Tuple[str, ...]:
    """The names of every setting of every registered form ('method' included)."""
    return tuple(f.name for f in setting_fields())


def setting_defaults() -> Dict[str, Any]:
    """{setting name: default} for every setting of every registered form."""
    return {f.name: field_default(f) for f in setting_fields()}


def check_choices(f: Field, value: Any) -> None:
    """SettingError when a setting with ``choices`` has a value (or, for a list setting, an element) outside them."""
    choices = f.metadata.get('choices')
    if choices is None:
        return
    values = value if f.metadata.get('nargs') and isinstance(value, (tuple, list)) else (value,)
    if any(not isinstance(v, str) or v not in choices for v in values):
        verb = 'choose from' if f.metadata.get('nargs') else 'choose one of'
        raise SettingError(f.name, f'{f.name}={value!r} is invalid: {verb} {", ".join(choices)}')


@dataclass(init=False)
class CapaBoostConfig:
    """CapaBoost settings: the shared mask settings (fields) plus ``section``, the form's own settings (a registered
    settings dataclass), read as attributes too (``config.rank``). Defaults follow the official code: d=2 masks of
    density 0.5, scaling alpha/r.

    ``CapaBoostConfig(method='lora', rank=4)`` takes every setting flat, as ``create_model`` does; another form's
    setting at its default is dropped (records made before the sections hold every form's settings), at another
    value it is an error (the form would ignore it). ``num_masks=1, mask_density=1.0`` turns each form into its
    plain baseline (LoRA, adapter, low-rank prompt); ``prompt_rank=0`` gives plain, unfactorised VPT-deep prompts
    (0, not None: timm's create_model drops None-valued keyword arguments).
    """
    method: str = setting('lora', 'CapaBoost form', cli=False)
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
    autocast_adapter_dtype: bool = setting(True, 'keep CapaBoost weights in float32 on a float16/bfloat16 base (as '
                                                  'HF PEFT does); inputs are cast at the boundary', cli=False)
    train_head: bool = setting(True, 'train the classifier head', cli=False)
    section: Any = setting(None, "the form's own settings", cli=False)

    def __init__(self, method: str = 'lora', **settings: Any) -> None:
        if method not in FORM_SETTINGS:
            raise SettingError('method', f'method={method!r} is invalid: choose one of {", ".join(FORM_SETTINGS)}')
        self.method = method
        for f in fields(self):
            if f.name not in ('method', 'section'):
                setattr(self, f.name, settings.pop(f.name, field_default(f)))
        own_cls = FORM_SETTINGS[method]
        section = settings.pop('section', None)
        own = {f.name for f in fields(own_cls)}
        given = {k: settings.pop(k) for k in list(settings) if k in own}
        defaults = setting_defaults()
        for key, value in settings.items():
            owner = SETTING_FORM.get(key)
            if owner is None:
                raise TypeError(f'CapaBoostConfig got an unexpected setting {key!r}')
            default = defaults[key]
            if value != default and value != (list(default) if isinstance(default, tuple) else default):
                raise SettingError(key, f'{key} applies to the {owner} form only; this method has form {method!r}, '
                                        f'which would ignore it')
        if section is not None and not isinstance(section, own_cls):
            raise TypeError(f'section must be a {own_cls.__name__} for form {method!r}, not {type(section).__name__}')
        self.section = dataclasses.replace(section, **given) if section is not None else own_cls(**given)
        if isinstance(self.nm, list):
            self.nm = tuple(self.nm)
        self.validate()

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> 'CapaBoostConfig':
        """The config a recorded settings mapping (a config.yaml's capaboost block, an adapter's config.json) stands
        for: the settings of another form, which that form never read, are left out whatever their value."""
        record = dict(record)
        method = record.get('method', 'lora')
        return cls(**{k: v for k, v in record.items() if SETTING_FORM.get(k, method) == method})

    def __getattr__(self, name: str) -> Any:
        """A setting of the form's own section (``config.rank``); another form's setting is an AttributeError saying
        whose it is."""
        section = self.__dict__.get('section')
        if section is not None and name in section.__dataclass_fields__:
            return getattr(section, name)
        owner = SETTING_FORM.get(name)
        if owner is not None:
            raise AttributeError(f'{name} is a setting of the {owner} form; this config has form '
                                 f'{self.__dict__.get("method")!r}')
        raise AttributeError(name)

    def validate(self) -> None:
        """Raise SettingError (a ValueError) naming the parameter and what is allowed."""
        def bad(name: str, allowed: str) -> None:
            raise SettingError(name, f'{name}={getattr(self, name)!r} is invalid: {allowed}')

        if self.method not in FORM_SETTINGS or not isinstance(self.section, FORM_SETTINGS[self.method]):
            bad('method', f'choose one of {", ".join(FORM_SETTINGS)}')
        for f in setting_fields_of(self):  # every number: its kind and range; every closed set: its choices
            check_setting(f, getattr(self, f.name))
            check_choices(f, getattr(self, f.name))
        if self.mask_type == 'nm':
            n, m = self.nm if isinstance(self.nm, tuple) and len(self.nm) == 2 else (0, 0)
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
                bad('nm', 'a pair (N, M) of integers with 0 < N <= M is required')
            if abs(self.mask_density - n / m) > 1e-9:
                bad('mask_density', f'with mask_type="nm" and nm={self.nm} it must equal N/M = {n / m}')
        for f in setting_fields_of(self):
            if isinstance(field_default(f), bool) and not isinstance(getattr(self, f.name), bool):
                bad(f.name, 'true or false')
        if hasattr(self.section, 'validate'):
            self.section.validate()

    @property
    def branch_scale(self) -> float:
        """Factor on the sum of the d masked branches: 1 (official code), or 1/(d*rho^2) for
        ``mask_scaling='expected'`` (each of the d branches keeps a rho^2 share of a product's terms on average)."""
        if self.mask_scaling == 'none':
            return 1.0
        return 1.0 / (self.num_masks * self.mask_density ** 2)

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha/r times ``branch_scale`` (the LoRA form)."""
        return self.lora_alpha / self.rank * self.branch_scale

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly settings, flat: the shared ones and the form's own (tuples become lists)."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in setting_fields_of(self) for v in (getattr(self, f.name),)}

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> 'CapaBoostConfig':
        """Build a config from the CapaBoost keys of ``kwargs`` (any registered form's), removing them from it (for
        create_model)."""
        names = set(config_keys())
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})


def setting_fields_of(config: CapaBoostConfig) -> List[Field]:
    """The settings ``config`` holds: the shared ones and its form's own, in that order."""
    return [f for f in fields(CapaBoostConfig) if f.name != 'section'] + list(fields(config.section))


register_form_settings('lora', LoRASettings)
register_form_settings('adapter', AdapterSettings)
register_form_settings('prompt', PromptSettings)


def check_given_settings(given: Any, config: CapaBoostConfig) -> None:
    """SettingError for N:M values given explicitly (``given``: setting names) without N:M masks (another form's
    setting is refused by ``CapaBoostConfig`` itself). A default is never an error (a resolved config.yaml records
    every setting); only a value someone chose."""
    defaults = setting_defaults()
    if 'nm' in given and config.mask_type != 'nm' and tuple(config.nm) != defaults['nm']:
        raise SettingError('nm', f'nm applies to mask_type="nm" only; with mask_type={config.mask_type!r} it would be '
                                 f'ignored')
