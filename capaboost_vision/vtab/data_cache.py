"""Decode once, train from memory: the VTAB-1k data path that never starves a GPU.

A VTAB-1k train split is 1,000 images (150 MB as uint8 at 224 px). Each split a run reads is decoded and
squash-resized once (``data.load_resized``: the same pixels as the decode path) into a uint8 ``.npy`` file under
the cache folder, keyed by (task folder, split, list-file contents, each listed file's size and modification
time, size, resize method), so every run of a sweep shares it and an image changed in place is decoded again.
Beside it a ``.json`` header records the key, shape, dtype and the SHA-256 of the pixels (and of the source files'
bytes); a cache file that does not match its header is rebuilt, never trained on. Building it shows a progress bar
and doubles as the split's validation: a missing or corrupt image fails here, before any training, in one line
naming the list file and line.

A run then keeps the train split in memory (on the GPU when there is one) and builds batches by indexing, with
the /255 and normalisation on the device. Splits larger than the budget (dSprites' 74k test images at 224 px
are 11 GB) are validated once (a stamp file remembers it) and stream through a DataLoader with workers.
"""
import errno
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .._io import atomic_path, exclusive_lock, leftover_temps, remove_leftovers, write_text_atomic
from .data import RESIZE_METHOD, ImageSplit, load_resized, to_float_normalized

CACHE_VERSION = 3  # 3: keyed by the images' content, not their sizes and modification times


def cache_key(dataset: ImageSplit) -> str:
    """(the split's list: its folder, name and text; size; resize method; the SHA-256 of every listed image's bytes)
    as a short hash; the file name carries it. The content, not the files' stats: an image rewritten in place with
    the same size and modification time is decoded again, and the run records the data it really read."""
    parts = [str(CACHE_VERSION), *dataset.list_identity(), str(dataset.img_size), RESIZE_METHOD,
             dataset.content_sha256]
    digest = hashlib.sha256('\0'.join(parts).encode()).hexdigest()[:16]
    return f'{dataset.cache_name}-{dataset.img_size}px-{RESIZE_METHOD}-{digest}'


def _decode_all(dataset: ImageSplit, desc: str, show_progress: bool) -> Iterator[Tuple[int, np.ndarray]]:
    """(index, uint8 (3, H, W) pixels) of every image in list order, with a progress bar; DataError (file:line)
    on the first missing or undecodable image."""
    for i in tqdm(range(len(dataset)), desc=f'{desc} {dataset.list_file}', leave=False,
                  disable=None if show_progress else True):
        sample = dataset.samples[i]
        try:
            data = dataset.read_bytes(sample)
            pixels = load_resized(io.BytesIO(data), dataset.img_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise dataset.image_error(sample, e) from None
        yield i, pixels


def _header_file(path: Path) -> Path:
    return path.with_suffix('.json')


def _cache_problem(path: Path, key: str, shape: Tuple[int, ...]) -> Optional[str]:
    """Why the cache file ``path`` cannot be trusted (None when it can): its header file (key, shape, dtype and
    the SHA-256 of the pixels, written after the pixels) must be present and match what the file holds."""
    try:
        header = json.loads(_header_file(path).read_text())
        if not isinstance(header, dict):
            raise ValueError
    except FileNotFoundError:
        return 'it has no header file (an interrupted build?)'
    except (OSError, ValueError):
        return f'its header {_header_file(path).name} is unreadable'
    if header.get('key') != key or header.get('version') != CACHE_VERSION:
        return f'its header {_header_file(path).name} describes another cache'
    try:
        images = np.load(path, mmap_mode='r')
    except (OSError, ValueError, EOFError) as e:
        return f'it is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else "no details"})'
    if images.dtype != np.uint8 or images.shape != shape:
        return f'it holds {images.dtype} {images.shape}, expected uint8 {shape}'
    if header.get('shape') != list(shape) or header.get('dtype') != 'uint8':
        return f'its header {_header_file(path).name} records another shape or dtype'
    if hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast('B')).hexdigest() != header.get('sha256'):
        return 'its pixels do not match the checksum in its header (changed or damaged on disk)'
    return None


def split_bytes(dataset: ImageSplit) -> int:
    return len(dataset) * 3 * dataset.img_size ** 2


def _reserve_space(path: str) -> None:
    """Allocate the whole (sparse) memmap file now, so a full disk fails here with ENOSPC instead of killing the
    process with a bus error when a page of the mapping is written. Skipped where the filesystem cannot."""
    with open(path, 'r+b') as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def build_cache(dataset: ImageSplit, cache_dir: Path, show_progress: bool = True) -> Path:
    """The split's uint8 (N, 3, H, W) ``.npy`` file and its ``.json`` header (key, shape, dtype, SHA-256 of the
    pixels and of the source files), built atomically under a lock when missing. A file that does not match its
    header (truncated, another dtype, damaged pixels, no header) is rebuilt, with a note naming it."""
    key = cache_key(dataset)
    path = Path(cache_dir) / f'{key}.npy'
    shape = (len(dataset), 3, dataset.img_size, dataset.img_size)
    with exclusive_lock(path.with_suffix('.lock'), wait=True):  # parallel runs build each file once
        remove_leftovers(leftover_temps(path) + leftover_temps(_header_file(path)), path.parent)
        if path.is_file() or _header_file(path).is_file():
            problem = _cache_problem(path, key, shape)
            if problem is None:
                return path
            print(f'note: cache file {path} cannot be used: {problem}; rebuilding it', file=sys.stderr)
            _header_file(path).unlink(missing_ok=True)
        pixels_hash = hashlib.sha256()
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=shape)
            _reserve_space(tmp)
            for i, pixels in _decode_all(dataset, 'caching', show_progress):
                out[i] = pixels
                pixels_hash.update(pixels.tobytes())  # rows in order: the hash of the C-ordered array
            out.flush()
            del out
        header = {'version': CACHE_VERSION, 'key': key, 'list_file': str(dataset.list_file),
                  'shape': list(shape), 'dtype': 'uint8', 'sha256': pixels_hash.hexdigest(),
                  'sources_sha256': dataset.content_sha256}
        write_text_atomic(_header_file(path), json.dumps(header, indent=1))
    return path


