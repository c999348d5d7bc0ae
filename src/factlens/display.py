"""Notebook display for result objects: a concise ``__repr__`` and a ``_repr_html_`` table of the top rows.

Every factlens result inherits :class:`ResultDisplay`. Typing a result in a notebook then shows its class, the
shape of each tensor and table it holds and, in Jupyter, a small HTML table of its first rows (its ``top()``
rows where it has one, else ``to_dataframe().head()``), numbers to 4 significant digits, instead of printing
whole tensors.

Example:
    >>> import torch
    >>> from dataclasses import dataclass
    >>> from factlens.display import ResultDisplay
    >>> @dataclass
    ... class Scores(ResultDisplay):
    ...     values: torch.Tensor
    ...     label: str = "demo"
    ...     def to_dataframe(self):
    ...         import pandas as pd
    ...         return pd.DataFrame({"i": range(len(self.values)), "value": self.values.tolist()})
    >>> Scores(torch.arange(1000.0))
    Scores(values=Tensor[1000] float32, label='demo')
    >>> "<table" in Scores(torch.arange(1000.0))._repr_html_()
    True
    >>> print(Scores(torch.arange(3.0)))
    Scores(values=Tensor[3] float32, label='demo')
     i  value
     0      0
     1      1
     2      2
"""

from __future__ import annotations

import dataclasses
import html
import math
import numbers
from pathlib import Path
from typing import Any, ClassVar

import torch

MAX_ROWS = 8
"""Rows shown by ``_repr_html_``."""
MAX_PRINT_ROWS = 40
"""Rows shown by ``print(result)``."""


def fmt(value: Any, digits: int = 4) -> str:
    """A number to ``digits`` significant digits (``0.0001234`` → ``'0.0001234'``, never ``'0.0000'``).

    Example:
        >>> from factlens.display import fmt
        >>> fmt(0.00012346), fmt(25.93), fmt(3), fmt(1.5e-9), fmt(19552.7), fmt(float("nan"))
        ('0.0001235', '25.93', '3', '1.5e-09', '19,553', 'nan')
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if 1e4 <= abs(value) < 1e15:  # ranks, token counts: whole numbers read better than 1.955e+04
        return f"{round(value):,}"
    return f"{value:.{digits}g}"


def describe(value: Any, limit: int = 40) -> str:
    """A short description of a field value: shapes for tensors/arrays/tables, lengths for containers.

    Example:
        >>> import torch
        >>> from factlens.display import describe
        >>> describe(torch.zeros(3, 4, dtype=torch.int64)), describe([1, 2, 3]), describe(0.123456)
        ('Tensor[3, 4] int64', '[1, 2, 3]', '0.1235')
    """
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return fmt(value)
        return f"Tensor[{', '.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')}"
    kind = type(value).__name__
    if kind == "ndarray":
        return f"ndarray[{', '.join(map(str, value.shape))}] {value.dtype}"
    if kind == "DataFrame":
        return f"DataFrame[{value.shape[0]} rows × {value.shape[1]} cols]"
    if kind == "Series":
        return f"Series[{len(value)}]"
    if isinstance(value, numbers.Number) or value is None:
        return fmt(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        return repr(text if len(text) <= limit else text[: limit - 1] + "…")
    if isinstance(value, dict):
        keys = list(value)
        shown = ", ".join(map(str, keys[:4])) + (", …" if len(keys) > 4 else "")
        return f"{{{shown}}}" if len(shown) <= limit else f"{{{len(keys)} keys}}"
    if isinstance(value, (list, tuple)):
        if len(value) <= 4 and all(isinstance(v, (numbers.Number, str)) for v in value):
            text = ", ".join(fmt(v) if isinstance(v, numbers.Number) else repr(v) for v in value)
            if len(text) <= limit:
                return f"({text})" if isinstance(value, tuple) else f"[{text}]"
        return f"[{len(value)} items]"
    if hasattr(value, "__len__"):
        try:
            return f"{kind}({len(value)})"
        except TypeError:
            pass
    return kind


class ResultDisplay:
    """Mixin giving a dataclass result a concise ``__repr__`` and a notebook ``_repr_html_``.

    Subclassing is the whole change (``class LogitLensResult(ResultDisplay):``): the mixin installs its
    ``__repr__`` on each subclass before ``@dataclass`` runs, so the dataclass keeps it. Override
    :meth:`_display_frame` to choose the rows shown; ``_display_skip`` names fields left out of the repr.
    """

    _display_skip: ClassVar[tuple[str, ...]] = ("axis_names",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:  # else @dataclass would write its field-by-field repr
            cls.__repr__ = ResultDisplay.__repr__

    def _display_fields(self) -> list[tuple[str, Any]]:
        names = ([f.name for f in dataclasses.fields(self) if f.repr] if dataclasses.is_dataclass(self)
                 else [k for k in vars(self) if not k.startswith("_")])
        return [(n, getattr(self, n)) for n in names if n not in self._display_skip]

    def __repr__(self) -> str:
        parts = [f"{name}={describe(value)}" for name, value in self._display_fields()]
        one_line = f"{type(self).__name__}({', '.join(parts)})"
        if len(one_line) <= 110:
            return one_line
        return f"{type(self).__name__}(\n" + "".join(f"    {p},\n" for p in parts) + ")"

    def __str__(self) -> str:
        """What ``print(result)`` shows: the concise repr, then the result's table (up to :data:`MAX_PRINT_ROWS`
        rows of ``to_dataframe()``, numbers to 4 significant digits)."""
        head = repr(self)
        to_df = getattr(self, "to_dataframe", None)
        try:
            frame = to_df() if callable(to_df) else self._display_frame()
        except Exception:  # printing must never raise
            return head
        if frame is None or not len(frame.columns):
            return head
        more = f"\n... {len(frame) - MAX_PRINT_ROWS} more rows (to_dataframe())" if len(frame) > MAX_PRINT_ROWS else ""
        text = frame.head(MAX_PRINT_ROWS).to_string(index=False, float_format=fmt, max_colwidth=40)
        return f"{head}\n{text}{more}"

    def _display_frame(self, n: int = MAX_ROWS):
        """The rows ``_repr_html_`` shows: ``top(n)`` where the result ranks rows, else ``to_dataframe().head(n)``."""
        top = getattr(self, "top", None)
        if callable(top):
            try:
                return top(n)
            except TypeError:
                pass
        to_df = getattr(self, "to_dataframe", None)
        return to_df().head(n) if callable(to_df) else None

    def _repr_html_(self) -> str:
        fields = "".join(f"<li><code>{html.escape(name)}</code>: {html.escape(describe(value))}</li>"
                         for name, value in self._display_fields())
        try:
            frame = self._display_frame(MAX_ROWS)
        except Exception as err:  # a display must never raise in a notebook
            frame, note = None, f"<p><i>no table: {html.escape(type(err).__name__)}: {html.escape(str(err))}</i></p>"
        else:
            note = ""
        table = ""
        if frame is not None and len(frame.columns):
            table = frame.head(MAX_ROWS).to_html(index=False, border=0, float_format=fmt, max_cols=12,
                                                 classes="factlens-table")
        return (f"<div class='factlens-result'><b>{html.escape(type(self).__name__)}</b>"
                f"<ul style='margin:2px 0 6px 0'>{fields}</ul>{table}{note}</div>")


__all__ = ["MAX_PRINT_ROWS", "MAX_ROWS", "ResultDisplay", "describe", "fmt"]
