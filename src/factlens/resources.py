"""Memory: the budget, what is free, a guard that refuses what will not fit, and what the process uses.

A Python process that runs out of memory is killed without a traceback (the Linux OOM killer) or dies with a
CUDA OOM deep inside a forward pass, after minutes of work. Where factlens can predict a size, it checks it
against the memory that is free *before* allocating, and raises :class:`~factlens.errors.ResourceError`
naming the numbers and the fix (a smaller batch, ``names_filter``, offloading the cache to the CPU).

- :func:`check_fits` is the guard, used by :func:`~factlens.cache.run_with_cache`, factlens's own sweeps and
  the trainer.
- :func:`saved_tensor_bytes` measures the activations autograd keeps for a backward pass (the trainer's
  memory estimate extrapolates it).
- :func:`memory_usage` reads the process's resident and peak memory (and CUDA's); long loops show it in
  their progress bars (:func:`track`) and training writes it to ``metrics.jsonl``.

The budget is the memory free on the device (``MemAvailable`` and the cgroup limits, page cache counted as
free, on the CPU; ``cudaMemGetInfo`` plus the caching allocator's free blocks on a GPU), times a safety ``fraction``; set
``FACTLENS_MEMORY_BUDGET`` (e.g. ``8GiB``) or :func:`set_memory_budget` to impose a smaller one.

Example:
    >>> from factlens.resources import check_fits, format_bytes, memory_usage, parse_bytes
    >>> format_bytes(parse_bytes("1.5 KiB"))
    '1.5 KiB'
    >>> check_fits(10, "cpu", what="a tiny tensor", fixes=["nothing"])     # fits: returns None
    >>> memory_usage().rss > 0
    True
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from factlens.errors import ConfigError, ResourceError
from factlens.progress import tqdm

_budget_override: int | None = None


# ------------------------------------------------------------------------------------------------ formatting
def format_bytes(n: float) -> str:
    """``1536 → '1.5 KiB'``; binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def parse_bytes(text: str | int | float) -> int:
    """``'8GiB'``, ``'512 MB'``, ``'1e9'`` or a number → bytes (``G``/``GB``/``GiB`` are all powers of 1024)."""
    if isinstance(text, bool):
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. '8GiB', '512MiB' or a number of bytes")
    if isinstance(text, int | float):
        if not (math.isfinite(text) and text > 0):
            raise ConfigError(f"memory size {text!r}: pass a positive number of bytes, or e.g. '8GiB'")
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    try:
        number = float(m.group(1)) if m else float("nan")
    except ValueError:
        number = float("nan")
    if not number >= 0:
        raise ConfigError(f"cannot read the memory size {text!r}; write e.g. '8GiB', '512MiB' or a number of bytes")
    return int(number * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


def set_memory_budget(budget: int | str | None) -> None:
    """Cap the memory factlens's checks allow (bytes or ``'8GiB'``); ``None`` = what the device has free.

    Example:
        >>> from factlens.resources import set_memory_budget
        >>> set_memory_budget("8GiB"); set_memory_budget(None)
    """
    global _budget_override
    _budget_override = None if budget is None else parse_bytes(budget)


# ------------------------------------------------------------------------------------------------- readings
def _read_int(path: str | Path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path) -> dict[str, int]:
    try:
        pairs = (line.split() for line in path.read_text().splitlines())
        return {k: int(v) for k, v, *_ in pairs if v.isdigit()}
    except (OSError, ValueError):
        return {}


# (mount root, limit file, usage file, reclaimable page-cache counters in memory.stat) for cgroup v2, then v1
_CGROUP_LAYOUTS = {
    "v2": (("/sys/fs/cgroup", "/sys/fs/cgroup/unified"), "memory.max", "memory.current",
           ("inactive_file", "active_file")),
    "v1": (("/sys/fs/cgroup/memory",), "memory.limit_in_bytes", "memory.usage_in_bytes",
           ("total_inactive_file", "total_active_file")),
}


def _cgroup_available(proc_cgroup: str | Path = "/proc/self/cgroup") -> int | None:
    """Bytes this process's memory cgroups still allow, or ``None`` when no limit applies.

    Every level from the process's own cgroup up to the mount root is checked (a parent's limit binds its
    children), and page cache is counted as free: a cgroup's usage includes the file cache (after a
    ``pip install`` it can fill the limit), which the kernel reclaims before it OOM-kills anyone.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    allowed = []
    for line in lines:
        _, controllers, rel = [*line.split(":", 2), "", ""][:3]
        kind = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if kind is None:
            continue
        roots, limit_name, usage_name, reclaimable = _CGROUP_LAYOUTS[kind]
        for root in map(Path, roots):
            here = root / rel.strip("/")
            for level in (here, *here.parents):
                if root not in (level, *level.parents):
                    break
                limit, usage = _read_int(level / limit_name), _read_int(level / usage_name)
                if limit is not None and usage is not None and limit < 2**60:
                    stat = _stat(level / "memory.stat")
                    allowed.append(max(0, limit - max(0, usage - sum(stat.get(k, 0) for k in reclaimable))))
    return min(allowed, default=None)


def _cpu_available() -> int:
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 2**62  # unknown: do not block
    cgroup = _cgroup_available()
    return avail if cgroup is None else min(avail, cgroup)


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (before any budget or safety fraction)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return _cpu_available()


def _user_budget() -> int | None:
    """The budget set with :func:`set_memory_budget` or ``FACTLENS_MEMORY_BUDGET`` (that order), if any."""
    if _budget_override is not None:
        return _budget_override
    env = os.environ.get("FACTLENS_MEMORY_BUDGET")
    return parse_bytes(env) if env else None


def budget_bytes(device: str | torch.device = "cpu", fraction: float = 0.9) -> int:
    """What factlens's checks allow on ``device``: the override if set, else ``fraction`` × free memory."""
    return _allowance(device, None, fraction)[0]


def _allowance(device, budget: int | str | None, fraction: float) -> tuple[int, str]:
    """``(bytes allowed, where that figure comes from)`` for the messages of :func:`check_fits`."""
    chosen = parse_bytes(budget) if budget is not None else _user_budget()
    if chosen is not None:
        return chosen, "the budget you set"
    return int(fraction * available_bytes(device)), f"{fraction:.0%} of the memory free on {torch.device(device)}"


@dataclass(frozen=True)
class MemoryUsage:
    """The process's memory now and at its peak (bytes); CUDA figures are ``None`` on the CPU.

    ``peak_rss`` is the process's lifetime peak (``getrusage``); ``cuda_peak`` is since the last
    ``torch.cuda.reset_peak_memory_stats``.
    """

    rss: int
    peak_rss: int
    cuda_allocated: int | None = None
    cuda_peak: int | None = None

    def short(self) -> str:
        """``'RSS 2.1 GiB (peak 2.5 GiB)'``, plus the GPU's on CUDA: for progress bars and logs."""
        text = f"RSS {format_bytes(self.rss)} (peak {format_bytes(self.peak_rss)})"
        if self.cuda_allocated is not None:
            text += f", GPU {format_bytes(self.cuda_allocated)} (peak {format_bytes(self.cuda_peak or 0)})"
        return text

    def to_dict(self) -> dict[str, float]:
        """GiB figures for a log record: ``rss_gib``, ``peak_rss_gib`` (and ``cuda_gib``, ``cuda_peak_gib``)."""
        out = {"rss_gib": self.rss / 2**30, "peak_rss_gib": self.peak_rss / 2**30}
        if self.cuda_allocated is not None:
            out |= {"cuda_gib": self.cuda_allocated / 2**30, "cuda_peak_gib": (self.cuda_peak or 0) / 2**30}
        return out


def memory_usage(device: str | torch.device | None = None) -> MemoryUsage:
    """Read the process's memory (and ``device``'s when it is a GPU).

    Example:
        >>> from factlens import memory_usage
        >>> memory_usage().rss > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = peak
    if device is not None and torch.device(device).type == "cuda":
        return MemoryUsage(rss, peak, torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device))
    return MemoryUsage(rss, peak)


def track(iterable: Iterable, *, device: str | torch.device | None = None, disable: bool = False, **kwargs):
    """``tqdm(iterable, **kwargs)`` whose postfix shows the process's memory, updated after every item.

    Example:
        >>> from factlens.resources import track
        >>> sum(track(range(3), desc="demo", disable=True))
        3
    """
    bar = tqdm(iterable, disable=disable, **kwargs)
    for item in bar:
        yield item
        if not disable:
            bar.set_postfix_str(memory_usage(device).short(), refresh=False)


# ------------------------------------------------------------------------------------------------- checking
def check_fits(nbytes: int, device: str | torch.device, *, what: str, fixes: Iterable[str],
               budget: int | str | None = None, fraction: float = 0.9) -> None:
    """Raise :class:`~factlens.errors.ResourceError` when ``nbytes`` exceed the budget on ``device``.

    Args:
        nbytes: The predicted allocation.
        device: Where it will live.
        what: What needs it, for the message (``"caching 290 hooks for 64 × 1024 tokens"``).
        fixes: Suggestions, most useful first; the message lists them.
        budget: Bytes (or ``'8GiB'``) to allow; default :func:`budget_bytes`.
        fraction: Safety fraction of the free memory (the computation itself needs working space).

    Example:
        >>> from factlens.resources import check_fits
        >>> check_fits(10, "cpu", what="a tiny tensor", fixes=["nothing"])
        >>> check_fits(10**15, "cpu", what="a huge cache", fixes=["a smaller batch"])
        Traceback (most recent call last):
        ...
        factlens.errors.ResourceError: a huge cache needs 909.5 TiB...
    """
    allowed, source = _allowance(device, budget, fraction)
    if nbytes > allowed:
        _refuse(nbytes, allowed, source, what, fixes)


def _refuse(nbytes: int, allowed: int, source: str, what: str, fixes: Iterable[str]) -> NoReturn:
    raise ResourceError(f"{what} needs {format_bytes(nbytes)}, but {source} is {format_bytes(allowed)}; it would "
                        f"run out of memory. Fix: {'; '.join(fixes)}. (Raise the limit with FACTLENS_MEMORY_BUDGET "
                        "if you know better.)")


# --------------------------------------------------------------------------------------------- activations
def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for the backward pass of ``fn()``: every tensor saved for backward while it runs,
    a storage saved several times counted once, the storages of ``exclude`` (the parameters) not counted.

    This is what a training step holds at the end of its forward pass, beyond weights, gradients and
    optimiser state; the graph is freed when the call returns.

    Example:
        >>> import torch
        >>> from factlens.resources import saved_tensor_bytes
        >>> layer = torch.nn.Linear(8, 8)
        >>> saved_tensor_bytes(lambda: torch.relu(layer(torch.ones(4, 8))), exclude=layer.parameters())
        256
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in skip and key not in seen:
            seen.add(key)
            total += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out  # the graph, and everything it saved, goes here
    return total


__all__ = ["MemoryUsage", "available_bytes", "budget_bytes", "check_fits", "format_bytes", "memory_usage", "parse_bytes",
           "saved_tensor_bytes", "set_memory_budget", "track"]
