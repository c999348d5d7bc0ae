"""Memory: predict what a cache or a training run needs, refuse what will not fit, report what was used.

A Python process that runs out of memory is killed without a traceback (the Linux OOM killer) or dies with a
CUDA OOM deep inside a forward pass, after minutes of work. Where factlens can predict a size, it checks it
against the memory that is free *before* allocating, and raises :class:`~factlens.errors.ResourceError`
naming the numbers and the fix (a smaller batch, ``names_filter``, offloading the cache to the CPU).

- :func:`estimate_cache` predicts, exactly, the bytes ``model.run_with_cache`` will hold for a batch: it runs
  the model on 1, 2 and 3 tokens and fits each hook's size as ``a + b·T + c·T²`` (attention patterns are the
  ``T²`` terms), so it is right for any architecture, hook set and dtype.
- :func:`run_with_cache` is ``model.run_with_cache`` guarded by that prediction.
- :func:`check_fits` is the guard itself, used by factlens's own sweeps and by the trainer.
- :func:`memory_usage` reads the process's resident and peak memory (and CUDA's); long loops show it in
  their progress bars and training writes it to ``metrics.jsonl``.

The budget is the memory free on the device (``MemAvailable`` and the cgroup limits, page cache counted as
free, on the CPU; ``cudaMemGetInfo`` plus the caching allocator's free blocks on a GPU), times a safety ``fraction``; set
``FACTLENS_MEMORY_BUDGET`` (e.g. ``8GiB``) or :func:`set_memory_budget` to impose a smaller one.

Example:
    >>> import factlens
    >>> from factlens.resources import estimate_cache
    >>> from factlens import run_with_cache
    >>> model = factlens.tiny("gpt2")
    >>> est = estimate_cache(model, batch=8, seq_len=32, names_filter=lambda n: n.endswith("hook_pattern"))
    >>> est.total == 8 * 2 * 4 * 32 * 32 * 4      # batch × layers × heads × T × T × fp32 bytes
    True
    >>> _, cache = run_with_cache(model, model.to_tokens("The capital of France is"),
    ...                           names_filter=lambda n: n.endswith("hook_pattern"))
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from factlens.errors import ConfigError, ResourceError
from factlens.progress import tqdm

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

NamesFilter = Callable[[str], bool] | str | list[str] | None

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


# ------------------------------------------------------------------------------------------------ the cache
@dataclass
class CacheEstimate:
    """Predicted bytes of ``run_with_cache`` per hook for ``batch`` sequences of ``seq_len`` tokens.

    Attributes:
        per_hook: Hook name → bytes.
        batch / seq_len: The input size the estimate is for.
        per_sequence: Bytes one more sequence of ``seq_len`` tokens adds (for :meth:`max_batch`).
    """

    per_hook: dict[str, int]
    batch: int
    seq_len: int
    per_sequence: int = field(default=0)
    flattened: tuple[str, ...] = ()  # hooks fired as [batch·pos, ...] (OPT's ln2): pos_slice needs a reshape

    @property
    def total(self) -> int:
        return sum(self.per_hook.values())

    def max_batch(self, budget: int) -> int:
        """The largest batch of ``seq_len``-token sequences whose cache fits in ``budget`` bytes."""
        return int(budget // max(1, self.per_sequence))

    def largest(self, k: int = 3) -> list[tuple[str, int]]:
        """The ``k`` hook *kinds* (``hook_pattern``, ``hook_z``...) holding the most bytes, summed over layers."""
        kinds: dict[str, int] = {}
        for name, nbytes in self.per_hook.items():
            kind = ".".join(name.split(".")[2:]) if name.startswith("blocks.") else name
            kinds[kind] = kinds.get(kind, 0) + nbytes
        return sorted(kinds.items(), key=lambda kv: -kv[1])[:k]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per hook: ``hook``, ``bytes``, ``share``."""
        import pandas as pd

        total = max(1, self.total)
        return pd.DataFrame([{"hook": name, "bytes": b, "share": b / total} for name, b in self.per_hook.items()])


