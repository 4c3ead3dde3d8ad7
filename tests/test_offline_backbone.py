import importlib.util

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from offline_backbone import BASE_ARCH, fetch_offline_backbone, find_onnx_file


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return fetch_offline_backbone(directory=tmp_path_factory.mktemp('cache'))


def test_checkpoint_loads_strictly_into_timm(checkpoint):
    sd = load_file(str(checkpoint))
    model = timm.create_model(BASE_ARCH, num_classes=0, img_size=518)
    model.load_state_dict(sd, strict=True)  # every key matched, no extras
    assert sd['pos_embed'].shape == (1, 1 + 37 * 37, 384)
    assert float(sd['blocks.0.ls1.gamma'].abs().mean()) != pytest.approx(1e-5)  # trained, not timm's init


@pytest.mark.skipif(importlib.util.find_spec('onnxruntime') is None, reason='onnxruntime not installed')
def test_features_match_the_onnx_graph(checkpoint):
    import onnx
    import onnxruntime as ort
    graph = onnx.load(str(find_onnx_file()))
    out = '/backbone/layernorm/Add_1_output_0'  # the backbone's final LayerNorm output
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = session.run([out], {'input_image': x})[0]

    sd = load_file(str(checkpoint))
    # the graph resizes its 37x37 grid to 16x16 bicubic without antialias; do the same
    sd['pos_embed'] = resample_abs_pos_embed(sd['pos_embed'], (16, 16), num_prefix_tokens=1,
                                             interpolation='bicubic', antialias=False)
    model = timm.create_model(BASE_ARCH, num_classes=0, img_size=224).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(x)).numpy()
    assert feats.shape == ref.shape == (2, 257, 384)
    assert np.abs(feats - ref).max() < 1e-3


def test_capaboost_dinov2_model_loads_it_at_low_resolution(checkpoint):
    model = timm.create_model('vit_small_dinov2_capaboost_lora', pretrained=True, img_size=56, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(checkpoint)))
    sd = load_file(str(checkpoint))
    assert torch.equal(model.blocks[5].attn.qkv.weight, sd['blocks.5.attn.qkv.weight'])
    assert model.pos_embed.shape == (1, 1 + 16, 384)  # 37x37 grid resampled to 4x4 by timm
    assert model(torch.randn(1, 3, 56, 56)).shape == (1, 10)
