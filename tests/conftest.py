import os
import sys

import pytest
import timm
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(__file__))
# the offline fixtures (real data and a real backbone from registry wheels) live beside the scripts, not in the library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))

import capaboost_vision  # noqa: E402,F401  (registers the models)


def tiny_vit(**kwargs):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kwargs)
    return timm.create_model('vit_tiny_patch16_224', **args)


def tiny_swin(**kwargs):
    args = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                num_classes=5)
    args.update(kwargs)
    return timm.create_model('swin_tiny_patch4_window7_224', **args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
