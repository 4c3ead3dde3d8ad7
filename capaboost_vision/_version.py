"""The package version, in a module of its own: setup.cfg, the CLI's --version and ``capaboost_vision.__version__``
all read it, and reading it imports nothing else."""
__version__ = '0.2.0'
