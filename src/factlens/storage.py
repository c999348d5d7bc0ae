"""Writing files safely: one atomic write, the umask's permissions, full or read-only disks as factlens errors,
and a lock for a folder that one writer owns (:class:`FolderLock`).

Every file factlens writes for a later step to read (checkpoint manifests, ``config.json``, populations,
reports, tables, figures) goes through :func:`atomic_write`: the bytes go to a temporary sibling, are
``fsync``-ed, get the mode a plain ``open`` would give (``0o666 & ~umask``; ``mkstemp`` alone makes them
private), and replace the target with ``os.replace``. A crash at any point leaves the old file (or none) under
the final name and no temporary file behind; a full disk or a read-only directory raises
:class:`~factlens.errors.StorageError` naming the path, the space needed and the fix.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from factlens.storage import atomic_write
    >>> path = atomic_write(Path(tempfile.mkdtemp()) / "table.csv", "a,b\\n1,2\\n")
    >>> path.read_text()
    'a,b\\n1,2\\n'
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from factlens.errors import CheckpointError, StorageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: an O_EXCL lock file with a dead-PID check
    fcntl = None

_log = logging.getLogger("factlens")

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_default(path: str | Path, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (``mkstemp``/``mkdtemp`` make it private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent); ``None`` if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


@contextlib.contextmanager
def storage_errors(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk or an unwritable directory while writing ``path`` into a
    :class:`~factlens.errors.StorageError` that names the path, the space needed and the fix.

    Example:
        >>> import errno
        >>> from factlens.errors import StorageError
        >>> from factlens.storage import storage_errors
        >>> try:
        ...     with storage_errors("runs/x/metrics.jsonl", needed=2**20):
        ...         raise OSError(errno.ENOSPC, "No space left on device")
        ... except StorageError as err:
        ...     print(str(err)[:60])
        cannot write runs/x/metrics.jsonl: no space left on the devi
    """
    try:
        yield
    except OSError as err:
        if isinstance(err, StorageError) or err.errno not in (*_NO_SPACE, *_NOT_WRITABLE):
            raise
        raise storage_error(path, err, needed) from err


def storage_error(path: str | Path, err: OSError, needed: int | None = None) -> StorageError:
    """The :class:`~factlens.errors.StorageError` for ``err`` raised while writing ``path``."""
    from factlens.resources import format_bytes

    if err.errno in _NO_SPACE:
        free = free_bytes(path)
        have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
        want = f"; this write needs about {format_bytes(needed)}" if needed else ""
        return StorageError(f"cannot write {path}: no space left on the device ({have}{want}). Free some space "
                            "or write to a directory on another disk (out_dir / --out).")
    return StorageError(f"cannot write {path}: {err.strerror or 'permission denied'} (the directory is read-only "
                        "or not yours). Pass a writable directory (out_dir / --out) or fix its permissions.")


def check_writable_dir(path: str | Path, fix: str = "pass a writable folder as --out / out_dir", *,
                       create: bool = False) -> Path:
    """The folder results will be written to, checked before any work: not a file, creatable and writable.

    Nothing is left behind: the check writes (and removes) a probe file in the folder, or in its nearest
    existing parent when the folder does not exist yet; ``create=True`` also creates the folder.

    Raises:
        ConfigError: ``path`` is an existing file.
        StorageError: the folder cannot be created or written (read-only disk, permissions, full disk),
            naming the path and ``fix``.

    Example:
        >>> from factlens.storage import check_writable_dir
        >>> check_writable_dir("/proc/version")
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: the output folder /proc/version is an existing file; pass a folder path (it is created if missing).
    """
    from factlens.errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the output folder {path} is an existing file; pass a folder path (it is created if "
                          "missing).")
    where = path
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            where = path
        if where.exists() and not where.is_dir():
            raise ConfigError(f"the output folder {path} is inside {where}, which is a file; pass a folder path.")
        fd, probe = tempfile.mkstemp(dir=where, prefix=".factlens-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "no space left on the device" if err.errno in _NO_SPACE else \
            (err.strerror or "permission denied") + " (read-only or not yours)"
        raise StorageError(f"cannot write results to {path}: {reason}. Fix: {fix}.") from err
    return path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically, with the umask's mode; returns ``path``.

    The parent directory must exist. See the module docstring for the guarantees.
    """
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else bytes(data)
    with storage_errors(path, len(blob)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            chmod_default(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


class FolderLock:
    """An exclusive lock on a folder that one writer owns (``with FolderLock(folder / ".factlens.lock"): ...``).

    An ``flock`` on the lock file, which holds the owner's pid, host and start time; a second writer is refused
    (:class:`~factlens.errors.CheckpointError` naming the holder). The kernel drops the lock of a killed process,
    so a lock left by a SIGKILLed writer is taken over.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from factlens.storage import FolderLock
        >>> lock = Path(tempfile.mkdtemp()) / ".factlens.lock"
        >>> with FolderLock(lock):
        ...     lock.read_text().startswith('{"pid"')
        True
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
        with storage_errors(self.path):
            if fcntl is None:  # pragma: no cover
                self.fd = self._exclusive_create()
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace")
                    os.close(fd)
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise self._busy(holder) from None
                    raise
                stale = os.pread(fd, 4096, 0)
                if stale:  # a clean release empties the file: its holder was killed; the kernel freed the lock
                    _log.info("took over %s, left by a trainer that was killed (%s)", self.path, stale.decode())
                os.ftruncate(fd, 0)
                self.fd = fd
            os.pwrite(self.fd, owner.encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        if fcntl is None:  # pragma: no cover
            os.close(self.fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
        else:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = None

    def _busy(self, holder: str) -> CheckpointError:
        try:
            who = json.loads(holder)
            who = f"pid {who['pid']} on {who['host']}, since {who['since']}"
        except (ValueError, KeyError, TypeError):
            who = "another process"
        return CheckpointError(f"{self.path.parent} is in use by another trainer ({who}); two trainers in one "
                               "directory would interleave their checkpoints and metrics. Wait for it to finish or "
                               "stop it, or train into another directory.")

    def _exclusive_create(self) -> int:  # pragma: no cover - used where flock does not exist
        for _ in range(2):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self.path.read_text(errors="replace")
                try:
                    who = json.loads(holder)
                    alive = who["host"] != socket.gethostname() or _pid_alive(int(who["pid"]))
                except (ValueError, KeyError, TypeError):
                    alive = bool(holder)
                if alive:
                    raise self._busy(holder) from None
                self.path.unlink(missing_ok=True)  # a dead owner's lock: take it over
        raise self._busy("")


def _pid_alive(pid: int) -> bool:  # pragma: no cover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["FolderLock", "atomic_write", "check_writable_dir", "chmod_default", "free_bytes", "storage_error",
           "storage_errors", "umask"]
