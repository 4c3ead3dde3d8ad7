"""Entry point of the ``capaboost-vtab`` command.

It lives outside the ``capaboost_vision`` package on purpose: importing that package registers its models in
timm, which imports torch (3-10 s). Here the CLI module and the torch-free settings modules it needs
(``config``, ``run_config``) are loaded under a bare package object, so ``--help`` and usage errors answer at
once; the real package, with its model registration, is imported by the first command that needs it.
"""
import importlib.util
import sys


def main() -> int:
    if 'capaboost_vision' in sys.modules:
        from capaboost_vision.vtab import cli
        return cli.main()
    spec = importlib.util.find_spec('capaboost_vision')
    sys.modules['capaboost_vision'] = importlib.util.module_from_spec(spec)  # a bare package: __init__ not run
    try:
        from capaboost_vision.vtab import cli
    finally:
        del sys.modules['capaboost_vision']  # the next import runs the real __init__ (reusing the loaded modules)
    return cli.main()


if __name__ == '__main__':
    sys.exit(main())
