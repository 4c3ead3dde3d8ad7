"""Atomic writes: nothing half-written is ever left under the final name."""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Union


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def missing_folders(path: Union[str, Path]) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, innermost first: what creating it would add."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty_folders(folders: List[Path]) -> None:
    """rmdir each folder (innermost first), leaving any that is not empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
