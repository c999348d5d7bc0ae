"""The progress bar every factlens loop uses: a widget in Jupyter when ipywidgets is installed, text otherwise.

``tqdm.auto`` in a Jupyter kernel without ipywidgets prints ``TqdmWarning: IProgress not found`` and then draws
its bars as red stderr text. factlens picks ``tqdm.auto`` (widgets in a notebook, text in a terminal) only where
ipywidgets can be imported, and plain ``tqdm`` otherwise, so no kernel ever shows that warning. Install the
``notebook`` extra (``pip install "factlens[notebook]"``) for widget bars.

Example:
    >>> from factlens.progress import tqdm
    >>> sum(tqdm(range(3), disable=True))
    3
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:  # pragma: no cover - depends on the environment
    from tqdm.std import tqdm

WIDGETS = importlib.util.find_spec("ipywidgets") is not None
"""Whether bars become Jupyter widgets inside a kernel."""

__all__ = ["WIDGETS", "tqdm"]
