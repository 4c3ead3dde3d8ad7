"""Run settings: one dataclass field per setting, with its help text, from which the CLI flags and YAML keys derive.

Resolution order: defaults <- method YAML <- task YAML <- ``--config`` YAML <- command-line flags. Every value is
type-checked against its field, and an error names the file (or flag) it came from. No torch import here: the
CLI parses and validates arguments before loading torch and timm.
"""
import difflib
import importlib.resources
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from ..config import (CapaBoostConfig, SettingError, check_given_settings, check_setting, field_default, form_names,
                      setting, setting_fields)



def hf_task_name(spec: str) -> str:
    """The run-folder name of the task ``hfds/<spec>``: 'hfds--org--name'; RunError when ``spec`` names nothing
    (``hfds/`` alone would read the working directory as a dataset)."""
    if not spec.strip('/. '):
        raise RunError(f"--task '{HF_PREFIX}{spec}' names no dataset"
                       f': {HF_PREFIX}<local folder or Hub id> is required')
    return 'hfds--' + spec.strip('/').replace('/', '--')


def _config_dir() -> Path:
    """The method and task YAMLs: ``capaboost_vision/configs`` inside an installed wheel (read through
    importlib.resources), the repository's top-level ``configs/`` in a source checkout."""
    packaged = importlib.resources.files('capaboost_vision') / 'configs'
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / 'configs'


CONFIG_DIR = _config_dir()
OTHER_FORMS = ('peft', 'linear', 'full')  # 'peft' = an HF PEFT method; 'linear' and 'full' are references


def method_forms() -> Tuple[str, ...]:
    """The forms a method YAML may name: the registered CapaBoost forms and the others."""
    return form_names() + OTHER_FORMS


def is_capaboost_form(form: Any) -> bool:
    """True for a registered CapaBoost form ('lora', 'adapter', 'prompt', or one registered from outside)."""
    return form in form_names()
PROTOCOLS = ('final', 'val')
AMP_MODES = ('bf16', 'fp16', 'none')
NORMS = ('imagenet', 'model', 'none')
TASK_INFO_FILE = 'task.yaml'
HF_PREFIX = 'hfds/'


class RunError(Exception):
    """A user-facing error of a run (bad input, divergence, busy folder): printed as one line by the CLI."""


