"""VTAB-1k data in the vision-PEFT layout (NOAH's preparation script):
``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line ``relative/image/path label``.

The pixels a model sees come from one place: ``vtab_resize`` (the literature's squash-resize, bicubic, on the
PIL image) then ``to_float_normalized`` (ToTensor's /255 and Normalize's (x - mean) / std). The decode path
(``VTABDataset`` through a DataLoader) and the decode-once cache (``data_cache``) both use exactly these, so
their batches are bit-identical.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, List, NamedTuple, Sequence, Union

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


def load_resized(path: Union[Path, BinaryIO], img_size: int) -> np.ndarray:
    """Decode one image (a path or an open binary file), convert to RGB and squash-resize: uint8 (3, H, W).
    Raises OSError on a bad file."""
    with Image.open(path) as img:
        img = vtab_resize(img_size)(img.convert('RGB'))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def to_float_normalized(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32, exactly as torchvision's ToTensor (/255) then Normalize ((x-m)/s)."""
    x = x.to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s)


class VTABDataset(Dataset):
    """One split of one task, decoded on every access: (uint8 (3, H, W) tensor, label).

    Normalisation happens on the device, after batching, as for the cached path.
    """

    def __init__(self, root: Path, task: Task, split: str, img_size: int) -> None:
        if split not in SPLITS:
            raise ValueError(f'split={split!r} is invalid: choose one of {", ".join(SPLITS)}')
        self.dir = task_dir(Path(root), task.name)
        if not self.dir.is_dir():
            raise DataError(f'task folder {self.dir} does not exist (data path {root})')
        self.list_file = self.dir / f'{split}.txt'
        self.samples = read_list(self.list_file, task.num_classes)
        if not self.samples:  # checked when a run builds its splits, before anything is decoded or trained
            raise DataError(f'{self.list_file} lists no samples')
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.samples)

    def image_error(self, sample: Sample, error: Exception) -> DataError:
        path = self.dir / sample.path
        what = 'is missing' if isinstance(error, FileNotFoundError) else f'cannot be decoded ({type(error).__name__})'
        return DataError(f'{self.list_file}:{sample.line}: image {path} {what}')

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            pixels = load_resized(self.dir / sample.path, self.img_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise self.image_error(sample, e) from None
        return torch.from_numpy(pixels), sample.label


@dataclass
class SplitCheck:
    split: str
    lines: int = 0
    problems: List[str] = field(default_factory=list)
    problem_count: int = 0


def check_task(root: Path, task: Task, expected_lines: bool = True, max_listed: int = 5) -> List[SplitCheck]:
    """Integrity of every split of ``task``: unparsable lines, bad labels, missing/unreadable images and, with
    ``expected_lines`` (the 19 VTAB tasks), VTAB-1k's 800/200/1000 line counts."""
    folder = task_dir(Path(root), task.name)
    results = []
    for split in SPLITS:
        result = SplitCheck(split)
        results.append(result)

        def problem(msg: str) -> None:
            result.problem_count += 1
            if len(result.problems) < max_listed:
                result.problems.append(msg)

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
            image = folder / sample.path
            try:
                with Image.open(image) as img:
                    img.verify()
            except FileNotFoundError:
                problem(f'{list_file}:{lineno}: image {image} is missing')
            except Exception as e:  # PIL raises many types for corrupt files
                problem(f'{list_file}:{lineno}: image {image} is unreadable ({type(e).__name__})')
        expected = EXPECTED_LINES.get(split) if expected_lines else None
        if expected is not None and result.lines != expected:
            problem(f'{list_file}: {result.lines} lines, expected {expected}')
        if result.lines == 0:
            problem(f'{list_file}: no samples')
    return results
