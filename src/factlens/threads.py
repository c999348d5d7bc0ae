"""How many CPU threads torch uses: one place decides, so that runs sharing the cores do not oversubscribe them.

torch's default is one intra-op thread per core. When several processes share the cores (a grid of cells run
side by side, other users' jobs, a second notebook) every one of them starts that many threads and they fight
for the cores: on two shared cores one small training run measured several times slower than with one thread.
:func:`default_threads` picks a count that fits: the cores this process may use, split between the processes
that run at once (``concurrent``), less the cores other work keeps busy (the one-minute load average, or the
threads runnable right now when fewer: the average still counts a job minutes after it ended). The
``FACTLENS_THREADS`` environment variable and every computing command's ``--threads`` option override it.

Example:
    >>> from factlens.threads import available_cores, default_threads, use_threads
    >>> n = default_threads()
    >>> 1 <= n <= available_cores()
    True
    >>> with use_threads(1) as used:
    ...     used
    1
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from factlens.errors import ConfigError

ENV = "FACTLENS_THREADS"
"""The environment variable that sets the thread count of every factlens command (an integer >= 1)."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``).

    Example:
        >>> from factlens.threads import available_cores
        >>> available_cores() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _runnable_now(looks: int = 5, pause_s: float = 0.02) -> int | None:
    """Threads of other processes runnable right now: the most of a few looks at the running count of Linux's
    ``/proc/loadavg`` (which counts this process's running thread too), ``None`` where there is no such file."""
    counts = []
    for i in range(looks):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < looks:
            time.sleep(pause_s)
    return max(0, max(counts) - 1)


def _busy_cores() -> float:
    """Cores kept busy by other work: the one-minute load average, or fewer when fewer threads are runnable
    right now (the average lags by minutes after a job ends); 0 where the OS reports neither."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    now = _runnable_now()
    return load if now is None else min(load, float(now))


def default_threads(concurrent: int = 1) -> int:
    """Torch threads for one of ``concurrent`` processes that run at once on this machine's cores.

    ``FACTLENS_THREADS`` wins when set. Otherwise: the available cores split between the ``concurrent``
    processes, less what the load average says other work keeps busy, at least one. A grid that trains ``k``
    cells side by side passes ``concurrent=k``, so ``k`` cells on ``k`` cores get one thread each.

    Example:
        >>> from factlens.threads import available_cores, default_threads
        >>> default_threads(concurrent=10 * available_cores())
        1
    """
    if concurrent < 1:
        raise ConfigError(f"concurrent={concurrent}: pass the number of processes running at once (>= 1).")
    env = os.environ.get(ENV)
    if env:
        return _checked(env, f"{ENV}={env!r}")
    cores = available_cores()
    share = max(1, cores // concurrent)
    free = (cores - _busy_cores()) / concurrent
    return max(1, min(share, int(free)))


def _checked(value: int | str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{what}: the thread count must be an integer >= 1 (e.g. 1 on a shared machine); "
                          f"leave it unset for the default ({default_threads.__name__} picks one that fits).")
    return n


def resolve_threads(threads: int | None = None, concurrent: int = 1) -> int:
    """``threads`` when given (checked), else :func:`default_threads` (``FACTLENS_THREADS``, then the machine).

    Example:
        >>> from factlens.threads import resolve_threads
        >>> resolve_threads(3)
        3
    """
    return default_threads(concurrent) if threads is None else _checked(threads, f"threads={threads!r}")


@contextlib.contextmanager
def use_threads(threads: int | None = None, concurrent: int = 1) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set to :func:`resolve_threads`, restored afterwards.

    Example:
        >>> import torch
        >>> from factlens.threads import use_threads
        >>> before = torch.get_num_threads()
        >>> with use_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    n = resolve_threads(threads, concurrent)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


__all__ = ["ENV", "available_cores", "default_threads", "resolve_threads", "use_threads"]
