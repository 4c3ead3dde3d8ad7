"""The VTAB-1k task registry: the 19 tasks, their class counts, groups and common folder aliases."""
import difflib
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from ..config import MAX_CLASSES, VTAB_GROUPS
from .run_config import HF_PREFIX, TASK_INFO_FILE, hf_task_name, load_yaml  # a custom task folder describes itself:
# {num_classes: N, group: G}


GROUPS = VTAB_GROUPS


class Task(NamedTuple):
    name: str
    num_classes: int
    group: str


TASKS: Dict[str, Task] = {t.name: t for t in [
    Task('cifar', 100, 'natural'), Task('caltech101', 102, 'natural'), Task('dtd', 47, 'natural'),
    Task('oxford_flowers102', 102, 'natural'), Task('oxford_iiit_pet', 37, 'natural'), Task('svhn', 10, 'natural'),
    Task('sun397', 397, 'natural'),
    Task('patch_camelyon', 2, 'specialized'), Task('eurosat', 10, 'specialized'), Task('resisc45', 45, 'specialized'),
    Task('diabetic_retinopathy', 5, 'specialized'),
    Task('clevr_count', 8, 'structured'), Task('clevr_dist', 6, 'structured'), Task('dmlab', 6, 'structured'),
    Task('kitti', 4, 'structured'), Task('dsprites_loc', 16, 'structured'), Task('dsprites_ori', 16, 'structured'),
    Task('smallnorb_azi', 18, 'structured'), Task('smallnorb_ele', 9, 'structured'),
]}

# folder / task names used by other preparation scripts and papers
ALIASES: Dict[str, List[str]] = {
    'cifar': ['cifar100', 'cifar_100'],
    'caltech101': ['caltech'],
    'oxford_flowers102': ['flowers102', 'oxford_flowers'],
    'oxford_iiit_pet': ['oxford_pet', 'pets', 'oxford_iiit_pets'],
    'sun397': ['sun'],
    'patch_camelyon': ['camelyon', 'pcam'],
    'diabetic_retinopathy': ['retinopathy', 'diabetic_retinopathy_detection'],
    'clevr_count': ['clevr_count_all'],
    'clevr_dist': ['clevr_closest_object_distance', 'clevr_distance'],
    'dmlab': ['dmlab_frames'],
    'kitti': ['kitti_dist', 'kitti_closest_vehicle_distance'],
    'dsprites_loc': ['dsprites_location', 'dsprites_label_x_position'],
    'dsprites_ori': ['dsprites_orientation', 'dsprites_label_orientation'],
    'smallnorb_azi': ['smallnorb_azimuth', 'smallnorb_label_azimuth'],
    'smallnorb_ele': ['smallnorb_elevation', 'smallnorb_label_elevation'],
}
_CANONICAL = {alias: name for name, aliases in ALIASES.items() for alias in aliases}


def canonical_name(name: str) -> Optional[str]:
    key = name.lower().replace('-', '_')
    return key if key in TASKS else _CANONICAL.get(key)


def task_dir(root: Path, name: str) -> Path:
    """The task's folder under ``root``, trying the canonical name and its aliases."""
    canonical = canonical_name(name) or name
    for candidate in [name, canonical, *ALIASES.get(canonical, [])]:
        if (Path(root) / candidate).is_dir():
            return Path(root) / candidate
    return Path(root) / name


TASK_INFO_KEYS = ('num_classes', 'group', 'label_names')  # what a custom task folder's task.yaml may say


def resolve_task(name: str, root: Optional[Path] = None) -> Task:
    """The Task for ``name``: a folder with a task.yaml is a custom task (even when its name is a VTAB task's, e.g. a
    generated look-alike), else the canonical VTAB task or alias; ValueError naming the missing data path or task
    folder, and suggesting the closest task name."""
    canonical = canonical_name(name)
    if root is not None:
        if not Path(root).is_dir():
            raise ValueError(f'--data-path {root} does not exist or is not a folder')
        info_file = task_dir(root, name) / TASK_INFO_FILE
        if info_file.is_file():
            info = load_yaml(info_file)  # a mapping, or RunError naming the file
            unknown = sorted(str(k) for k in set(info) - set(TASK_INFO_KEYS))
            if unknown:
                close = difflib.get_close_matches(unknown[0], TASK_INFO_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ''
                raise ValueError(f'{info_file}: unknown key {unknown[0]!r}{hint}: a {TASK_INFO_FILE} holds '
                                 f'{", ".join(TASK_INFO_KEYS)}')
            num_classes = info.get('num_classes')
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
                    or not 1 <= num_classes <= MAX_CLASSES:
                raise ValueError(f'{info_file}: num_classes {num_classes!r} is invalid: an integer in '
                                 f'[1, {MAX_CLASSES:,}] is required')
            if not isinstance(info.get('group', 'custom'), str):
                raise ValueError(f'{info_file}: group {info["group"]!r} is invalid: a name is required')
            return Task(name, num_classes, info.get('group', 'custom'))
    if canonical:
        return TASKS[canonical]
    choices = list(TASKS) + list(_CANONICAL)
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{canonical_name(close[0])}'?" if close else ''
    where = f'{task_dir(root, name)} is not a folder holding a {TASK_INFO_FILE}' if root is not None else \
        f'a custom task is a folder holding a {TASK_INFO_FILE}'
    raise ValueError(f"unknown task '{name}'{hint} ({where}). Known tasks: {', '.join(TASKS)}")


def resolve_tasks(names: List[str], root: Optional[Path] = None) -> List[Task]:
    """Expand 'all' and resolve each name."""
    if names == ['all'] or names == 'all':
        return list(TASKS.values())
    return [resolve_task(n, root) for n in names]


def task_folder_name(name: str, root: Optional[Path]) -> str:
    """The run-folder name of a task, without reading its data: a VTAB-1k task's canonical name, a task folder's
    name, 'hfds--org--name' for an HF dataset; ValueError (with a suggestion) for an unknown name."""
    if name.startswith(HF_PREFIX):
        return hf_task_name(name[len(HF_PREFIX):])
    folder = task_dir(root, name) if root is not None else Path(name)
    if (folder / TASK_INFO_FILE).is_file() or (folder.is_dir() and canonical_name(name) is None):
        return name
    return resolve_task(name, root).name


def expand_tasks(names: List[str], root: Optional[Path]) -> List[str]:
    """'all' -> the 19 VTAB-1k tasks; every other name checked (``task_folder_name``): a VTAB-1k task or alias as its
    canonical name (what its runs record), a task folder or HF dataset as given."""
    if names == ['all'] or names == 'all':
        return list(TASKS)
    expanded = []
    for name in names:
        folder_name = task_folder_name(name, root)  # ValueError for an unknown name
        expanded.append(folder_name if canonical_name(name) else name)
    return expanded
