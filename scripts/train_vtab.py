"""Thin wrapper: `python scripts/train_vtab.py ARGS` == `capaboost-vtab train ARGS` (one implementation)."""
import sys

from capaboost_vision.cli import main

if __name__ == '__main__':
    sys.exit(main(['train', *sys.argv[1:]]))
