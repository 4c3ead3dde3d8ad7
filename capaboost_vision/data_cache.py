"""Decode once, train from memory: the VTAB-1k data path that never starves a GPU.

A VTAB-1k train split is 1,000 images (150 MB as uint8 at 224 px). Each split a run reads is decoded and
squash-resized once (``data.load_resized``: the same pixels as the decode path) into a uint8 ``.npy`` file under
the cache folder, keyed by (task folder, split, list-file contents, size, resize method), so every run of a
sweep shares it. Building it shows a progress bar and doubles as the split's validation: a missing or corrupt
image fails here, before any training, in one line naming the list file and line.

A run then keeps the train split in memory (on the GPU when there is one) and builds batches by indexing, with
the /255 and normalisation on the device. Splits larger than the budget (dSprites' 74k test images at 224 px
are 11 GB) are validated once (a stamp file remembers it) and stream through a DataLoader with workers.
"""
import contextlib
import fcntl
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ._io import atomic_path
from .data import RESIZE_METHOD, DataError, VTABDataset, load_resized, to_float_normalized

CACHE_VERSION = 1


def cache_key(dataset: VTABDataset) -> str:
    """(task folder, split, list contents, size, resize method) as a short hash; the file name carries it."""
    parts = [str(CACHE_VERSION), str(dataset.dir.resolve()), dataset.list_file.name,
             dataset.list_file.read_bytes().hex(), str(dataset.img_size), RESIZE_METHOD]
    digest = hashlib.sha256('\0'.join(parts).encode()).hexdigest()[:16]
    return f'{dataset.dir.name}-{dataset.list_file.stem}-{dataset.img_size}px-{RESIZE_METHOD}-{digest}'


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock, so parallel runs of a sweep build each cache file once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _decode_all(dataset: VTABDataset, desc: str, show_progress: bool) -> Iterator[Tuple[int, np.ndarray]]:
    """(index, uint8 (3, H, W) pixels) of every image in list order, with a progress bar; DataError (file:line)
    on the first missing or undecodable image."""
    for i in tqdm(range(len(dataset)), desc=f'{desc} {dataset.list_file}', leave=False,
                  disable=None if show_progress else True):
        sample = dataset.samples[i]
        try:
            yield i, load_resized(dataset.dir / sample.path, dataset.img_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise dataset.image_error(sample, e) from None


def split_bytes(dataset: VTABDataset) -> int:
    return len(dataset) * 3 * dataset.img_size ** 2


def build_cache(dataset: VTABDataset, cache_dir: Path, show_progress: bool = True) -> Path:
    """The split's uint8 (N, 3, H, W) ``.npy`` file, built (atomically, under a lock) when missing."""
    path = Path(cache_dir) / f'{cache_key(dataset)}.npy'
    with _locked(path.with_suffix('.lock')):
        if path.is_file():
            return path
        size = dataset.img_size
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=(len(dataset), 3, size, size))
            for i, pixels in _decode_all(dataset, 'caching', show_progress):
                out[i] = pixels
            out.flush()
            del out
    return path


def validate_split(dataset: VTABDataset, cache_dir: Path, show_progress: bool = True) -> None:
    """Decode every image of a split too large to cache, once per dataset (a stamp file remembers it)."""
    stamp = Path(cache_dir) / f'{cache_key(dataset)}.ok'
    with _locked(stamp.with_suffix('.lock')):
        if stamp.is_file():
            return
        for _ in _decode_all(dataset, 'checking', show_progress):
            pass
        with atomic_path(stamp) as tmp:
            Path(tmp).write_text('ok\n')


@dataclass
class CachedSplit:
    """A decoded split: images uint8 (N, 3, H, W) (in memory, on a device, or a read-only memmap), labels (N,)."""
    images: Union[torch.Tensor, np.ndarray]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels at ``index`` (1-D), on ``device``."""
        if isinstance(self.images, np.ndarray):  # memmap: read just these rows
            x = torch.from_numpy(np.ascontiguousarray(self.images[index.numpy()]))
        else:
            x = self.images[index.to(self.images.device)]
        return x.to(device, non_blocking=True), self.labels[index].to(device, non_blocking=True)


def prepare_split(dataset: VTABDataset, cache_dir: Path, budget_bytes: int, device: Optional[torch.device],
                  show_progress: bool = True) -> Union[CachedSplit, VTABDataset]:
    """Validate a split before training and return how to read it.

    Within ``budget_bytes``: a ``CachedSplit`` decoded once, held on ``device`` (the train split) or, with
    ``device=None``, memory-mapped from the cache file (eval splits). Beyond it: the ``VTABDataset`` itself,
    for the decode path, after one validation pass.
    """
    labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.int64)
    if split_bytes(dataset) > budget_bytes:
        validate_split(dataset, cache_dir, show_progress)
        return dataset
    path = build_cache(dataset, cache_dir, show_progress)
    images = np.load(path, mmap_mode='r')
    if images.shape != (len(dataset), 3, dataset.img_size, dataset.img_size):
        raise DataError(f'cache file {path} has shape {images.shape}: delete it to rebuild')
    if device is None:
        return CachedSplit(images, labels)
    return CachedSplit(torch.from_numpy(np.array(images)).to(device), labels)


class CachedLoader:
    """Batches of a ``CachedSplit`` in ``order`` (e.g. a DistributedSampler's), normalised on the device: the
    same batches, bit for bit, as a DataLoader over the decode path with the same sampler and batch size."""

    def __init__(self, split: CachedSplit, batch_size: int, order: Sequence[int], device: torch.device,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.split, self.batch_size, self.order, self.device = split, batch_size, order, device
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.order), dtype=torch.int64)
        for start in range(0, len(order), self.batch_size):
            x, y = self.split.batch(order[start:start + self.batch_size], self.device)
            yield to_float_normalized(x, self.mean, self.std), y


class DecodeLoader:
    """The decode path: a DataLoader over ``VTABDataset`` (uint8), normalised on the device like ``CachedLoader``."""

    def __init__(self, dataset: VTABDataset, batch_size: int, sampler, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], workers: int) -> None:
        # its own generator: the DataLoader draws worker seeds from it, never from the global RNG that drop-path
        # uses, so the decode and cached paths train identically
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                  num_workers=workers, pin_memory=device.type == 'cuda',
                                                  generator=torch.Generator().manual_seed(0))
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
