"""The one configuration object for every CapaBoost form (LoRA, adapter, prompt)."""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple

from .masks import MASK_TYPES

METHODS = ('lora', 'adapter', 'prompt')
LORA_TARGETS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')
ADAPTER_PLACEMENTS = ('parallel', 'sequential')


@dataclass
class CapaBoostConfig:
    """CapaBoost settings. Defaults follow the official code: d=2 masks of density 0.5, scaling alpha/r.

    ``num_masks=1, mask_density=1.0`` turns each form into its plain baseline (LoRA, adapter, low-rank prompt);
    ``prompt_rank=0`` gives plain, unfactorised VPT-deep prompts (0, not None: timm's create_model drops
    None-valued keyword arguments).
    """
    method: str = 'lora'
    num_masks: int = 2
    mask_density: float = 0.5
    mask_type: str = 'random'
    nm: Tuple[int, int] = (2, 4)
    seed: int = 0
    # LoRA
    rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Tuple[str, ...] = ('attn.qkv',)
    # adapter
    adapter_bottleneck: int = 8
    adapter_scale: float = 0.1
    adapter_placement: str = 'parallel'
    # prompt
    prompt_length: int = 10
    prompt_rank: int = 8
    prompt_dropout: float = 0.0
    # what else trains
    train_head: bool = True

    def __post_init__(self) -> None:
        self.target_modules = (self.target_modules,) if isinstance(self.target_modules, str) \
            else tuple(self.target_modules)
        self.nm = tuple(self.nm)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the parameter and what is allowed."""
        def bad(name: str, allowed: str) -> None:
            raise ValueError(f'{name}={getattr(self, name)!r} is invalid: {allowed}')

        if self.method not in METHODS:
            bad('method', f'choose one of {", ".join(METHODS)}')
        if isinstance(self.num_masks, bool) or not isinstance(self.num_masks, int) or self.num_masks < 1:
            bad('num_masks', 'an integer >= 1 is required')
        if not 0.0 < float(self.mask_density) <= 1.0:
            bad('mask_density', 'must lie in (0, 1]')
        if self.mask_type not in MASK_TYPES:
            bad('mask_type', f'choose one of {", ".join(MASK_TYPES)}')
        if self.mask_type == 'nm':
            n, m = self.nm if len(self.nm) == 2 else (0, 0)
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
                bad('nm', 'a pair (N, M) of integers with 0 < N <= M is required')
            if abs(self.mask_density - n / m) > 1e-9:
                bad('mask_density', f'with mask_type="nm" and nm={self.nm} it must equal N/M = {n / m}')
        if not isinstance(self.rank, int) or self.rank < 1:
            bad('rank', 'an integer >= 1 is required')
        if not 0.0 <= self.lora_dropout < 1.0:
            bad('lora_dropout', 'must lie in [0, 1)')
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules:
            bad('target_modules', f'choose from {", ".join(LORA_TARGETS)}')
        if not isinstance(self.adapter_bottleneck, int) or self.adapter_bottleneck < 1:
            bad('adapter_bottleneck', 'an integer >= 1 is required')
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            bad('adapter_placement', f'choose one of {", ".join(ADAPTER_PLACEMENTS)}')
        if not isinstance(self.prompt_length, int) or self.prompt_length < 1:
            bad('prompt_length', 'an integer >= 1 is required')
        if isinstance(self.prompt_rank, bool) or not isinstance(self.prompt_rank, int) or self.prompt_rank < 0:
            bad('prompt_rank', 'an integer >= 1, or 0 for plain (unfactorised) VPT-deep prompts')
        if not 0.0 <= self.prompt_dropout < 1.0:
            bad('prompt_dropout', 'must lie in [0, 1)')

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha/r (no 1/d: the official code sums the d branches unscaled)."""
        return self.lora_alpha / self.rank

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly settings (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> 'CapaBoostConfig':
        """Build a config from the CapaBoost keys of ``kwargs``, removing them from it (for create_model)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})


CONFIG_KEYS = tuple(f.name for f in fields(CapaBoostConfig))
