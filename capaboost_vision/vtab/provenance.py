"""What produced a result: package versions, the hardware and its numeric settings, the data each split read, and
the git commit of a source checkout. Recorded in every results.json (``provenance``) and model card; ``report``
names the fields in which its rows differ.

Bit-identical results are promised for the same command on the same machine kind (same CPU capability or GPU,
same thread count, same versions): float results depend on the kernels these select (docs/vtab.md,
"Reproducibility").
"""
import importlib
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .._version import __version__

PACKAGES = ('torch', 'timm', 'safetensors', 'huggingface_hub')  # imported by every run


def package_versions(extra_packages: Tuple[str, ...] = ()) -> Dict[str, Optional[str]]:
    """The versions of the packages a run's numbers depend on (plus ``extra_packages``), as each reports itself
    (torch's includes its build, e.g. '+cu130'), and Python's."""
    out: Dict[str, Optional[str]] = {'capaboost-vision': __version__}
    for name in PACKAGES + tuple(extra_packages):
        try:
            out[name] = getattr(importlib.import_module(name), '__version__', None)
        except ImportError:
            out[name] = None
    out['python'] = platform.python_version()
    return out


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: Any, amp: Optional[str]) -> Dict[str, Any]:
    """The hardware and numeric settings of ``device`` (a torch.device): CPU model and capability, threads; GPU
    name and count on CUDA; the autocast dtype actually used (None on CPU, which runs in float32)."""
    import torch  # here: report reads provenance without loading torch
    info: Dict[str, Any] = {'device': str(device), 'cpu': cpu_model(),
                            'cpu_capability': torch.backends.cpu.get_cpu_capability(),
                            'threads': torch.get_num_threads(), 'amp': amp}
    if device.type == 'cuda':
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    return info


def git_commit() -> Optional[str]:
    """The commit of the source checkout this package runs from ('<sha>-dirty' with uncommitted changes); None
    for an installed wheel or where git is missing."""
    root = Path(__file__).resolve().parents[2]
    if not (root / '.git').exists():
        return None
    try:
        sha = subprocess.run(['git', '-C', str(root), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(['git', '-C', str(root), 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f'{sha}-dirty' if dirty else sha


def provenance(device: Any, amp: Optional[str], extra_packages: Tuple[str, ...],
               data: Dict[str, Optional[str]]) -> Dict[str, Any]:
    """The ``provenance`` block of results.json: versions (``extra_packages``: those the method kind uses, e.g.
    peft), hardware, the data fingerprints by split, the commit."""
    return {'versions': package_versions(extra_packages), 'hardware': device_info(device, amp),
            'data_sha256': data, 'git_commit': git_commit(), 'os': f'{platform.system()} {platform.release()}'}


def flat(block: Dict[str, Any]) -> Dict[str, Any]:
    """``provenance`` as 'versions.torch' -> value, for comparing rows (data fingerprints and commit left out:
    they differ between tasks and commits by design)."""
    out = {}
    for section in ('versions', 'hardware'):
        for key, value in (block.get(section) or {}).items():
            out[f'{section}.{key}'] = value
    return out


def differing_fields(results: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """Provenance fields whose values differ among ``results`` (each result's ``provenance``), with the values."""
    values: Dict[str, set] = {}
    for r in results:
        for key, value in flat(r.get('provenance') or {}).items():
            values.setdefault(key, set()).add(str(value))
    return {k: sorted(v) for k, v in sorted(values.items()) if len(v) > 1}
