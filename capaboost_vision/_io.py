"""Atomic writes: nothing half-written is ever left under the final name. Exclusive locks that also work where
``flock`` does not (some cluster filesystems)."""
import contextlib
import errno
import fcntl
import glob
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Union


FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk (torch's message hides it)


class DiskFullError(OSError):
    """A write that failed for lack of space: one line naming the file and the free space. The file it would have
    replaced, if any, is unchanged."""


def _disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk (or quota) is full: ENOSPC/EDQUOT,
    safetensors' 'No space left on device', or torch's bare '[enforce fail at inline_container.cc]' with the
    disk found (nearly) full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != 'SafetensorError':
        return False
    if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


def _size_limit(error: BaseException) -> Optional[int]:
    """The file-size limit (RLIMIT_FSIZE, bytes) when ``error`` is a write stopped by it: EFBIG, or torch's and
    safetensors' bare write failures while a finite limit is set; else None."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return limit
    while error is not None:  # torch's writer fails again on close: the first failure is in the context
        bare = isinstance(error, RuntimeError) or type(error).__name__ == 'SafetensorError'
        if bare and any(what in str(error) for what in ('write failed', 'iostream error', 'inline_container',
                                                      'File too large', 'Error while serializing')):
            return limit
        error = error.__context__
    return None


def _megabytes(n: int) -> str:
    return f'{n / 1e6:.1f} MB'


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it. A write
    that fails for lack of space becomes one ``DiskFullError`` line naming ``path`` and the free space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except Exception as e:
        limit = _size_limit(e)
        full = limit is None and _disk_full(e, path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not full and limit is None:
            raise
        kept = f'the previous {path.name} is unchanged; ' if path.exists() else ''
        if limit is not None:
            raise DiskFullError(f'cannot write {path}: it exceeds this process\'s file-size limit (ulimit -f: '
                                f'{_megabytes(limit)}); {kept}raise the limit and rerun (a run continues from its '
                                f'last checkpoint with --resume)') from None
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(f'cannot write {path}: no space left on the device ({_megabytes(free)} free there); '
                            f'{kept}free some space and rerun (a run continues from its last checkpoint with '
                            f'--resume)') from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def leftover_temps(path: Union[str, Path]) -> List[Path]:
    """The temp files ``atomic_path(path)`` leaves when its process is killed between the write and the rename.
    Remove them only while holding the lock that guards writing ``path`` (then no live writer owns them)."""
    path = Path(path)
    return sorted(p for p in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp') if p.is_file())


def remove_leftovers(paths: List[Path], where: Path) -> None:
    """Delete ``paths`` (files or folders a killed command left) and say so in one note naming ``where``."""
    if not paths:
        return
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    print(f'note: removed what an interrupted command left in {where}: {", ".join(p.name for p in paths)}',
          file=sys.stderr)


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


FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""``flock`` errors meaning the filesystem cannot lock (Lustre mounted without ``flock``, NFS without lockd)."""


class LockHeld(Exception):
    """Another process holds the lock (the message says which file, and who for an owner-file lock)."""


@contextlib.contextmanager
def exclusive_lock(path: Union[str, Path], wait: bool, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): ``flock``, or where the filesystem cannot flock an
    owner file ``<path>.held`` created with O_EXCL (atomic on local disks and NFS) that names host and pid. With
    ``wait`` block until it is free, else raise LockHeld at once. An owner file left by a dead process of this
    host is taken over; one of another host is only ever removed by hand (the error says so)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, 'a')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        raise LockHeld(f'{path} is locked by another process') from None
    except OSError as e:
        handle.close()
        if e.errno not in FLOCK_UNSUPPORTED:
            raise
        with _owner_file_lock(path.with_name(path.name + '.held'), wait, poll_s):
            yield
        return
    try:
        yield
    finally:
        handle.close()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def _owner_file_lock(held: Path, wait: bool, poll_s: float) -> Iterator[None]:
    """The fallback of ``exclusive_lock``: the lock is the existence of ``held``."""
    me = f'{socket.gethostname()} {os.getpid()}'
    while True:
        try:
            fd = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = held.read_text().split()
            except OSError:  # removed meanwhile: try again
                continue
            host, pid = (owner + ['', ''])[:2]
            if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
                held.unlink(missing_ok=True)  # its owner died without releasing it
                continue
            if not wait:
                raise LockHeld(f'{held} is held by {" ".join(owner) or "a process"} (this filesystem does not '
                               f'support flock; delete the file if that process is gone)') from None
            time.sleep(poll_s)
    try:
        os.write(fd, me.encode())
        os.close(fd)
        yield
    finally:
        held.unlink(missing_ok=True)
