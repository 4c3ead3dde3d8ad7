"""Where a task's images come from: one interface over four layouts, so the engine, the decode-once cache, search,
``check``, ``eval`` and ``predict`` never ask which.

- **VTAB-1k lists** (``<root>/<task>/{train800,val200,train800val200,test}.txt``, or a folder with a task.yaml):
  read exactly as before; splits train800, val200, train800val200, test.
- **ImageFolder** (``<root>/train/<class>/*`` with optional ``val/`` and ``test/``): classes and file order as
  torchvision's ``ImageFolder`` (``find_classes``, ``make_dataset``).
- **One folder of class folders** (``<root>/<class>/*``): test and val carved from it.
- **A Hugging Face dataset** (``hfds/<hub id or local folder>``): a dataset saved with ``save_to_disk``, a folder of
  data files (parquet, ...) or a Hub id, read with ``datasets`` directly rather than timm's ``ReaderHfds``: that
  reader opens one named split per call, so it can neither tell which splits a dataset has (the default split map
  looks for validation/val/valid) nor read ``save_to_disk`` folders, which ``load_dataset`` refuses.

The last three have splits train, val, test (val carved from train when absent: stratified, seeded by
``--split-seed``) and ``train+val``; ``--protocol val`` is train -> val, ``final`` is train+val -> test (refused when
there is no test split: val numbers are never reported as test numbers). Their split lists (``path label`` lines,
the VTAB-1k format) are recorded in the run folder, so the search and the final runs demonstrably see one split.
"""
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..extras import require
from .data import (PROTOCOL_SPLITS, SPLITS, DataError, ImageSplit, Sample, SplitCheck, UnsupportedImage, VTABDataset,
                   check_image, check_task, split_warnings)
from .run_config import HF_PREFIX, TASK_INFO_FILE, RunError, hf_task_name, load_yaml
from .tasks import TASKS, Task, canonical_name, resolve_task, task_dir

SPLIT_KEYS = ('train', 'val', 'test')
HF_VAL_NAMES = ('validation', 'val', 'valid')
VTAB_LIST = 'train800.txt'


@dataclass(frozen=True)
class SplitSettings:
    """How a source's splits are made (the ``RunConfig`` fields of the same names)."""
    split_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_map: str = ''
    image_column: str = 'image'
    label_column: str = 'label'

    @classmethod
    def of(cls, cfg: Any) -> 'SplitSettings':
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


