"""``python -m capaboost_vision.cli``, the module torchrun runs: the VTAB application's command line
(``capaboost_vision.vtab.cli``) under the name it has always had."""
import sys

from .vtab.cli import main

if __name__ == '__main__':
    sys.exit(main())