class Stopped(RunError):
    """The run was stopped by a signal (SIGTERM from a scheduler, SIGINT from Ctrl-C): the message says where the
    last checkpoint is and how to resume; the CLI exits with 128 + ``signum``, as a process killed by it would."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class RunConfig:
    """Everything a run needs. Defaults are the VTAB-1k protocol of the vision PEFT literature."""
    task: str = setting('', 'VTAB-1k task (e.g. cifar); a task folder (VTAB-1k lists or a task.yaml, an ImageFolder '
                            'root with train/ and optional val/, test/, or one folder of class folders); or '
                            'hfds/<local folder or Hub id> (required, as a flag or in --config)', scope='train')
    method: str = setting('capaboost_lora', 'method config from configs/methods', scope='train')
    seed: int = setting(0, 'training seed; also the mask seed unless --mask-seed', scope='train', range='[0, inf)')
    name: str = setting('', 'run name for the folder and the report row (default: the method)', scope='train',
                        identity=False)
    resume: bool = setting(False, 'continue the run folder\'s checkpoint (refused when its settings differ)',
                           scope='train', identity=False)
    model: str = setting('vit_base', 'CapaBoost model family or name, e.g. vit_base or vit_base_capaboost_lora')
    data_path: str = setting('', 'root of the task folders: <root>/<task> (optional when --task is a folder or an HF '
                                 'dataset)', identity=False)
    output: str = setting('runs', 'root of the run folders <output>/<family>/<task>/<protocol>/<name>/seed<N>',
                          identity=False)
    epochs: int = setting(100, 'training epochs', range='[1, 100000]')
    warmup_epochs: int = setting(10, 'linear warm-up epochs of the per-step cosine schedule', range='[0, inf)')
    batch_size: int = setting(64, 'global batch size', short='-b', range='[1, 1000000]')
    eval_batch_size: int = setting(256, 'evaluation batch size (evaluation runs at the last epoch)', identity=False,
                                  range='[1, 1000000]')
    lr: float = setting(1e-3, 'AdamW learning rate', range='(0, 100]')
    weight_decay: float = setting(1e-4, 'AdamW weight decay', range='[0, 10]')
    img_size: int = setting(224, 'squash-resize size in pixels (at least the patch size)', range='[16, 4096]')
    weights: str = setting('', 'base weights file (.safetensors, or .pth read with weights_only=True) instead of '
                                'timm pretrained resolution')
    pretrained: bool = setting(True, 'load pretrained base weights (--no-pretrained: random init, for tests)')
    overwrite: bool = setting(False, 'redo a finished or unfinished run from scratch (the old folder is removed '
                                      'first, atomically)', identity=False)
    protocol: str = setting('final', 'final: train800val200 -> test; val: train800 -> val200 (other sources: '
                                     'train+val -> test; train -> val)', choices=PROTOCOLS)
    split_seed: int = setting(0, 'seed of the stratified splits carved from a source without val/ (or test/)',
                              range='[0, inf)')
    val_fraction: float = setting(0.2, 'fraction of each class carved from train as val when a source has none '
                                       '(VTAB-1k: 200 of 1000)', range='(0, 1)')
    test_fraction: float = setting(0.2, 'fraction of each class carved as test from one folder of class folders',
                                   range='(0, 1)')
    split_map: str = setting('', 'HF dataset splits as train=NAME,val=NAME,test=NAME (default: train, the first of '
                                 'validation/val/valid, test; a missing val is carved from train)')
    image_column: str = setting('image', 'image column of an HF dataset')
    label_column: str = setting('label', 'label column of an HF dataset (a ClassLabel gives the class names)')
    crop_scale: float = setting(0.0, "train-time random-resized crop keeping at least this area fraction (timm's "
                                     "--scale lower bound, e.g. 0.08; 0 = off, the VTAB protocol)", range='[0, 1]')
    hflip: float = setting(0.0, 'train-time horizontal flip probability (0 = off)', range='[0, 1]')
    auto_augment: str = setting('', "train-time timm augmentation policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment), "
                                    "augmix-m5-w4-d2 or v0 (AutoAugment) (default: off)")
    mixup: float = setting(0.0, 'mixup alpha (timm.data.Mixup; 0 = off); with --cutmix, batches of a mixed epoch '
                                'drop their last incomplete batch', range='[0, inf)')
    cutmix: float = setting(0.0, 'cutmix alpha (timm.data.Mixup; 0 = off)', range='[0, inf)')
    drop_path: float = setting(0.1, 'stochastic depth rate', range='[0, 1)')
    label_smoothing: float = setting(0.0, 'label smoothing of the cross-entropy', range='[0, 1)')
    norm: str = setting('imagenet', "input normalisation: imagenet = ImageNet mean/std (NOAH, FacT, RepAdapter, GLoRA, "
                                    "V-PETL on ViT-B/16 in21k); model = the pretrained cfg's mean/std; none = [0, 1] "
                                    "inputs (VPT, SSF)", choices=NORMS)
    amp: str = setting('bf16', 'GPU autocast dtype (CPU runs in fp32)', choices=AMP_MODES)
    clip_grad: float = setting(0.0, 'max gradient norm (0 = off)', range='[0, inf)')
    compile: bool = setting(False, 'torch.compile the model for training', identity=False)
    data_cache: bool = setting(True, 'decode every image once into a uint8 cache and train from memory '
                                      '(--no-data-cache: decode every epoch)', identity=False)
    cache_dir: str = setting('', 'folder of the decoded-image cache (default <output>/.cache)', identity=False)
    cache_budget_gb: float = setting(8.0, 'splits larger than this many GB stream from disk instead of the cache',
                                     identity=False, range='[0, inf)')
    workers: int = setting(4, 'data loader workers of the decode path', short='-j', identity=False,
                          range='[0, 1024]')
    device: str = setting('auto', 'auto, cpu, cuda or cuda:N', identity=False)
    eval_interval: int = setting(0, 'evaluate every N epochs (0: the last epoch only for --protocol final, '
                                     'every epoch for val)', identity=False, range='[0, inf)')
    form: str = setting('', 'the method\'s form (a registered CapaBoost form, peft, linear or full)', cli=False)
    capaboost: Optional[CapaBoostConfig] = setting(None, 'CapaBoost settings of a CapaBoost form (a mapping of '
                                                         'CapaBoostConfig keys in YAML; typed once resolved)',
                                                   cli=False)
    peft: Dict[str, Any] = setting({}, 'HF PEFT method of form peft: type (a PeftType name) plus the arguments of its '
                                       'config class, e.g. {type: LOHA, r: 4, alpha: 8, target_modules: [qkv]}',
                                   cli=False)

    def validate(self, source: Optional[Dict[str, str]] = None) -> None:
        """RunError naming the setting, and the YAML file it came from (``source``: setting -> origin), for the
        first value that is not allowed."""
        def where(name: str) -> str:
            origin = (source or {}).get(name, 'command line')
            return f'--{_flag(name)}' if origin == 'command line' else f'{origin}: {name}'

        if self.form not in method_forms():
            raise RunError(f'method {self.method!r} has form {self.form!r}: allowed forms are '
                           f'{", ".join(method_forms())}')
        if (self.form == 'peft') != bool(self.peft):
            raise RunError(f'method {self.method!r}: a peft block goes with form peft (and form peft needs one: '
                           f'{{type: <PeftType>, ...}}); this one has form {self.form!r} and '
                           f'{"a" if self.peft else "no"} peft block')
        for name in ('task', 'name', 'method'):  # each becomes one folder of the run's path under --output
            value = getattr(self, name)
            if name == 'task' and value.startswith(HF_PREFIX):
                value = hf_task_name(value[len(HF_PREFIX):])
            if value in ('.', '..') or any(c in value for c in ('/', '\\', '|')) or not value.isprintable():
                hint = '; a task folder is given as --task PATH/TO/FOLDER holding a task.yaml' if name == 'task' else ''
                raise RunError(f'{where(name)} {value!r} is invalid: a plain name is required (printable, no path '
                               f'separators, "|" or ".."; it names a folder and a report row){hint}')
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get('choices')  # closed sets (protocol, amp): argparse checks flags, this YAML too
            if choices and value not in choices:
                raise RunError(f'{where(f.name)} {value!r} is invalid: choose one of {", ".join(choices)}')
            try:  # every number: finite and inside the range its field declares
                check_setting(f, value)
            except SettingError as e:
                raise RunError(f'{where(f.name)} {value!r} is invalid: {str(e).split(" is invalid: ", 1)[1]}') from None
        if self.weights and not Path(self.weights).is_file():
            raise RunError(f'--weights {self.weights}: file does not exist')
        if not (self.device in ('auto', 'cpu', 'cuda') or self.device.startswith('cuda:')):
            raise RunError(f'--device {self.device!r} is invalid: choose auto, cpu, cuda or cuda:N')

    def to_dict(self) -> Dict[str, Any]:
        """Plain YAML/JSON values (the CapaBoost block as a mapping, tuples as lists): config.yaml, results.json and
        checkpoints record this."""
        out = asdict(self)
        out['capaboost'] = self.capaboost.to_dict() if self.capaboost is not None else None
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'RunConfig':
        """The inverse of ``to_dict`` (a run folder's config.yaml); TypeError/ValueError on a malformed one."""
        data = dict(data)
        block = data.get('capaboost')
        if isinstance(block, dict) and is_capaboost_form(data.get('form')):
            data['capaboost'] = CapaBoostConfig.from_record(dict(block, method=data['form']))
        elif not isinstance(block, CapaBoostConfig):
            data['capaboost'] = None
        return cls(**data)


def _flag(name: str) -> str:
    return name.replace('_', '-')


FIELDS = {f.name: f for f in fields(RunConfig)}


def capaboost_fields() -> Dict[str, Any]:
    """{name: field} of every CapaBoost setting of every registered form."""
    return {f.name: f for f in setting_fields()}


_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), dict: (dict,)}
FIELD_TYPES = {name: _TYPES[type(field_default(f))] if name != 'capaboost' else (dict,)  # a mapping in YAML
               for name, f in FIELDS.items()}