def stratified_carve(labels: Sequence[int], fractions: Sequence[float], seed: int) -> List[List[int]]:
    """Indices into ``labels`` split per class: part k gets round(fraction_k * n_class) of each class's samples
    (shuffled with ``seed``), the rest the last part; every part keeps the original order. A class keeps at least one
    sample in the last part (the training split)."""
    by_class: Dict[int, List[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    parts: List[List[int]] = [[] for _ in range(len(fractions) + 1)]
    rng = random.Random(seed)
    for label in sorted(by_class):
        members = list(by_class[label])
        rng.shuffle(members)
        start = 0
        for k, fraction in enumerate(fractions):
            take = min(round(fraction * len(members)), max(len(members) - start - 1, 0))
            parts[k].extend(members[start:start + take])
            start += take
        parts[-1].extend(members[start:])
    return [sorted(part) for part in parts]


def list_text(samples: Sequence[Any]) -> bytes:
    """The VTAB-1k list format of ``samples``: one ``path label`` line each."""
    return ''.join(f'{s.path} {s.label}\n' for s in samples).encode()


@dataclass
class TaskSource:
    """A task and its splits. ``lists`` maps a split name to its samples (empty for VTAB-1k list tasks, whose
    datasets read their list files)."""
    kind: str  # 'vtab-lists', 'imagefolder', 'class-folders', 'hfds'
    task: Task
    label_names: Tuple[str, ...]
    root: Path
    lists: Dict[str, List[Sample]] = field(default_factory=dict)
    hf: Optional[Dict[str, Any]] = None  # HF split name -> datasets.Dataset (kind 'hfds')
    carved: Tuple[str, ...] = ()  # splits carved by --split-seed
    image_column: str = 'image'  # kind 'hfds'
    hub_dataset: Optional[str] = None  # the Hugging Face Hub dataset id (kind 'hfds' loaded from the Hub)

    @property
    def split_names(self) -> Tuple[str, ...]:
        if self.kind == 'vtab-lists':
            return SPLITS
        return tuple(self.lists) + (('train+val',) if 'val' in self.lists else ())

    def protocol_splits(self, protocol: str) -> Tuple[str, str]:
        """(train split, eval split) of ``protocol``; RunError for ``final`` without a test split."""
        if self.kind == 'vtab-lists':
            return PROTOCOL_SPLITS[protocol]
        if protocol == 'val':
            return 'train', 'val'
        if 'test' not in self.lists:
            raise RunError(f'task {self.task.name} has no test split ({self.describe_layout()}): --protocol final '
                           f'reports test numbers and is refused; use --protocol val, or add a test split')
        return 'train+val', 'test'

    def describe_layout(self) -> str:
        what = {'imagefolder': f'ImageFolder {self.root}', 'class-folders': f'class folders {self.root}',
                'hfds': f'HF dataset {self.root}',
                'vtab-lists': f'VTAB-1k lists {task_dir(self.root, self.task.name)}'}[self.kind]
        return what + (f'; {" and ".join(self.carved)} carved by --split-seed' if self.carved else '')

    def samples(self, split: str) -> List[Sample]:
        if split == 'train+val':
            return self.lists['train'] + self.lists['val']
        return self.lists[split]

    def dataset(self, split: str, img_size: int) -> ImageSplit:
        """The ``data.ImageSplit`` of ``split`` (decoded on access; the cache builds on it)."""
        if split not in self.split_names:
            raise DataError(f'task {self.task.name} has no split {split!r}: its splits are '
                            f'{", ".join(self.split_names)}')
        if self.kind == 'vtab-lists':
            return VTABDataset(self.root, self.task, split, img_size)
        samples = self.samples(split)
        name = Path(f'{split}.txt')
        if self.kind == 'hfds':
            return HFSplit(self, name, samples, img_size)
        return ImageSplit(self.root, name, list_text(samples), samples, img_size, listed=False)

    def recorded_lists(self) -> Dict[str, bytes]:
        """The split lists to record in a run folder (``splits/<split>.txt``): a generated split's proof."""
        return {split: list_text(samples) for split, samples in self.lists.items()}


def _class_names(info_file: Path, num_classes: int) -> Tuple[str, ...]:
    """``label_names`` of a task.yaml, else the class indices as names."""
    names = load_yaml(info_file).get('label_names') if info_file.is_file() else None
    if names is None:
        return tuple(str(i) for i in range(num_classes))
    if not isinstance(names, list) or len(names) != num_classes or \
            not all(isinstance(n, str) and n.strip() for n in names):
        raise RunError(f'{info_file}: label_names must be a list of {num_classes} non-empty strings (one per class)')
    if len(set(names)) != len(names):
        raise RunError(f'{info_file}: label_names repeats {next(n for n in names if names.count(n) > 1)!r}: one '
                       f'distinct name per class is required')
    return tuple(names)


def _image_folder(folder: Path, class_to_idx: Dict[str, int], split: str, allow_empty: bool) -> List[Any]:
    """torchvision's ``make_dataset`` of ``folder`` as samples relative to the task root (``<split>/<class>/file``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    unknown = sorted(set(find_classes(str(folder))[0]) - set(class_to_idx)) if split != 'train' else []
    if unknown:
        raise DataError(f'{folder}: class folder {unknown[0]!r} is not a class of the train split ({len(class_to_idx)}'
                        f' classes from {folder.parent / "train"})')
    try:
        found = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
    except FileNotFoundError as e:
        raise DataError(f'{folder}: {str(e).splitlines()[0]}') from None
    prefix = f'{split}/' if split else ''
    return [Sample(prefix + Path(path).relative_to(folder).as_posix(), label, i + 1)
            for i, (path, label) in enumerate(found)]


def _folder_source(root: Path, settings: SplitSettings) -> TaskSource:
    """An ImageFolder root (``train/`` and optional ``val/``, ``test/``) or one folder of class folders."""
    from torchvision.datasets.folder import find_classes
    layout = root / 'train' if (root / 'train').is_dir() else root
    try:
        classes, class_to_idx = find_classes(str(layout))
    except FileNotFoundError as e:
        raise DataError(f'{layout}: {e}') from None
    task = Task(root.name, len(classes), 'custom')
    if layout == root:  # one folder: carve test, then val
        everything = _image_folder(root, class_to_idx, '', allow_empty=False)
        test, val, train = stratified_carve([s.label for s in everything],
                                            [settings.test_fraction, settings.val_fraction], settings.split_seed)
        lists = {'train': [everything[i] for i in train], 'val': [everything[i] for i in val],
                 'test': [everything[i] for i in test]}
        return TaskSource('class-folders', task, tuple(classes), root, lists, carved=('val', 'test'))
    lists = {'train': _image_folder(layout, class_to_idx, 'train', allow_empty=False)}
    carved: Tuple[str, ...] = ()
    for split in ('val', 'test'):
        if (root / split).is_dir():
            lists[split] = _image_folder(root / split, class_to_idx, split, allow_empty=True)
    if 'val' not in lists:
        lists['val'], lists['train'] = _carve_val(lists['train'], settings)
        carved = ('val',)
    return TaskSource('imagefolder', task, tuple(classes), root, dict(sorted(lists.items(), key=_split_order)),
                      carved=carved)


def _split_order(item: Tuple[str, Any]) -> int:
    return SPLIT_KEYS.index(item[0])


def _carve_val(train: List[Any], settings: SplitSettings) -> Tuple[List[Any], List[Any]]:
    """(val, train) carved from ``train``: ``val_fraction`` of each class, seeded by ``split_seed``."""
    val, rest = stratified_carve([s.label for s in train], [settings.val_fraction], settings.split_seed)
    return [train[i] for i in val], [train[i] for i in rest]


def parse_split_map(text: str) -> Dict[str, str]:
    """'train=train,val=validation' -> {'train': 'train', 'val': 'validation'}; RunError naming --split-map."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(','))):
        key, sep, value = item.partition('=')
        if not sep or key not in SPLIT_KEYS or not value:
            raise RunError(f'--split-map {text!r} is invalid: comma-separated KEY=HF_SPLIT with KEY one of '
                           f'{", ".join(SPLIT_KEYS)}, e.g. train=train,val=validation,test=test')
        out[key] = value
    return out


def _load_hf(spec: str, root: Optional[Path], cache_dir: Optional[Path]) -> Tuple[Dict[str, Any], str]:
    """Every split of the HF dataset ``spec`` (a local folder under ``root`` or the working directory, or a Hub id)
    with images left encoded; (splits, what it is) for messages."""
    datasets = require('datasets', f'{HF_PREFIX}{spec}')
    datasets.disable_progress_bars()
    local = next((p for p in ([root / spec] if root else []) + [Path(spec)] if p.is_dir()), None)
    try:
        if local is not None and ((local / 'dataset_dict.json').is_file() or (local / 'state.json').is_file()):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(str(local) if local else spec, cache_dir=str(cache_dir) if cache_dir
                                           else None)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        where = f'local folder {local}' if local else 'Hub id (no local folder of that name)'
        raise RunError(f'{HF_PREFIX}{spec} ({where}) cannot be loaded as a dataset: '
                       f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {'train': loaded}
    return splits, str(local) if local else spec


def _hf_source(spec: str, root: Optional[Path], settings: SplitSettings, cache_dir: Optional[Path]) -> TaskSource:
    datasets = require('datasets', f'{HF_PREFIX}{spec}')
    splits, where = _load_hf(spec, root, cache_dir)
    mapping = parse_split_map(settings.split_map)
    if not mapping:  # the default: train, the first of validation/val/valid, test (those present)
        mapping = {'train': 'train'}
        val = next((name for name in HF_VAL_NAMES if name in splits), None)
        mapping.update({'val': val} if val else {}, **({'test': 'test'} if 'test' in splits else {}))
    missing = [f'{key}={name}' for key, name in mapping.items() if name not in splits]
    if 'train' not in mapping or missing:
        raise RunError(f'--split-map: {HF_PREFIX}{spec} has no split {missing[0] if missing else "for train"}: its '
                       f'splits are {", ".join(splits)}')
    image_col, label_col = settings.image_column, settings.label_column
    for key, name in mapping.items():
        columns = splits[name].column_names
        for flag, column in (('--image-column', image_col), ('--label-column', label_col)):
            if column not in columns:
                raise RunError(f'{flag} {column!r}: split {name} of {HF_PREFIX}{spec} has no such column (columns: '
                               f'{", ".join(columns)})')
        splits[name] = splits[name].cast_column(image_col, datasets.Image(decode=False))
    feature = splits[mapping['train']].features[label_col]
    names = getattr(feature, 'names', None)
    labels = {key: splits[name][label_col] for key, name in mapping.items()}
    if names is None:  # plain integer labels: the classes are 0..max
        values = [v for column in labels.values() for v in column]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise DataError(f'--label-column {label_col!r} of {HF_PREFIX}{spec} holds {type(values[0]).__name__} '
                            f'values: integer labels or a ClassLabel feature are required')
        names = [str(i) for i in range(max(values) + 1)]
    lists = {}
    for key, name in mapping.items():
        bad = next((v for v in labels[key] if not 0 <= v < len(names)), None)
        if bad is not None:
            raise DataError(f'{HF_PREFIX}{spec} split {name}: label {bad} is outside [0, {len(names) - 1}]')
        lists[key] = [Sample(f'{name}/{row}', label, row + 1) for row, label in enumerate(labels[key])]
    carved: Tuple[str, ...] = ()
    if 'val' not in lists:
        lists['val'], lists['train'] = _carve_val(lists['train'], settings)
        carved = ('val',)
    task = Task(hf_task_name(spec), len(names), 'custom')
    return TaskSource('hfds', task, tuple(names), Path(where), dict(sorted(lists.items(), key=_split_order)),
                      hf={name: splits[name] for name in mapping.values()}, carved=carved,
                      image_column=image_col, hub_dataset=None if Path(where).is_dir() else where)


class HFSplit(ImageSplit):
    """An ``ImageSplit`` over rows of HF dataset splits: sample path ``<hf split>/<row>``, the image bytes as stored
    (never re-encoded, so a dataset of PNG files decodes to the same pixels as the files)."""

    def __init__(self, source: TaskSource, list_file: Path, samples: List[Sample], img_size: int) -> None:
        super().__init__(source.root, list_file, list_text(samples), samples, img_size, listed=False)
        self.source = source

    def list_identity(self) -> List[str]:
        fingerprints = [getattr(self.source.hf[name], '_fingerprint', '') for name in sorted(self.source.hf)]
        return ['hfds', str(self.source.root), *fingerprints, self.source.image_column, self.list_bytes.hex()]

    @property
    def cache_name(self) -> str:
        return f'{self.source.task.name}-{self.list_file.stem}'

    def read_bytes(self, sample: Sample) -> bytes:
        name, row = sample.path.rsplit('/', 1)
        image = self.source.hf[name][int(row)][self.source.image_column]
        if image.get('bytes'):
            return image['bytes']
        if image.get('path'):
            return Path(image['path']).read_bytes()
        raise FileNotFoundError(sample.path)

    def where(self, sample: Sample) -> str:
        name, row = sample.path.rsplit('/', 1)
        return f'{HF_PREFIX}{self.source.root} split {name} row {row}: image'


def open_source(task: str, data_path: str, settings: SplitSettings = SplitSettings(),
                cache_dir: Optional[Path] = None) -> TaskSource:
    """The source ``--task`` names (under ``--data-path``); RunError/DataError naming what is wrong."""
    root = Path(data_path) if data_path else None
    if task.startswith(HF_PREFIX):
        return _hf_source(task[len(HF_PREFIX):], root, settings, cache_dir)
    if root is None:  # --task is the folder itself
        root, task = Path(task).parent, Path(task).name
    folder = task_dir(root, task)
    if not root.is_dir():
        raise RunError(f'--data-path {root} does not exist or is not a folder')
    if (folder / TASK_INFO_FILE).is_file() or (folder / VTAB_LIST).is_file() or \
            (canonical_name(task) in TASKS and not folder.is_dir()):
        resolved = resolve_task(task, root)
        return TaskSource('vtab-lists', resolved, _class_names(folder / TASK_INFO_FILE, resolved.num_classes), root)
    if folder.is_dir():
        return _folder_source(folder, settings)
    resolve_task(task, root)  # the unknown-task error, with its suggestion
    raise RunError(f'--task {task}: not found')


def source_warnings(source: TaskSource) -> List[str]:
    """``data.split_warnings`` for the train/evaluation pair of each protocol the source has."""
    found: List[str] = []
    for protocol in PROTOCOL_SPLITS:
        try:
            splits = [source.dataset(split, 1) for split in source.protocol_splits(protocol)]
        except (RunError, DataError):  # no test split, or a list check_source reports
            continue
        found += [w for w in split_warnings(*splits, source.task.num_classes) if w not in found]
    return found


def check_source(source: TaskSource, max_listed: int = 5) -> List[SplitCheck]:
    """Integrity of every split: counts per class and every image readable (PIL's verify), one problem line each;
    VTAB-1k list tasks through ``data.check_task`` (with VTAB-1k's line counts for the 19 tasks). The labels of the
    other sources were range-checked when the source opened."""
    if source.kind == 'vtab-lists':
        return check_task(source.root, source.task, expected_lines=TASKS.get(source.task.name) == source.task,
                          max_listed=max_listed)
    results = []
    for split, samples in source.lists.items():
        result = SplitCheck(split, lines=len(samples))
        results.append(result)
        dataset = source.dataset(split, 1) if samples else None
        for sample in samples:
            result.class_counts[sample.label] = result.class_counts.get(sample.label, 0) + 1
            try:
                check_image(io.BytesIO(dataset.read_bytes(sample)))
            except FileNotFoundError:
                result.problem(f'{dataset.where(sample)} is missing', max_listed)
            except UnsupportedImage as e:
                result.problem(f'{dataset.where(sample)} {e}', max_listed)
            except Exception as e:  # noqa: BLE001  PIL raises many types for corrupt files
                result.problem(f'{dataset.where(sample)} is unreadable ({type(e).__name__})', max_listed)
        if not samples:
            result.problem(f'{source.describe_layout()}: split {split} holds no images', max_listed)
    return results
