import io
from contextlib import redirect_stdout
import subprocess
import sys

import pytest
import torch

from capaboost_vision.masks import make_masks, stable_seed


def test_random_masks_keep_exactly_floor_density():
    masks = make_masks((7, 13), num_masks=3, density=0.37, mask_type='random', nm=(2, 4), seed=0, name='x')
    assert masks.shape == (3, 7, 13) and masks.dtype == torch.bool
    assert all(int(m.sum()) == int(0.37 * 91) for m in masks)
    assert not torch.equal(masks[0], masks[1])  # independent per branch


def test_masks_differ_per_factor_name_and_seed():
    a = make_masks((8, 16), 1, 0.5, 'random', (2, 4), seed=0, name='blocks.0.attn.qkv.lora_A')
    b = make_masks((8, 16), 1, 0.5, 'random', (2, 4), seed=0, name='blocks.0.attn.qkv.lora_B')
    c = make_masks((8, 16), 1, 0.5, 'random', (2, 4), seed=1, name='blocks.0.attn.qkv.lora_A')
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, make_masks((8, 16), 1, 0.5, 'random', (2, 4), seed=0, name='blocks.0.attn.qkv.lora_A'))


def test_nm_masks_are_n_of_m_along_the_last_dim():
    masks = make_masks((6, 16), 2, 0.5, 'nm', (2, 4), seed=3, name='x')
    groups = masks.view(2, 6, 4, 4)
    assert torch.all(groups.sum(-1) == 2)
    with pytest.raises(ValueError, match='divisible by M=4'):
        make_masks((6, 10), 2, 0.5, 'nm', (2, 4), seed=3, name='x')


def test_full_density_gives_all_ones():
    assert make_masks((3, 5), 2, 1.0, 'random', (2, 4), seed=0, name='x').all()


def test_stable_seed_is_not_python_hash():
    assert stable_seed(0, 'a') == stable_seed(0, 'a') != stable_seed(0, 'b')


_CHILD = """
import torch, sys
torch.manual_seed(int(sys.argv[1])); torch.rand(100)
from capaboost_vision.masks import make_masks
m = make_masks((16, 24), 2, 0.5, 'random', (2, 4), seed=7, name='blocks.3.attn.qkv.lora_A')
print(''.join('1' if v else '0' for v in m.flatten().tolist()))
"""


def test_masks_identical_across_processes_with_different_global_seeds():
    fresh = subprocess.run([sys.executable, '-c', _CHILD, '12345'], capture_output=True, text=True, check=True).stdout
    here = io.StringIO()
    with redirect_stdout(here):  # this process, its global RNG elsewhere
        exec(_CHILD.replace('int(sys.argv[1])', '1'), {})
    assert fresh == here.getvalue() and len(fresh.strip()) == 2 * 16 * 24


def test_pack_unpack_round_trip():
    from capaboost_vision.masks import pack_mask, unpack_mask
    mask = make_masks((5, 13), 3, 0.4, 'random', (2, 4), seed=1, name='x')
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (3 * 5 * 13 + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
