"""VTAB-1k data in the vision-PEFT layout (NOAH's preparation script):
``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line ``relative/image/path label``.

The pixels a model sees come from one place: ``vtab_resize`` (the literature's squash-resize, bicubic, on the
PIL image) then ``to_float_normalized`` (ToTensor's /255 and Normalize's (x - mean) / std). The decode path
(``VTABDataset`` through a DataLoader) and the decode-once cache (``data_cache``) both use exactly these, so
their batches are bit-identical.
"""
import functools
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, Resize

from .tasks import Task, task_dir

SPLITS = ('train800', 'val200', 'train800val200', 'test')
EXPECTED_LINES = {'train800': 800, 'val200': 200, 'train800val200': 1000}
PROTOCOL_SPLITS = {'final': ('train800val200', 'test'), 'val': ('train800', 'val200')}
RESIZE_METHOD = 'squash-bicubic'  # recorded in cache keys and results


class DataError(ValueError):
    """A data problem, named by file and line: printed as one line by the CLI."""


class Sample(NamedTuple):
    path: str
    label: int
    line: int  # 1-based line in the list file, for error messages


_LABEL = re.compile(r'-?[0-9]+')  # ASCII digits only: str.isdigit() also takes '²' (int() fails) and '١' (read as 1)


def parse_line(line: str, list_file: Path, lineno: int, num_classes: int) -> Sample:
    """Line ``lineno`` of ``list_file``, ``relative/image/path label``; DataError naming file:line when it does not
    parse, its label is outside [0, num_classes), or its path leaves the task folder (absolute, or a '..' part)."""
    where = f'{list_file}:{lineno}'
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
        raise DataError(f'{where}: line does not parse (expected "relative/image/path label", the label in ASCII '
                        f'digits): {line!r}')
    path, label = parts[0], int(parts[1])
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive \
            or '..' in PureWindowsPath(path).parts:
        raise DataError(f'{where}: image path {path!r} leaves the task folder: list paths are relative to it, '
                        f'without absolute paths or ".." parts')
    if not 0 <= label < num_classes:
        raise DataError(f'{where}: label {label} is outside [0, {num_classes - 1}]')
    return Sample(path, label, lineno)


def read_list(list_file: Path, num_classes: int) -> List[Sample]:
    """Parse a split list. Raises DataError naming file and line for a line that does not parse, a bad label or a
    path outside the task folder."""
    if not list_file.is_file():
        raise DataError(f'list file {list_file} does not exist')
    try:
        text = list_file.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise DataError(f'list file {list_file} is not UTF-8 text (byte {e.start}); save it as UTF-8') from None
    return [parse_line(line, list_file, lineno, num_classes)
            for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]


def vtab_resize(img_size: int) -> Resize:
    """The literature's VTAB-1k eval transform on the PIL image: squash-resize to img_size, bicubic, no crop."""
    return Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC, antialias=True)


# PIL modes whose convert('RGB') is right; 16-bit grey is scaled to 8 bits (convert would clip it: all white). The
# rest have no fixed range (I, F) or no correct conversion (LAB, La) and are refused, by check and training alike.
RGB_MODES = ('1', 'L', 'P', 'RGB', 'RGBA', 'RGBX', 'RGBa', 'CMYK', 'YCbCr', 'HSV', 'LA', 'PA')
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


class UnsupportedImage(ValueError):
    """An image PIL opens whose pixels have no faithful 8-bit RGB form."""


def _sixteen_bit(img: Image.Image) -> bool:
    return img.mode in SIXTEEN_BIT_MODES or (img.mode == 'I' and img.format == 'PNG')  # older Pillow: PNG 16-bit as I


def check_mode(img: Image.Image) -> None:
    """UnsupportedImage unless ``to_rgb`` converts ``img``'s mode faithfully (known from the header alone)."""
    if img.mode not in RGB_MODES and not _sixteen_bit(img):
        raise UnsupportedImage(f'has mode {img.mode}, which has no faithful 8-bit RGB form (supported: '
                               f'{", ".join(RGB_MODES + SIXTEEN_BIT_MODES)}); save it as 8-bit RGB or grey')


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: 16-bit grey scaled by 255/65535 (rounded), every other supported mode by PIL."""
    check_mode(img)
    if _sixteen_bit(img):
        grey = np.asarray(img).astype(np.uint32)  # (H, W) in [0, 65535]
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), 'L').convert('RGB')
    return img.convert('RGB')


def check_image(file: Union[Path, BinaryIO]) -> None:
    """What training needs of an image file, checked without decoding its pixels: PIL parses it (verify) and its
    mode has an 8-bit RGB form. OSError, UnsupportedImage or PIL's own errors otherwise."""
    with Image.open(file) as img:
        check_mode(img)
        img.verify()


