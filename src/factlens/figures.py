"""Figures that survive: plotly.js embedded in notebooks (so saved and ``nbconvert --to html`` notebooks keep
their figures, offline too), and PNG export that either works or says exactly what is missing.

PNG export goes through kaleido (the ``png`` extra: ``pip install "factlens[png]"``), which drives a Chrome or
Chromium browser: on Debian/Ubuntu ``apt-get install chromium``; elsewhere an installed Chrome, or
``plotly_get_chrome`` (which downloads one). :func:`png_support` says which part is missing, and
:func:`write_png` raises :class:`~factlens.errors.MissingDependencyError` with that sentence instead of kaleido's.

Example:
    >>> import plotly.graph_objects as go
    >>> from factlens.figures import notebook_renderer, png_support
    >>> ok, why = png_support()
    >>> isinstance(ok, bool) and isinstance(why, str)
    True
    >>> import plotly.io as pio
    >>> before = pio.renderers.default
    >>> notebook_renderer()
    'plotly_mimetype+notebook'
    >>> pio.renderers.default = before
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

from factlens.errors import MissingDependencyError

NOTEBOOK_RENDERER = "plotly_mimetype+notebook"
"""plotly's mimetype (JupyterLab's interactive view) plus its ``notebook`` renderer (an HTML output carrying
plotly.js, which ``nbconvert --to html`` keeps and which needs no network, unlike ``notebook_connected``)."""

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def notebook_renderer() -> str:
    """Make ``fig.show()`` in Jupyter write figures that survive saving and HTML export; returns the renderer."""
    import plotly.io as pio

    pio.renderers.default = NOTEBOOK_RENDERER
    return pio.renderers.default


@functools.cache
def png_support() -> tuple[bool, str]:
    """(whether PNG export works here, a sentence saying why not or which browser it uses)."""
    if importlib.util.find_spec("kaleido") is None:
        return False, ('PNG export needs kaleido: pip install "factlens[png]" (and a Chrome or Chromium browser, '
                       "e.g. apt-get install chromium)")
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    try:
        import plotly.graph_objects as go

        go.Figure(go.Bar(y=[1])).to_image(format="png", width=20, height=20)
    except Exception as err:  # kaleido's own errors: no Chrome found, a browser that does not start
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"the browser at {browser} did not start ({first})" if browser else "no Chrome or Chromium was found"
        return False, (f"PNG export needs a Chrome or Chromium browser for kaleido: {where}. Install one (Debian/"
                       "Ubuntu: apt-get install chromium; or run plotly_get_chrome where there is a network), or "
                       "use the HTML figures")
    return True, f"PNG export through kaleido{f' and {browser}' if browser else ''}"


def write_png(fig, path: str | Path, **kwargs) -> Path:
    """Write ``fig`` as a PNG, atomically (kwargs go to ``fig.to_image``: width, height, scale); raises
    :class:`~factlens.errors.MissingDependencyError` naming what to install when this machine cannot."""
    ok, why = png_support()
    if not ok:
        raise MissingDependencyError(why)
    from factlens.storage import atomic_write

    return atomic_write(path, fig.to_image(format="png", **kwargs))


__all__ = ["NOTEBOOK_RENDERER", "notebook_renderer", "png_support", "write_png"]
