"""Run one of timm's own scripts (``train.py``, ``validate.py``, ``inference.py``, ...) on CapaBoost models.

timm finds models by import only (it has no plugin discovery), so its scripts answer ``Unknown model`` for
``vit_base_capaboost_lora``. This runs the script as ``__main__`` after importing this package::

    python -m capaboost_vision.timm_script PATH/train.py --model vit_base_capaboost_lora --pretrained ...

With timm's optimizer factory only the CapaBoost weights and the head train (the rest is frozen: timm skips
parameters without ``requires_grad``). ``capaboost-vtab from-checkpoint`` turns the resulting checkpoint into an
adapter folder.
"""
import runpy
import sys
from pathlib import Path
from typing import List, Optional

import capaboost_vision  # noqa: F401  (registers the CapaBoost models in timm)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or not argv[0].endswith('.py'):
        print('error: script: the path of a timm script (train.py, validate.py, inference.py) is required: '
              'python -m capaboost_vision.timm_script PATH/train.py ARGS...', file=sys.stderr)
        return 2
    script = Path(argv[0])
    if not script.is_file():
        print(f'error: script {script} does not exist', file=sys.stderr)
        return 2
    sys.argv = [str(script)] + argv[1:]
    sys.path.insert(0, str(script.resolve().parent))  # as `python train.py` would: its folder first
    runpy.run_path(str(script), run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main())