IDENTITY_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata.get('identity', True))
"""The settings that decide a run's numbers: a finished or checkpointed run is reused only when they all match."""


def identity_settings(config: Dict[str, Any]) -> Dict[str, Any]:
    """The identity settings of a config dict, with the capaboost and peft blocks spread out as <block>.<key>."""
    # a run recorded before a setting existed ran with its default (e.g. no augmentation)
    flat = {k: config.get(k, field_default(FIELDS[k])) for k in IDENTITY_FIELDS if k not in ('capaboost', 'peft')}
    capaboost = dict(config.get('capaboost') or {})
    if is_capaboost_form(config.get('form')):  # the form's settings, defaults filled in, another form's left out
        try:
            capaboost = CapaBoostConfig.from_record({**capaboost, 'method': config['form']}).to_dict()
        except (TypeError, ValueError):
            pass  # compared as recorded
    for block, settings in (('capaboost', capaboost), ('peft', config.get('peft') or {})):
        for key, value in settings.items():
            flat[f'{block}.{key}'] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(recorded: Dict[str, Any], requested: 'RunConfig') -> List[str]:
    """'field: recorded -> requested' for every identity setting that differs (an int equals the same float)."""
    old, new = identity_settings(recorded), identity_settings(requested.to_dict())
    return [f'{k}: {old.get(k, "<unset>")!r} -> {new.get(k, "<unset>")!r}' for k in sorted(set(old) | set(new))
            if old.get(k, '<unset>') != new.get(k, '<unset>')]