def validate_split(dataset: ImageSplit, cache_dir: Path, show_progress: bool = True) -> None:
    """Decode every image of a split too large to cache, once per content (a stamp file, keyed as the cache is,
    remembers it)."""
    stamp = Path(cache_dir) / f'{cache_key(dataset)}.ok'
    with exclusive_lock(stamp.with_suffix('.lock'), wait=True):
        remove_leftovers(leftover_temps(stamp), stamp.parent)
        if stamp.is_file():
            return
        for _ in _decode_all(dataset, 'checking', show_progress):
            pass
        write_text_atomic(stamp, json.dumps({'version': CACHE_VERSION, 'sources_sha256': dataset.content_sha256}))


@dataclass
class CachedSplit:
    """A decoded split: images uint8 (N, 3, H, W) (in memory, on a device, or a read-only memmap), labels (N,)."""
    images: Union[torch.Tensor, np.ndarray]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        """One image, uint8 (3, H, W) on the CPU, and its label (for per-image augmentation)."""
        image = self.images[index]
        image = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image.cpu()
        return image, int(self.labels[index])

    def batch(self, index: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels at ``index`` (1-D), on ``device``."""
        if isinstance(self.images, np.ndarray):  # memmap: read just these rows
            x = torch.from_numpy(np.ascontiguousarray(self.images[index.numpy()]))
        else:
            x = self.images[index.to(self.images.device)]
        return x.to(device, non_blocking=True), self.labels[index].to(device, non_blocking=True)


def prepare_split(dataset: ImageSplit, cache_dir: Path, budget_bytes: int, device: Optional[torch.device],
                  show_progress: bool = True) -> Union[CachedSplit, ImageSplit]:
    """Validate a split before training and return how to read it.

    Within ``budget_bytes``: a ``CachedSplit`` decoded once, held on ``device`` (the train split) or, with
    ``device=None``, memory-mapped from the cache file (eval splits). Beyond it: the ``ImageSplit`` itself,
    for the decode path, after one validation pass.
    """
    labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.int64)
    if split_bytes(dataset) > budget_bytes:
        validate_split(dataset, cache_dir, show_progress)
        return dataset
    images = np.load(build_cache(dataset, cache_dir, show_progress), mmap_mode='r')  # checked against its header
    if device is None:
        return CachedSplit(images, labels)
    return CachedSplit(torch.from_numpy(np.array(images)).to(device), labels)


class CachedLoader:
    """Batches of a ``CachedSplit`` in ``order`` (e.g. a DistributedSampler's), normalised on the device: the
    same batches, bit for bit, as a DataLoader over the decode path with the same sampler and batch size."""

    def __init__(self, split: CachedSplit, batch_size: int, order: Sequence[int], device: torch.device,
                 mean: Sequence[float], std: Sequence[float], drop_last: bool = False) -> None:
        self.split, self.batch_size, self.order, self.device = split, batch_size, order, device
        self.mean, self.std, self.drop_last = mean, std, drop_last

    def __len__(self) -> int:
        return (len(self.order) // self.batch_size) if self.drop_last else math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.order), dtype=torch.int64)
        if self.drop_last:
            order = order[:len(self) * self.batch_size]
        for start in range(0, len(order), self.batch_size):
            x, y = self.split.batch(order[start:start + self.batch_size], self.device)
            yield to_float_normalized(x, self.mean, self.std), y


class DecodeLoader:
    """The decode path: a DataLoader over ``ImageSplit`` (uint8), normalised on the device like ``CachedLoader``."""

    def __init__(self, dataset: Any, batch_size: int, sampler, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], workers: int, drop_last: bool = False) -> None:
        # its own generator: the DataLoader draws worker seeds from it, never from the global RNG that drop-path
        # uses, so the decode and cached paths train identically
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                  num_workers=workers, pin_memory=device.type == 'cuda',
                                                  generator=torch.Generator().manual_seed(0), drop_last=drop_last)
        self.device, self.mean, self.std = device, mean, std

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield (to_float_normalized(x.to(self.device, non_blocking=True), self.mean, self.std),
                   y.to(self.device, non_blocking=True))


def default_cache_dir(output: Union[str, Path], cache_dir: Optional[str]) -> Path:
    """``cache_dir`` if given, else ``<output>/.cache``: shared by every run written under one output folder."""
    return Path(cache_dir) if cache_dir else Path(output) / '.cache'


def make_loader(data: Any, batch_size: int, order: Any, device: torch.device, mean: Sequence[float],
                std: Sequence[float], workers: int, drop_last: bool = False) -> Any:
    """Batches of ``data`` in ``order`` (a sampler or index range): from the decoded cache, or read through a
    DataLoader (the decode path, or an augmented split); ``drop_last`` drops a last incomplete batch (mixup)."""
    if isinstance(data, CachedSplit):
        return CachedLoader(data, batch_size, order, device, mean, std, drop_last)
    return DecodeLoader(data, batch_size, order if isinstance(order, DistributedSampler) else list(order), device,
                        mean, std, workers, drop_last)
