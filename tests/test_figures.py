"""PNG export works where a browser is installed and says exactly what is missing where it is not; notebook
figures carry plotly.js."""

from __future__ import annotations

import importlib.util

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from factlens import figures
from factlens.errors import MissingDependencyError


@pytest.fixture
def fresh_support():
    figures.png_support.cache_clear()
    yield
    figures.png_support.cache_clear()


def test_write_png_writes_a_png_or_names_the_fix(tmp_path, fresh_support):
    fig = go.Figure(go.Scatter(y=[1, 3, 2]))
    ok, why = figures.png_support()
    if ok:
        path = figures.write_png(fig, tmp_path / "fig.png", width=200, height=150)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        with pytest.raises(MissingDependencyError, match=r"chromium|factlens\[png\]"):
            figures.write_png(fig, tmp_path / "fig.png")
        assert not (tmp_path / "fig.png").exists() and len(why) < 400


def test_without_kaleido_the_message_names_the_extra(monkeypatch, fresh_support, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kaleido" else real(name, *a))
    ok, why = figures.png_support()
    assert not ok and 'pip install "factlens[png]"' in why
    with pytest.raises(MissingDependencyError, match=r"factlens\[png\]"):
        figures.write_png(go.Figure(), tmp_path / "x.png")


def test_without_a_browser_the_message_names_one(monkeypatch, fresh_support):
    if importlib.util.find_spec("kaleido") is None:
        pytest.skip("kaleido is not installed (the previous test covers that case)")

    def no_browser(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore lines")

    monkeypatch.setattr(go.Figure, "to_image", no_browser)
    monkeypatch.setattr(figures.shutil, "which", lambda name: None)
    ok, why = figures.png_support()
    assert not ok and "apt-get install chromium" in why and "no Chrome or Chromium was found" in why
    assert "more lines" not in why


def test_notebook_renderer_embeds_plotlyjs():
    before = pio.renderers.default
    try:
        figures.notebook_renderer()
        bundle = pio._renderers.renderers._build_mime_bundle(go.Figure(go.Bar(y=[1])).to_dict())
        assert "application/vnd.plotly.v1+json" in bundle and "text/html" in bundle
        assert "cdn.plot.ly" not in bundle["text/html"]  # offline: no network script
    finally:
        pio.renderers.default = before