def _tensor_bytes(cache) -> dict[str, int]:
    """Bytes per entry of a cache (or any name → tensor mapping); a storage shared by several names (TL's
    hook aliases) counts once, under the first name."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, value in cache.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.untyped_storage().data_ptr(), value.numel())
        out[name] = 0 if key in seen else value.numel() * value.element_size()
        seen.add(key)
    return out


def cache_nbytes(cache) -> int:
    """Bytes a real ``ActivationCache`` (or dict of tensors) holds, shared storage counted once.

    Example:
        >>> import torch, factlens
        >>> from factlens.resources import cache_nbytes, estimate_cache
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> tokens = model.to_tokens("The capital of France is")
        >>> _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        >>> cache_nbytes(cache) == estimate_cache(model, 1, tokens.shape[1], lambda n: n.endswith("hook_pattern")).total
        True
    """
    return sum(_tensor_bytes(cache).values())


def _raw_bytes(cache) -> dict[str, tuple[int, int]]:
    """``name -> (bytes, ndim)`` of every tensor in a cache, shared storage counted for every name."""
    return {name: (v.numel() * v.element_size(), v.ndim) for name, v in cache.items() if isinstance(v, torch.Tensor)}


def pos_slice_indices(pos_slice, seq_len: int) -> list[int] | None:
    """The positions TransformerLens keeps for ``pos_slice`` on ``seq_len`` tokens (``None``: no slicing).

    Accepts what ``run_with_cache(pos_slice=...)`` does: an int, a ``slice``, a list / array / tensor of
    positions, or a ``transformer_lens.utilities.Slice``.

    Example:
        >>> from factlens.resources import pos_slice_indices
        >>> pos_slice_indices(-1, 6), pos_slice_indices(slice(0, 4, 2), 6)
        ([-1], [0, 2])
    """
    if pos_slice is None:
        return None
    from transformer_lens.utilities.slice import Slice

    range_hint = f"use 0..{seq_len - 1} or -{seq_len}..-1"
    try:
        sl = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        idx = [int(i) for i in sl.indices(seq_len).reshape(-1).tolist()]
    except IndexError:
        raise ConfigError(f"pos_slice={pos_slice!r} selects positions outside a sequence of {seq_len} tokens; "
                          f"{range_hint}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pos_slice={pos_slice!r} is not a position selection ({err}); pass an int such as -1, "
                          "a slice such as slice(-3, None) or a list of positions") from None
    bad = [i for i in idx if not -seq_len <= i < seq_len]
    if bad:
        raise ConfigError(f"pos_slice selects position(s) {bad} of a sequence of {seq_len} tokens; {range_hint}")
    return idx


def estimate_cache(model: TransformerBridge, batch: int, seq_len: int, names_filter: NamesFilter = None, *,
                   device: str | torch.device | None = None, pos_slice=None) -> CacheEstimate:
    """Predict the bytes ``model.run_with_cache`` holds for ``batch`` × ``seq_len`` tokens.

    Runs the model on 1, 2 and 3 tokens (batch 1), measures every cached tensor (shared storage counted
    once, so TL's hook aliases are not double-counted) and extrapolates each hook as ``a + b·T + c·T²``.

    Args:
        model: A TransformerLens bridge (or ``HookedTransformer``).
        batch: Sequences per forward pass.
        seq_len: Tokens per sequence.
        names_filter: As for ``run_with_cache``.
        device: Where the cache will be stored (``run_with_cache(device=...)``); affects nothing but dtype.
        pos_slice: As for :func:`run_with_cache`: each hook keeps only the selected positions (query positions
            of patterns and scores), as a copy per hook name (TL's aliases then no longer share storage).

    Example:
        >>> import factlens
        >>> from factlens.resources import estimate_cache
        >>> model = factlens.tiny("gpt2")
        >>> full = estimate_cache(model, 4, 64)
        >>> last = estimate_cache(model, 4, 64, pos_slice=-1)
        >>> last.total < full.total / 30
        True
    """
    if batch < 1 or seq_len < 1:
        raise ConfigError(f"batch={batch}, seq_len={seq_len}; both must be >= 1")
    kept = pos_slice_indices(pos_slice, seq_len)
    sizes: list[dict[str, int]] = []
    raw: list[dict[str, tuple[int, int]]] = []
    lead: list[dict[str, int]] = []  # each hook's leading size at batch 1
    was_training = model.training
    model.eval()
    try:
        for t in (1, 2, 3):
            tokens = torch.zeros(1, t, dtype=torch.long, device=model.cfg.device)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TL's notes on gated-off hooks: the real call prints them
                _, cache = model.run_with_cache(tokens, names_filter=names_filter)
            sizes.append(_tensor_bytes(cache))
            raw.append(_raw_bytes(cache))
            lead.append({k: v.shape[0] for k, v in cache.items() if isinstance(v, torch.Tensor) and v.ndim})
            del cache
    finally:
        model.train(was_training)
    per_hook, per_seq = {}, 0
    for name in sizes[0]:
        if kept is None:
            n1, n2, n3 = (s.get(name, 0) for s in sizes)
            scale = 1.0
        else:  # every name holds its own copy of the kept positions
            n1, n2, n3 = (r.get(name, (0, 0))[0] for r in raw)
            scale = len(kept) / seq_len if raw[0][name][1] >= 2 else 1.0
        c = (n3 - 2 * n2 + n1) / 2  # T² coefficient (attention patterns and scores)
        b = n2 - n1 - 3 * c
        a = n1 - b - c
        one = max(0.0, a + b * seq_len + c * seq_len**2) * scale
        per_hook[name] = round(batch * one)
        per_seq += round(one)
    flat = tuple(name for name in sizes[0] if [d.get(name) for d in lead] == [1, 2, 3])
    if kept is not None:  # which names hold a copy of their own once sliced (in compatibility mode TL's
        # aliases still share one sliced tensor): one sliced probe, the same call as run_with_cache's
        tokens = torch.zeros(1, 3, dtype=torch.long, device=model.cfg.device)
        try:
            model.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, probe = _run_sliced(model, tokens, names_filter, [2], flat, {})
        finally:
            model.train(was_training)
        shared = {name for name, nbytes in _tensor_bytes(probe).items() if nbytes == 0}
        del probe
        for name in shared & set(per_hook):
            per_seq -= round(per_hook[name] / batch)
            per_hook[name] = 0
    return CacheEstimate(per_hook=per_hook, batch=batch, seq_len=seq_len, per_sequence=per_seq, flattened=flat)


def run_with_cache(model: TransformerBridge, tokens, *, names_filter: NamesFilter = None, budget: int | str | None = None,
                   pos_slice=None, **kwargs):
    """``model.run_with_cache`` that refuses, with the fix, a cache that will not fit in memory.

    Args:
        model: A TransformerLens bridge.
        tokens: ``[batch, pos]`` token ids, or text (tokenized with ``model.to_tokens``).
        names_filter: As for ``run_with_cache``; the first fix to suggest when the cache is too big.
        budget: Bytes (or ``'8GiB'``) to allow; default :func:`budget_bytes` on the cache's device.
        pos_slice: Keep only these positions of every hook (an int, a slice, a list; query positions of
            patterns); the prediction counts only what is kept. A slice is passed to TL as the list of its
            positions, so the cache holds copies of the kept positions rather than views of the whole tensors.
        **kwargs: Passed on (``device=`` offloads the cache, e.g. to the CPU).

    Raises:
        ResourceError: The predicted cache exceeds the budget.

    Example:
        >>> import factlens
        >>> from factlens import run_with_cache
        >>> model = factlens.tiny("gpt2")
        >>> logits, cache = run_with_cache(model, model.to_tokens("Hello there"),
        ...                                names_filter=lambda n: n.endswith("hook_z"))
        >>> sorted(cache.keys())[:1]
        ['blocks.0.attn.hook_z']
    """
    from factlens.hooks import check_names_filter

    check_names_filter(model, names_filter)
    if isinstance(tokens, str | list):
        tokens = model.to_tokens(tokens)
    batch, seq_len = tokens.shape[0], tokens.shape[-1]
    kept = pos_slice_indices(pos_slice, seq_len)
    est = estimate_cache(model, batch, seq_len, names_filter, pos_slice=kept)
    cache_device = kwargs.get("device") or model.cfg.device
    allowed, source = _allowance(cache_device, budget, 0.9)
    if est.total > allowed:
        fixes = []
        if names_filter is None:
            kind, nbytes = est.largest(1)[0]
            fixes.append(f"pass names_filter to cache only the hooks you need (all {len(est.per_hook)} hooks are "
                         f"cached now; {kind} alone is {format_bytes(nbytes)})")
        fits = est.max_batch(allowed)
        fixes.append(f"use batches of at most {fits} sequences" if fits >= 1 else
                     f"shorten the sequences (one of {seq_len} tokens needs {format_bytes(est.per_sequence)})")
        if torch.device(cache_device).type == "cuda":
            fixes.append("offload the cache to the CPU with device='cpu'")
        if kept is None:
            fixes.append("or keep only what you need with pos_slice= (e.g. pos_slice=-1, the last position)")
        what = f"caching {len(est.per_hook)} hooks for {batch} × {seq_len} tokens"
        what += f" at {len(kept)} position(s)" if kept is not None else ""
        _refuse(est.total, allowed, source, what, fixes)
    if kept is None:
        return model.run_with_cache(tokens, names_filter=names_filter, **kwargs)
    return _run_sliced(model, tokens, names_filter, kept, est.flattened, kwargs)


def _run_sliced(model, tokens, names_filter: NamesFilter, kept: list[int], flattened: tuple[str, ...], kwargs):
    """``run_with_cache(pos_slice=kept)``, with hooks fired as ``[batch·pos, ...]`` (OPT's ``ln2``) unflattened
    before slicing (TL would slice their feature axis); they are cached as ``[batch, len(kept), ...]``."""
    if not flattened:
        return model.run_with_cache(tokens, names_filter=names_filter, pos_slice=kept, **kwargs)
    match = model._normalize_names_filter(names_filter) if hasattr(model, "_normalize_names_filter") else \
        (lambda n: True)
    batch, seq_len = tokens.shape[0], tokens.shape[-1]
    own = [name for name in flattened if match(name)]
    store: dict[str, torch.Tensor] = {}
    device = kwargs.get("device")

    def save(t: torch.Tensor, hook, name: str) -> None:
        store[name] = t.detach().reshape(batch, seq_len, *t.shape[1:])[:, kept].to(device).clone()

    fwd = [(name, lambda t, hook, name=name: save(t, hook, name)) for name in own]
    with model.hooks(fwd_hooks=fwd), warnings.catch_warnings():
        if names_filter is None:  # the filter below is ours: TL's note on gated-off hooks is not for the user
            warnings.filterwarnings("ignore", message="run_with_cache: skipped")
        out, cache = model.run_with_cache(tokens, names_filter=lambda n: match(n) and n not in own,
                                          pos_slice=kept, **kwargs)
    target = getattr(cache, "cache_dict", cache)
    target.update(store)
    return out, cache


__all__ = ["CacheEstimate", "MemoryUsage", "available_bytes", "budget_bytes", "cache_nbytes", "check_fits",
           "estimate_cache", "format_bytes", "memory_usage", "parse_bytes", "pos_slice_indices", "run_with_cache", "saved_tensor_bytes",
           "set_memory_budget", "track"]