def check_same_run(recorded: Dict[str, Any], requested: 'RunConfig', what: str) -> None:
    """RunError naming the differing settings (and the ways out) unless ``recorded`` matches ``requested``."""
    diff = config_differences(recorded, requested)
    if diff:
        shown = '; '.join(diff[:6]) + (f'; and {len(diff) - 6} more' if len(diff) > 6 else '')
        raise RunError(f'{what} was made with other settings ({shown}): pass --name <new name> for a separate run '
                       f'or --overwrite to replace it')


def check_type(name: str, value: Any, source: str) -> Any:
    """``value`` if it has the field's type (an int is a float too), else RunError naming ``source``."""
    types = FIELD_TYPES[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise RunError(f'{source}: {name}: {value!r} is a {type(value).__name__}, expected '
                       f'{" or ".join(t.__name__ for t in types)}')
    return float(value) if float in types else value


def method_names() -> List[str]:
    return sorted(p.stem for p in (CONFIG_DIR / 'methods').glob('*.yaml'))


def load_yaml(path: Path) -> Dict[str, Any]:
    """A YAML mapping; RunError naming the file otherwise."""
    if not path.is_file():
        raise RunError(f'config file {path} does not exist')
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunError(f'config file {path} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(data, dict):
        raise RunError(f'config file {path} must hold a mapping of settings, not a {type(data).__name__}')
    return data


def check_capaboost_block(block: Dict[str, Any], form: str, origins: Dict[str, str]) -> None:
    """RunError naming the YAML file (or flag) and key of the first unknown or invalid CapaBoost setting: checked
    when the config is resolved, so a sweep or search refuses it before any run starts."""
    known = capaboost_fields()

    def where(key: str) -> str:
        origin = origins.get(key, 'command line')
        if origin == 'command line':
            return '--' + known[key].metadata.get('flag', key).replace('_', '-') if key in known else key
        return f'{origin}: capaboost.{key}'

    unknown = [key for key in block if key not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ''
        raise RunError(f'{where(unknown[0])}: unknown CapaBoost setting {unknown[0]!r}{hint}: valid settings are '
                       f'{", ".join(k for k in known if k != "method")}')
    try:
        check_given_settings(block, CapaBoostConfig(**dict(block, method=form)))
    except SettingError as e:
        raise RunError(f'{where(e.name)}: {e}') from None


def task_folder(task: str, data_path: str) -> Optional[Path]:
    """The folder when ``--task`` is a path to a task folder (one holding a task.yaml anywhere; any folder when it is
    given with a path separator or without --data-path), else None."""
    path = Path(task).expanduser()
    if (path / TASK_INFO_FILE).is_file():
        return path.resolve()
    path_like = '/' in task or '\\' in task or not data_path
    return path.resolve() if path_like and path.is_dir() and not task.startswith(HF_PREFIX) else None


def hf_folder(task: str, data_path: str) -> Optional[Path]:
    """The local folder of ``hfds/<path>`` when it is not under --data-path but relative to the working directory
    (or absolute), else None (a folder under --data-path, or a Hub id)."""
    spec = task[len(HF_PREFIX):]
    if data_path and (Path(data_path) / spec).is_dir():
        return None
    path = Path(spec).expanduser()
    return path.resolve() if path.is_dir() else None


Layers = List[Tuple[str, Dict[str, Any]]]  # (origin: a YAML file or 'command line', its settings), lowest first


def config_layers(overrides: Dict[str, Any], config_file: Optional[str]) -> Tuple[str, Layers]:
    """The method name and the layers of a run's settings: method YAML, task YAML, --config YAML, flags."""
    config_layer = load_yaml(Path(config_file)) if config_file else {}
    method = overrides.get('method') or config_layer.get('method') or RunConfig.method
    if not isinstance(method, str):
        raise RunError(f'method: {method!r} is invalid: a method name is required ({", ".join(method_names())})')
    method_file = CONFIG_DIR / 'methods' / f'{method}.yaml'
    if method.endswith(('.yaml', '.yml')):  # a method YAML of one's own (e.g. for a form registered from outside)
        method_file = Path(method).expanduser()
        if not method_file.is_file():
            raise RunError(f'method file {method} does not exist')
        method = method_file.stem
    elif not method_file.is_file():
        raise RunError(f'unknown method {method!r}: choose one of {", ".join(method_names())}, or give a method '
                       f'YAML file (PATH.yaml)')
    layers: Layers = [(str(method_file), load_yaml(method_file))]
    task = overrides.get('task') or config_layer.get('task') or ''
    task_file = CONFIG_DIR / 'tasks' / f'{task}.yaml'
    if isinstance(task, str) and task and task_file.is_file():
        layers.append((str(task_file), load_yaml(task_file)))  # overrides only: classes and group are in TASKS
    if config_file:  # the method is named by the method YAML's name (a file's stem), set first by merge_layers
        layers.append((str(config_file), {k: v for k, v in config_layer.items() if k != 'method'}))
    layers.append(('command line', {k: v for k, v in overrides.items() if v is not None and k != 'method'}))
    return method, layers


@dataclass
class Merged:
    """The layers merged: each setting's value and origin; the capaboost and peft blocks merge key by key."""
    values: Dict[str, Any]
    source: Dict[str, str]  # setting -> the layer that set it
    capaboost_source: Dict[str, str]  # CapaBoost setting -> the layer that set it
    peft_origins: List[str]  # every layer that set part of the peft block, for its error messages


def merge_layers(method: str, layers: Layers) -> Merged:
    """Type-checked settings of ``layers``, later layers winning; RunError naming the layer of an unknown or
    mistyped setting."""
    merged = Merged({'method': method}, {}, {}, [])
    for origin, layer in layers:
        for key, value in layer.items():
            key = key.replace('-', '_')
            if value is None:  # YAML null: not set
                continue
            if key not in FIELDS:
                raise RunError(f'{origin}: unknown setting {key!r}: valid settings are {", ".join(sorted(FIELDS))}')
            value = check_type(key, value, origin)
            if key in ('capaboost', 'peft'):  # blocks merge key by key across layers
                merged.values[key] = {**merged.values.get(key, {}), **value}
            else:
                merged.values[key] = value
            merged.source[key] = origin
            if key == 'peft':
                merged.peft_origins.append(origin)
            if key == 'capaboost':
                merged.capaboost_source.update(dict.fromkeys(value, origin))
    return merged


def _clamp_warmup(cfg: RunConfig, source: Dict[str, str]) -> None:
    """A method or task YAML's warm-up longer than the run: epochs // 10, with a note; from a flag: RunError."""
    if cfg.warmup_epochs <= cfg.epochs:
        return
    origin = source.get('warmup_epochs', 'the default')
    if origin == 'command line':
        raise RunError(f'--warmup-epochs {cfg.warmup_epochs} is longer than --epochs {cfg.epochs}')
    clamped = cfg.epochs // 10
    print(f'note: warmup_epochs={cfg.warmup_epochs} (from {origin}) is longer than epochs={cfg.epochs}; '
          f'using {clamped} (epochs // 10)', file=sys.stderr)
    cfg.warmup_epochs = clamped


def planned_config(path: Path) -> RunConfig:
    """The run a planned ``config.yaml`` (written by ``sweep``/``search``, or any run folder's) is, exactly: no method
    or task YAML is layered under it and nothing is resolved again, so editing a method YAML after planning does not
    change a planned run. RunError naming the file when it is not a complete, valid run config."""
    data = load_yaml(path)
    missing = [name for name in ('task', 'method', 'form', 'model') if name not in data]
    if missing:
        raise RunError(f'{path} is not a planned run config (no {", ".join(missing)}): --run takes the config.yaml '
                       f'sweep and search write; a partial YAML goes in --config')
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RunError(f'{path}: unknown setting {unknown[0]!r}: valid settings are {", ".join(sorted(FIELDS))}')
    values = {key: check_type(key, value, str(path)) for key, value in data.items() if value is not None}
    try:
        cfg = RunConfig.from_dict(values)
    except SettingError as e:
        raise RunError(f'{path}: capaboost.{e}') from None
    except (TypeError, ValueError) as e:
        raise RunError(f'{path}: {e}') from None
    cfg.validate(dict.fromkeys(values, str(path)))
    return cfg


def resolve_config(overrides: Dict[str, Any], config_file: Optional[str] = None,
                   check_method: Optional[Callable[[RunConfig, str], None]] = None) -> RunConfig:
    """Defaults <- method YAML <- task YAML <- --config YAML <- command-line flags (``overrides``), validated, with
    a typed CapaBoost block for a CapaBoost form (its mask seed the run's seed unless set).

    ``check_method(cfg, where)`` (``methods.check_method``, passed in by the command line: it needs torch) checks
    the method's block against the architecture, naming ``where`` (the YAML files that set it) in its error."""
    merged = merge_layers(*config_layers(overrides, config_file))
    values = merged.values
    if not values.get('task'):
        raise RunError('--task is required (or a --config file that sets task)')
    task, data_path = values['task'], values.get('data_path', '')
    if isinstance(task, str) and task.startswith(HF_PREFIX):
        hf_task_name(task[len(HF_PREFIX):])  # RunError for a spec that names nothing
    folder = hf_folder(task, data_path) if task.startswith(HF_PREFIX) else task_folder(task, data_path)
    if folder is not None:  # a task folder: its parent is the data root, its name the task
        values['task'] = (HF_PREFIX if task.startswith(HF_PREFIX) else '') + folder.name
        values['data_path'] = str(folder.parent)
    if not values.get('data_path') and not values['task'].startswith(HF_PREFIX):
        raise RunError('--data-path is required (or give --task as a task folder)')
    block = values.pop('capaboost', {})
    cfg = RunConfig(**values)
    cfg.validate(merged.source)  # first: --epochs -1 is the culprit, not the warm-up it makes too long
    _clamp_warmup(cfg, merged.source)
    if cfg.form == 'peft' and block:
        raise RunError(f'method {cfg.method!r} has form peft: CapaBoost settings ({", ".join(block)}) do not apply; '
                       f'PEFT arguments go in the peft block or --peft-args')
    if is_capaboost_form(cfg.form):  # the masks differ per seed unless mask_seed fixes them
        check_capaboost_block(block, cfg.form, merged.capaboost_source)
        cfg.capaboost = CapaBoostConfig(**{'seed': cfg.seed, **block, 'method': cfg.form})
    if check_method is not None:
        check_method(cfg, ' + '.join(dict.fromkeys(merged.peft_origins)))
    return cfg
