"""The activation cache: predict its size exactly, and ``run_with_cache`` guarded by that prediction.

- :func:`estimate_cache` predicts, exactly, the bytes ``model.run_with_cache`` will hold for a batch: it runs
  the model on 1, 2 and 3 tokens and fits each hook's size as ``a + b·T + c·T²`` (attention patterns are the
  ``T²`` terms), so it is right for any architecture, hook set and dtype.
- :func:`run_with_cache` is ``model.run_with_cache`` guarded by that prediction: a cache that will not fit in
  the memory budget (:mod:`factlens.resources`) raises :class:`~factlens.errors.ResourceError` naming the fix
  (``names_filter``, a smaller batch, ``pos_slice``, offloading to the CPU) before anything is allocated.
- :func:`cache_nbytes` measures a real cache; :func:`pos_slice_indices` reads a ``pos_slice`` as
  TransformerLens does.

Example:
    >>> import factlens
    >>> from factlens.cache import estimate_cache, run_with_cache
    >>> model = factlens.tiny("gpt2")
    >>> est = estimate_cache(model, batch=8, seq_len=32, names_filter=lambda n: n.endswith("hook_pattern"))
    >>> est.total == 8 * 2 * 4 * 32 * 32 * 4      # batch × layers × heads × T × T × fp32 bytes
    True
    >>> _, cache = run_with_cache(model, model.to_tokens("The capital of France is"),
    ...                           names_filter=lambda n: n.endswith("hook_pattern"))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from factlens.errors import ConfigError
from factlens.hooks import check_names_filter
from factlens.resources import _allowance, _refuse, format_bytes

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens.model_bridge import TransformerBridge

NamesFilter = Callable[[str], bool] | str | list[str] | None


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
        >>> from factlens.cache import cache_nbytes, estimate_cache
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
        >>> from factlens.cache import pos_slice_indices
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
        >>> from factlens.cache import estimate_cache
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
        budget: Bytes (or ``'8GiB'``) to allow; default :func:`~factlens.resources.budget_bytes` on the cache's device.
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


__all__ = ["CacheEstimate", "cache_nbytes", "estimate_cache", "pos_slice_indices", "run_with_cache"]
