"""Layer, head and position indices: one validator for every index a user passes to factlens.

Every factlens function that takes a layer, a head or a position reads it through this module, so the rules
are the same everywhere:

- an index is an ``int`` (a Python, numpy or 0-d integer tensor value); ``-1`` counts from the end, as in
  Python, down to ``-n``; anything outside ``-n..n-1`` is a :class:`~factlens.errors.ConfigError` that names
  the valid range. Nothing wraps around: ``99`` on 5 tokens is an error, never position 4.
- a float (``1.0``), a bool (``True``), a string or a boolean mask is refused with the fix: booleans are
  ints to Python, and ``heads=True`` or a mask silently meaning head 1 is exactly the bug this prevents.
- a list, tuple, range or 1-d integer tensor is several indices; an index given twice is refused.
- **positions** are either the same for every prompt (an int or a list) or one per prompt: a 1-d tensor of
  shape ``[batch]`` (e.g. ``dataset.end`` for right-padded batches). A per-prompt tensor whose length is not
  the batch is refused, so a 2-element tensor on a batch of 3 is an error, not "two positions each".

Example:
    >>> import torch
    >>> from factlens.indices import layer_indices, head_indices, position_indices
    >>> layer_indices(12, -1), layer_indices(12, [0, 5]), head_indices(4, None)
    ([11], [0, 5], None)
    >>> rows, pos = position_indices(torch.tensor([4, 2]), batch=2, seq=5)
    >>> rows.tolist(), pos.tolist()
    ([0, 1], [4, 2])
    >>> layer_indices(2, 5)
    Traceback (most recent call last):
    ...
    factlens.errors.ConfigError: layer 5 is out of range for a model with 2 layers; use 0..1, or -2..-1 to count from the end.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from factlens.errors import ConfigError

Index = numbers.Integral | Sequence[numbers.Integral] | torch.Tensor | None  # numpy integers included


def _kind_error(value, what: str) -> ConfigError:
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return ConfigError(
            f"{what} {value!r} is a boolean, not an index; pass integers such as [0, 2] (for a boolean mask m: "
            "torch.nonzero(m).flatten().tolist())")
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return ConfigError(f"{what} {value!r} is not an integer; pass an int (e.g. 1, or int(x) for a whole float)")
    return ConfigError(f"{what} {value!r} of type {type(value).__name__} is not an index; pass an int, a list "
                       "of ints or a 1-d integer tensor")


def as_int(value, what: str) -> int:
    """``value`` as an ``int``; :class:`ConfigError` for floats, bools, strings and non-scalar tensors."""
    if isinstance(value, bool):
        raise _kind_error(value, what)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool and not value.is_complex():
        return int(value)
    raise _kind_error(value, what)


def _items(value, what: str) -> list[int]:
    """Flatten an int / list / tuple / range / 1-d tensor into ints (kinds checked, ranges not yet)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise _kind_error(value, what)
        if value.ndim > 1:
            raise ConfigError(f"{what} has shape {tuple(value.shape)}; pass an int, a list or a 1-d tensor")
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | range):
        return [as_int(value, what)]
    return [as_int(v, what) for v in value]


def check_index(index, n: int, what: str, unit: str) -> int:
    """One index in ``-n..n-1`` → ``0..n-1`` (no wrap-around). ``unit`` names the axis for the message.

    Example:
        >>> from factlens.indices import check_index
        >>> check_index(-1, 4, "head", "heads per layer")
        3
    """
    i = as_int(index, what)
    if not -n <= i < n:
        raise ConfigError(_range_message(what, [i], n, unit))
    return i + n if i < 0 else i


def _range_message(what: str, bad: list[int], n: int, unit: str) -> str:
    shown = bad[0] if len(bad) == 1 else bad
    if n == 0:
        return f"{what} {shown} is out of range: there are no {unit}"
    return (f"{what} {shown} is out of range for a model with {n} {unit}; use 0..{n - 1}, or -{n}..-1 to count "
            "from the end.")


def indices(value, n: int, what: str, unit: str, *, unique: bool = True) -> list[int]:
    """Several indices in ``-n..n-1`` → a list in ``0..n-1``; duplicates refused unless ``unique=False``."""
    items = _items(value, what)
    bad = [i for i in items if not -n <= i < n]
    if bad:
        raise ConfigError(_range_message(what, bad, n, unit))
    out = [i + n if i < 0 else i for i in items]
    if unique and len(set(out)) != len(out):
        dup = sorted({i for i in out if out.count(i) > 1})
        raise ConfigError(f"{what} {items} names {what} {dup} more than once (negative indices count from the "
                          f"end); pass each {what} once")
    return out


def layer_indices(n_layers: int, layers: Index) -> list[int]:
    """Layer indices (``None`` = every layer; ``-1`` = the last)."""
    if layers is None:
        return list(range(n_layers))
    return indices(layers, n_layers, "layer", "layers")


def head_indices(n_heads: int, heads: Index) -> list[int] | None:
    """Head indices, or ``None`` for every head (``[]`` = no head: the identity)."""
    if heads is None:
        return None
    return indices(heads, n_heads, "head", "heads per layer")


def position_indices(positions: Index, batch: int, seq: int,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors ``(rows, pos)`` selecting the edited positions of a ``[batch, seq, ...]`` tensor.

    Args:
        positions: ``None`` (every position), an int or a list (the same positions in every prompt), or a 1-d
            integer tensor of length ``batch`` (one position per prompt).
        batch, seq: The shape being indexed. During cached generation ``seq`` is 1 (the new token), so only
            ``-1``/``0`` fit there.
        device: Where the index tensors go.

    Raises:
        ConfigError: A position outside ``-seq..seq-1``, a per-prompt tensor whose length is not ``batch``,
            or a non-integer position.
    """
    if positions is None:
        rows = torch.arange(batch, device=device).repeat_interleave(seq)
        return rows, torch.arange(seq, device=device).repeat(batch)
    if isinstance(positions, torch.Tensor) and positions.ndim == 1:
        items = _items(positions, "positions")
        if len(items) != batch:
            raise ConfigError(
                f"positions is a tensor of {len(items)} per-prompt positions but the batch has {batch} prompts; "
                f"pass one position per prompt (shape [{batch}]), or a list such as {items[:3]} for the same "
                "positions in every prompt")
        _check_positions(items, seq)
        pos = torch.tensor([p + seq if p < 0 else p for p in items], dtype=torch.long, device=device)
        return torch.arange(batch, device=device), pos
    items = _items(positions, "positions")
    _check_positions(items, seq)
    items = [p + seq if p < 0 else p for p in items]
    if len(set(items)) != len(items):
        raise ConfigError(f"positions {list(positions)} name a position more than once (negative positions count "
                          "from the end); pass each position once")
    pos = torch.tensor(items, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device).repeat_interleave(len(items))
    return rows, pos.repeat(batch)


def _check_positions(items: list[int], seq: int) -> None:
    bad = [p for p in items if not -seq <= p < seq]
    if bad:
        hint = (" (during cached generation each step sees only the new token: use positions=-1)"
                if seq == 1 else "")
        raise ConfigError(f"position(s) {bad} out of range for a sequence of {seq} tokens; use 0..{seq - 1}, or "
                          f"-{seq}..-1 to count from the end{hint}")


__all__ = ["as_int", "check_index", "head_indices", "indices", "layer_indices", "position_indices"]
