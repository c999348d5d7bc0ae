"""The capitals report: one self-contained HTML page a person reads (figures inline, explanations, metadata)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import factlens
from factlens.recall.mitigation import _paper_model
from factlens.recall.report import analyze
from factlens.recall.report_html import render_html


@pytest.fixture(scope="module")
def report():
    return analyze(factlens.tiny("gpt2", seed=1), n=48, folds=2, progress=False)


def _text(page: str) -> str:
    """The page without its scripts (plotly.js and the figures' data)."""
    return re.sub(r"<script.*?</script>", "", page, flags=re.S)


def test_one_self_contained_page(report, tmp_path):
    files = report.save(tmp_path)
    page_path = tmp_path / "report.html"
    assert page_path in files and page_path.exists()
    assert sorted(p.name for p in tmp_path.glob("*.html")) == ["report.html"]  # no separate figure pages
    page = page_path.read_text()
    n_figures = page.count('class="figure"')
    assert n_figures >= 4
    assert page.count("Plotly.newPlot") == n_figures
    assert page.count("plotly.js v") == 1  # the library is inlined exactly once: the page opens offline
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched from a CDN or a sibling file
    text = _text(page)
    for section in ("Logit lens", "Path patching", "Mover heads", "MLP-output decomposition", "last layer",
                    "mitigations"):
        assert section in text
    assert text.count("What it shows.") == text.count("How to read it.") >= 6
    for csv in ("mitigation.csv", "path_patching.csv"):
        assert f'href="{csv}"' in text and (tmp_path / csv).exists()


def test_metadata_on_the_page(report):
    text = _text(render_html(report))
    import transformer_lens

    assert "tiny-gpt2" in text and "0-shot" in text and f"{len(report.dataset)} prompts" in text
    assert "compatibility mode" in text and "LayerNorm folded" in text
    assert f"torch {torch.__version__}" in text and "TransformerLens" in text
    assert re.search(r"TransformerLens \d", text)
    assert transformer_lens is not None
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", text)  # the date


def test_twin_banner_and_no_paper_markers(report):
    page = render_html(report)
    text = _text(page)
    assert "Random weights." in text and "RANDOM" in text
    assert "Lv et al. (paper)" not in page and "15.5%" not in text
    # even a table carrying the paper's values is drawn without them beside a twin
    rows = report.mitigation.rows.assign(paper_prob=[0.1551, None, None, 0.2593])
    with_paper = dataclasses.replace(report, mitigation=dataclasses.replace(report.mitigation, rows=rows))
    assert "Lv et al. (paper)" not in render_html(with_paper)
    real = {**report.model_info, "twin": False, "name": "gpt2"}
    page = render_html(with_paper, model_info=real)
    assert "Lv et al. (paper)" in page and "Random weights." not in _text(page)


def test_twins_never_get_the_paper_reference(gpt2_small_twin, monkeypatch):
    twin = gpt2_small_twin
    assert _paper_model(twin) is None
    # the same architecture with (pretend) pretrained weights; monkeypatch restores the shared twin
    monkeypatch.setattr(twin, "factlens_random_weights", False)
    assert _paper_model(twin) == "gpt2"


def test_numbers_use_significant_digits(report):
    text = _text(render_html(report))
    assert not re.search(r"\b0\.0000\b", text)
    figs = [report.final_layer.plot(), report.lens.plot(), report.mitigation.plot()]
    for fig in figs:
        assert "0.0000 →" not in (fig.layout.title.text or "")
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text  # every axis labelled


@pytest.mark.slow
def test_cli_report_on_a_twin(tmp_path, capsys):
    from factlens.cli import main

    assert main(["capitals", "analyze", "--model", "tiny-opt", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    assert "report.html" in capsys.readouterr().out
