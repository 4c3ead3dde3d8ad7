"""VTAB-1k data in the vision-PEFT layout (NOAH's preparation script):
``<root>/<task>/{train800,val200,train800val200,test}.txt``, each line ``relative/image/path label``.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

from PIL import Image
from timm.data import create_transform
from torch.utils.data import Dataset

from .vtab import Task, task_dir

SPLITS = ('train800', 'val200', 'train800val200', 'test')
EXPECTED_LINES = {'train800': 800, 'val200': 200, 'train800val200': 1000}
PROTOCOL_SPLITS = {'final': ('train800val200', 'test'), 'val': ('train800', 'val200')}


def read_list(list_file: Path, num_classes: int) -> List[Tuple[str, int]]:
    """Parse a split list. Raises ValueError naming file and line for a line that does not parse or a bad label."""
    if not list_file.is_file():
        raise FileNotFoundError(f'list file {list_file} does not exist')
    samples = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
            raise ValueError(f'{list_file}:{lineno}: expected "relative/image/path label", got {line!r}')
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise ValueError(f'{list_file}:{lineno}: label {label} is outside [0, {num_classes - 1}]')
        samples.append((parts[0], label))
    return samples


def vtab_transform(img_size: int, mean: Sequence[float], std: Sequence[float]):
    """The literature's VTAB-1k eval transform: squash-resize to img_size, bicubic, no crop, no augmentation."""
    return create_transform(input_size=(3, img_size, img_size), is_training=False, crop_pct=1.0,
                            crop_mode='squash', interpolation='bicubic', mean=tuple(mean), std=tuple(std))


class VTABDataset(Dataset):
    """One split of one task. Images are opened lazily and converted to RGB."""

    def __init__(self, root: Path, task: Task, split: str, transform=None) -> None:
        if split not in SPLITS:
            raise ValueError(f'split={split!r} is invalid: choose one of {", ".join(SPLITS)}')
        self.dir = task_dir(Path(root), task.name)
        if not self.dir.is_dir():
            raise FileNotFoundError(f'task folder {self.dir} does not exist (data path {root})')
        self.list_file = self.dir / f'{split}.txt'
        self.samples = read_list(self.list_file, task.num_classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(self.dir / path) as img:
                img = img.convert('RGB')
        except (OSError, ValueError) as e:
            raise OSError(f'{self.list_file}: image {self.dir / path} cannot be opened ({e})') from None
        return (self.transform(img) if self.transform else img), label


@dataclass
class SplitCheck:
    split: str
    lines: int = 0
    problems: List[str] = field(default_factory=list)
    problem_count: int = 0


def check_task(root: Path, task: Task, max_listed: int = 5) -> List[SplitCheck]:
    """Integrity of every split of ``task``: line counts, unparsable lines, bad labels, missing/unreadable images."""
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
        for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            result.lines += 1
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                problem(f'{list_file}:{lineno}: line does not parse: {line!r}')
                continue
            if not 0 <= int(parts[1]) < task.num_classes:
                problem(f'{list_file}:{lineno}: label {parts[1]} outside [0, {task.num_classes - 1}]')
            image = folder / parts[0]
            try:
                with Image.open(image) as img:
                    img.verify()
            except FileNotFoundError:
                problem(f'{list_file}:{lineno}: image {image} is missing')
            except Exception as e:  # PIL raises many types for corrupt files
                problem(f'{list_file}:{lineno}: image {image} is unreadable ({type(e).__name__})')
        expected = EXPECTED_LINES.get(split)
        if expected is not None and result.lines != expected:
            problem(f'{list_file}: {result.lines} lines, expected {expected}')
        if split == 'test' and result.lines == 0:
            problem(f'{list_file}: no test samples')
    return results
