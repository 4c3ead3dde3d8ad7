import os
import sys

import pytest
import timm
import torch
from safetensors.torch import save

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(__file__))
# the offline fixtures (real data and a real backbone from registry wheels) live beside the scripts, not in the library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))

import capaboost_vision  # noqa: E402,F401  (registers the models)
from hub_server import HubServer  # noqa: E402

BASE_REPO = 'timm/vit_tiny_patch16_224.augreg_in21k'


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


@pytest.fixture
def hub(tmp_path):
    """A loopback Hub holding a (random) base checkpoint where timm looks for the tiny ViT's weights."""
    server = HubServer()
    base = timm.create_model('vit_tiny_patch16_224', num_classes=0)
    server.store.create(BASE_REPO)
    repo = server.store.repos[BASE_REPO]
    repo['commits'][repo['branches']['main']]['model.safetensors'] = save(base.state_dict())
    with server:
        env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
        env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET='1', HF_HOME=str(tmp_path / 'hf'),
                   HF_TOKEN='hf_test_token_not_printed', HF_HUB_DISABLE_TELEMETRY='1')
        yield server, env
