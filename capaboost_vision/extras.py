"""The optional packages and the extra that installs each: a missing one is one line naming what to install,
never an ImportError traceback."""
import importlib
from types import ModuleType

# package -> the capaboost-vision extra (setup.cfg [options.extras_require]) that installs it
EXTRAS = {'datasets': 'hf', 'matplotlib': 'plot', 'peft': 'peft', 'submitit': 'slurm', 'ray': 'ray'}


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed."""


def install_hint(package: str) -> str:
    return f'pip install "capaboost-vision[{EXTRAS[package]}]"'


def require(package: str, purpose: str) -> ModuleType:
    """``import package``, or MissingExtra: '<purpose> needs the <package> package: pip install
    "capaboost-vision[<extra>]"'. An ImportError from inside an installed package (a broken install) is not
    hidden."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        if (e.name or '').split('.')[0] != package:
            raise
        raise MissingExtra(f'{purpose} needs the {package} package: {install_hint(package)}') from None