def load_resized(path: Union[Path, BinaryIO], img_size: int) -> np.ndarray:
    """Decode one image (a path or an open binary file), convert to RGB (``to_rgb``) and squash-resize: uint8
    (3, H, W). Raises OSError or ValueError (UnsupportedImage) on a bad file."""
    with Image.open(path) as img:
        img = vtab_resize(img_size)(to_rgb(img))
    return np.array(img, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W), writable


def to_float_normalized(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32, exactly as torchvision's ToTensor (/255) then Normalize ((x-m)/s)."""
    x = x.to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s)


class ImageSplit(Dataset):
    """One split: ``samples`` (image path relative to ``dir``, label), decoded on every access: (uint8 (3, H, W)
    tensor, label). Normalisation happens on the device, after batching, as for the cached path.

    ``list_file`` names the split's list and ``list_bytes`` is its text (``path label`` lines): a VTAB-1k list file,
    or the list a task source generated (``listed=False``: recorded in the run folder, not read from disk). Both,
    with the SHA-256 of every image's bytes, key the decode-once cache."""

    def __init__(self, folder: Path, list_file: Path, list_bytes: bytes, samples: List[Sample], img_size: int,
                 listed: bool = True) -> None:
        if not samples:  # checked when a run builds its splits, before anything is decoded or trained
            raise DataError(f'{list_file} lists no samples')
        self.dir, self.list_file, self.list_bytes, self.samples = Path(folder), list_file, list_bytes, samples
        self.img_size, self.listed = img_size, listed

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cache_name(self) -> str:
        """The readable start of its cache file names."""
        return f'{self.dir.name}-{self.list_file.stem}'

    def list_identity(self) -> List[str]:
        """What names the list in the cache key: the image folder, the list's name and its text."""
        return [str(self.dir.resolve()), self.list_file.name, self.list_bytes.hex()]

    @functools.cached_property
    def _hashes(self) -> Tuple[str, List[Optional[str]]]:
        """(SHA-256 of every listed image's bytes in list order, each image's own SHA-256 or None when missing),
        from one read of the files. A missing file is hashed as missing: decoding then reports it (file:line), in
        list order with the other problems."""
        digest, images = hashlib.sha256(), []
        for sample in self.samples:
            try:
                data = self.read_bytes(sample)
            except OSError:
                digest.update(f'\0missing {sample.path}\0'.encode())
                images.append(None)
                continue
            digest.update(data)
            images.append(hashlib.sha256(data).hexdigest())
        return digest.hexdigest(), images

    @property
    def content_sha256(self) -> str:
        """SHA-256 of every listed image's bytes, in list order: what the split reads, whatever the files' sizes and
        modification times say (an image rewritten in place with the same stats changes it). It keys the
        decode-once cache and, with the list, is the data fingerprint a run records."""
        return self._hashes[0]

    @property
    def image_sha256(self) -> List[Optional[str]]:
        """Each listed image's SHA-256 (None: missing), in list order: byte-identical images across splits."""
        return self._hashes[1]

    def fingerprint(self) -> str:
        """SHA-256 of the list's text and its images' bytes: the split's identity in a run's provenance."""
        return hashlib.sha256(self.list_bytes + bytes.fromhex(self.content_sha256)).hexdigest()

    def read_bytes(self, sample: Sample) -> bytes:
        """The encoded image file of ``sample``; OSError when it is missing."""
        return (self.dir / sample.path).read_bytes()

    def where(self, sample: Sample) -> str:
        """'list:line: image path' (a list file) or 'image path' (a generated list), for messages."""
        image = f'image {self.dir / sample.path}'
        return f'{self.list_file}:{sample.line}: {image}' if self.listed else image

    def image_error(self, sample: Sample, error: Exception) -> DataError:
        what = 'is missing' if isinstance(error, FileNotFoundError) else str(error) \
            if isinstance(error, UnsupportedImage) else f'cannot be decoded ({type(error).__name__})'
        return DataError(f'{self.where(sample)} {what}')

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            pixels = load_resized(io.BytesIO(self.read_bytes(sample)), self.img_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise self.image_error(sample, e) from None
        return torch.from_numpy(pixels), sample.label


class VTABDataset(ImageSplit):
    """One split of a VTAB-1k list task: ``<root>/<task>/<split>.txt``."""

    def __init__(self, root: Path, task: Task, split: str, img_size: int) -> None:
        if split not in SPLITS:
            raise ValueError(f'split={split!r} is invalid: choose one of {", ".join(SPLITS)}')
        folder = task_dir(Path(root), task.name)
        if not folder.is_dir():
            raise DataError(f'task folder {folder} does not exist (data path {root})')
        list_file = folder / f'{split}.txt'
        samples = read_list(list_file, task.num_classes)
        super().__init__(folder, list_file, list_file.read_bytes(), samples, img_size)


@dataclass
class SplitCheck:
    split: str
    lines: int = 0
    problems: List[str] = field(default_factory=list)
    problem_count: int = 0
    class_counts: Dict[int, int] = field(default_factory=dict)

    def problem(self, message: str, max_listed: int = 5) -> None:
        self.problem_count += 1
        if len(self.problems) < max_listed:
            self.problems.append(message)


def split_warnings(train: ImageSplit, evaluation: ImageSplit, num_classes: int) -> List[str]:
    """What makes a train/evaluation pair say nothing, though every file is fine: a task of one class, a train split
    of one class, evaluation images byte-identical to train images (leakage)."""
    def named(split: ImageSplit) -> str:
        return str(split.list_file) if split.listed else f'split {split.list_file.stem} of {split.dir}'

    found = []
    if num_classes < 2:
        found.append(f'the task has {num_classes} class: every prediction is right, and top-1 says nothing')
    elif len({s.label for s in train.samples}) < 2:
        found.append(f'{named(train)}: every image is of class {train.samples[0].label}: the model can learn only '
                     f'that one')
    seen = {h: i for i, h in enumerate(train.image_sha256) if h is not None}
    shared = [(i, seen[h]) for i, h in enumerate(evaluation.image_sha256) if h in seen]
    if shared:
        i, j = shared[0]
        found.append(f'{len(shared)} of {len(evaluation)} images of {named(evaluation)} are byte-identical to '
                     f'images of {named(train)} (e.g. {evaluation.samples[i].path} = {train.samples[j].path}): '
                     f'the evaluation is not on unseen images')
    return found


def check_task(root: Path, task: Task, expected_lines: bool = True, max_listed: int = 5) -> List[SplitCheck]:
    """Integrity of every split of ``task``: unparsable lines, bad labels, missing/unreadable images and, with
    ``expected_lines`` (the 19 VTAB tasks), VTAB-1k's 800/200/1000 line counts."""
    folder = task_dir(Path(root), task.name)
    results = []
    for split in SPLITS:
        result = SplitCheck(split)
        results.append(result)

        def problem(msg: str) -> None:
            result.problem(msg, max_listed)

        list_file = folder / f'{split}.txt'
        if not list_file.is_file():
            problem(f'{list_file}: missing')
            continue
        try:
            text = list_file.read_text(encoding='utf-8')
        except UnicodeDecodeError:
            problem(f'{list_file}: not UTF-8 text')
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            result.lines += 1
            try:
                sample = parse_line(line, list_file, lineno, task.num_classes)
            except DataError as e:
                problem(str(e))
                continue
            result.class_counts[sample.label] = result.class_counts.get(sample.label, 0) + 1
            image = folder / sample.path
            try:
                check_image(image)
            except FileNotFoundError:
                problem(f'{list_file}:{lineno}: image {image} is missing')
            except UnsupportedImage as e:
                problem(f'{list_file}:{lineno}: image {image} {e}')
            except Exception as e:  # PIL raises many types for corrupt files
                problem(f'{list_file}:{lineno}: image {image} is unreadable ({type(e).__name__})')
        expected = EXPECTED_LINES.get(split) if expected_lines else None
        if expected is not None and result.lines != expected:
            problem(f'{list_file}: {result.lines} lines, expected {expected}')
        if result.lines == 0:
            problem(f'{list_file}: no samples')
    return results
