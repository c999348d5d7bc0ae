"""A training run owns its directory: checked before anything is written, locked while a trainer is in it.

:meth:`RunDirectory.claim` is what the trainer does before its first write:

1. **Check** (read-only): the directory is new, empty, or holds *this* run: every checkpoint manifest, and
   ``config.json``, carries this config, and ``metrics.jsonl`` is a factlens log. Anything else is refused with
   the fix named: a file instead of a directory, another tool's files (a Hugging Face ``save_pretrained``
   folder, someone else's ``metrics.jsonl``), a run with another config (a shorter run into an older run's
   directory included), checkpoints of two runs mixed, a hand-edited ``config.json``, or too little free disk.
2. **Lock**: an exclusive ``flock`` on ``.factlens.lock`` (holding the owner's pid, host and start time) for
   as long as the run is in the directory. A second trainer is refused, naming the holder. The kernel drops the
   lock of a killed process, so a lock left by a SIGKILLed trainer is taken over.
3. **Check again** under the lock, then write ``config.json`` (atomically, with the umask's permissions).

Example:
    >>> import tempfile
    >>> from factlens.bios.config import TrainConfig
    >>> from factlens.bios.rundir import RunDirectory
    >>> run = RunDirectory(tempfile.mkdtemp() + "/run", TrainConfig.preset("tiny"))
    >>> with run.claim():
    ...     (run.path / "config.json").exists()
    True
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from factlens.bios.config import TrainConfig
from factlens.bios.history import METRICS, read_jsonl
from factlens.bios.runs import CHECKPOINTS, CONFIG, RESUME, config_diff, read_config_json, stored_configs
from factlens.checkpoints import _free_bytes, atomic_write_text, list_checkpoints, storage_errors
from factlens.errors import CheckpointError, ConfigError, StorageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: an O_EXCL lock file with a dead-PID check
    fcntl = None

LOCK = ".factlens.lock"
_log = logging.getLogger("factlens")


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    return _free_bytes(path)


class RunDirectory:
    """The directory of the run of ``config``. See the module docstring."""

    def __init__(self, path: str | Path, config: TrainConfig) -> None:
        self.path, self.config = Path(path), config

    def check(self) -> None:
        """Refuse (naming the fix) a directory that is not new, empty or this run's; writes nothing."""
        path = self.path
        for above in (path, *path.parents):
            if above.exists():
                if not above.is_dir():
                    what = f"{path} is a file" if above == path else f"{path} cannot be created: {above} is a file"
                    raise ConfigError(f"the output directory {what}. Pass a directory path (new, or this run's "
                                      "own) as out_dir / --out.")
                break
        if not path.exists():
            return
        entries = sorted(e for e in os.listdir(path) if not e.startswith("."))  # hidden: our lock and temp files
        if not entries:
            return
        try:
            from_json = read_config_json(path)
        except CheckpointError:
            raise self._foreign(entries) from None
        stored = stored_configs(path)  # a corrupt manifest raises, naming the checkpoint to delete
        if from_json is None and not stored:
            raise self._foreign(entries)
        ours = self.config.to_dict()
        theirs = {json.dumps(c, sort_keys=True): c for c in stored.values()}
        if len(theirs) > 1:
            first, second, *_ = theirs.values()
            raise CheckpointError(f"{path} mixes checkpoints of {len(theirs)} runs (configs differ in "
                                  f"{config_diff(first, second)}); keep each run in its own directory: use a new "
                                  "output directory, or delete this one and train again.")
        if stored:
            (run,) = theirs.values()
            if from_json is not None and from_json.to_dict() != run:
                raise CheckpointError(f"{path / CONFIG} disagrees with the config in the run's checkpoints (differs "
                                      f"in {config_diff(from_json.to_dict(), run)}): it was edited or overwritten. "
                                      "Restore it or delete it, then train again.")
        else:
            run = from_json.to_dict()
        if run != ours:
            where = "" if stored else " (no checkpoint yet)"
            raise CheckpointError(f"{path} holds a run with another config{where} (differs in {config_diff(run, ours)}); "
                                  "use a new output directory, or the same config to resume it.")
        if (path / METRICS).exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a torn last line is recovered by the resume
                read_jsonl(path / METRICS)  # another tool's log raises, naming the fix

    def finished(self) -> bool:
        """Whether the directory holds this run trained to its last step (final evaluation logged, final
        checkpoint written). Like :meth:`check`, it refuses a directory that holds anything else."""
        self.check()
        if not self.metrics.exists():
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logged = any(r["kind"] == "eval" and r["step"] == self.config.steps for r in read_jsonl(self.metrics))
        return logged and self.config.steps in list_checkpoints(self.checkpoints)

    def _foreign(self, entries: list[str]) -> CheckpointError:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        return CheckpointError(f"{self.path} is not empty and is not a factlens training run (it holds {shown}); "
                               "factlens never overwrites another tool's files. Pass a new or empty directory as "
                               "out_dir / --out.")

    def check_space(self, needed: int, what: str) -> None:
        """Refuse a run that would fill the disk (:class:`~factlens.errors.StorageError`, naming the space)."""
        from factlens.resources import format_bytes

        free = free_bytes(self.path)
        if free is not None and free < needed:
            raise StorageError(f"{self.path} is on a disk with {format_bytes(free)} free, but this run writes about "
                               f"{format_bytes(needed)} ({what}). Free some space, pass a directory on another disk "
                               "(out_dir / --out), or save fewer checkpoints (checkpoint_every, keep_resume).")

    @contextlib.contextmanager
    def claim(self, *, needed: int = 0, what: str = "") -> Iterator[RunDirectory]:
        """Check, lock, check again, write ``config.json``; the lock is held until the block exits."""
        self.check()
        if needed:
            self.check_space(needed, what)
        with storage_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        with RunLock(self.path / LOCK):
            self.check()  # another trainer may have written between the first check and the lock
            text = json.dumps(self.config.to_dict(), indent=1)
            config_json = self.path / CONFIG
            if not config_json.exists() or config_json.read_text() != text:
                atomic_write_text(config_json, text)
            yield self

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def resume(self) -> Path:
        return self.path / RESUME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS


class RunLock:
    """An exclusive lock on a run directory (``with RunLock(run_dir / LOCK): ...``), refused while held."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
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


__all__ = ["LOCK", "RunDirectory", "RunLock", "free_bytes"]
