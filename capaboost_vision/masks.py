"""Static binary masks for CapaBoost.

Each adapted factor gets ``num_masks`` masks, drawn once at creation and never trained. They are generated on
the CPU from a generator seeded by a stable hash of (seed, module name, factor name, branch index), so the same
config gives the same masks in any process, whatever the global RNG state. The masks are also stored as buffers
and saved with the adapter, so a reload never depends on regenerating them.

Masked weights are recomputed on every forward pass, never cached: the masking is a few elementwise products on
the small factors (r x in and out x r for LoRA), negligible next to the base matmuls, and nothing can go stale
(in-place edits through ``.data``, ``load_state_dict``, ``.to()``, edited mask buffers). For inference without
any overhead, ``merge()`` folds CapaBoost-LoRA into the base weights.
"""
import hashlib
from typing import Sequence, Tuple

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text, stable across processes and Python versions (unlike ``hash()``)."""
    digest = hashlib.sha256('/'.join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)


def random_mask(shape: Sequence[int], density: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask keeping exactly floor(density * numel) entries, chosen uniformly at random."""
    numel = 1
    for s in shape:
        numel *= s
    keep = int(density * numel)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:keep]] = True
    return flat.view(*shape)


def nm_mask(shape: Sequence[int], n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """An N:M structured mask: in every group of M consecutive entries along the last (reduction) dim, N are kept.

    This is the layout sparse tensor cores accelerate (2:4 along the input dimension of a weight).
    """
    *lead, last = shape
    if last % m:
        raise ValueError(f'mask_type="nm" needs the reduction dimension ({last}) divisible by M={m}')
    groups = torch.rand(*lead, last // m, m, generator=generator)  # (..., groups, M)
    keep = groups.argsort(dim=-1)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(*shape)


def make_masks(
        shape: Sequence[int],
        num_masks: int,
        density: float,
        mask_type: str,
        nm: Tuple[int, int],
        seed: int,
        name: str,
) -> torch.Tensor:
    """``num_masks`` independent masks for one factor of shape ``shape``: a bool tensor (num_masks, *shape).

    ``density == 1`` gives all-ones masks (plain, unmasked branches).
    """
    numel = 1
    for s in shape:
        numel *= s
    if density < 1.0 and mask_type == 'random' and int(density * numel) == 0:
        raise ValueError(f'mask_density={density} keeps no entry of {name} ({numel} entries): '
                         f'use mask_density >= {1 / numel:.3g}')
    if density < 1.0 and mask_type == 'nm' and shape[-1] % nm[1]:
        raise ValueError(f'mask_type="nm" with M={nm[1]} does not fit {name}: its reduction dimension '
                         f'({shape[-1]}) is not divisible by M={nm[1]}; choose a rank/width divisible by {nm[1]} '
                         f'or mask_type="random"')
    masks = []
    for branch in range(num_masks):
        generator = torch.Generator(device='cpu').manual_seed(stable_seed(seed, name, branch))
        if density >= 1.0:
            masks.append(torch.ones(*shape, dtype=torch.bool))
        elif mask_type == 'nm':
            masks.append(nm_mask(shape, nm[0], nm[1], generator))
        else:
            masks.append(random_mask(shape, density, generator))
    return torch.stack(masks)


def masks_needed(num_masks: int, density: float) -> bool:
    """False for one branch at density 1 (plain LoRA, plain adapter): its one mask would be all ones, so the layer
    holds no mask at all (no buffer, no entry in the adapter file, no "fixed tensors" in the cost table)."""
    return num_masks > 1 or density < 1.0


def is_all_ones_mask(tensor: torch.Tensor) -> bool:
    """A bool tensor with every entry set: what plain forms stored as their mask before they held none."""
    return tensor.dtype == torch.bool and bool(tensor.all())


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """float32 for CapaBoost weights on a float16/bfloat16 base (PEFT's policy: small trainable weights keep full
    precision), else the base's dtype."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


def apply_masks(weight: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Concatenate the masked copies of ``weight`` along its last (rank) dimension, without d parameter copies.

    weight: (rows, k); masks: (rows, d, k) bool  ->  (rows, d*k) = [W⊙M_1 | W⊙M_2 | ... | W⊙M_d]
    """
    rows, num_masks, k = masks.shape
    return (weight.unsqueeze(1) * masks).reshape(rows, num_masks * k)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as packed bits (uint8, 8 entries a byte, big-endian within a byte), for compact adapter files."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).view(-1, 8)  # (bytes, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_mask``."""
    numel = 1
    for s in shape:
        numel *= s
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1  # (bytes, 8)
    return bits.flatten()[:numel].view(*shape).bool()
