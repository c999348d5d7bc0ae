"""Notebook display: every result has a concise ``__repr__`` and a ``_repr_html_`` table of its top rows."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import factlens
from factlens import capitals, recall
from factlens.display import MAX_ROWS, ResultDisplay, fmt


@pytest.fixture(scope="module")
def lv():
    model = factlens.tiny("gpt2", seed=2)
    ds = recall.dataset_for(model, n=24)
    return model, ds


def _bios_results():
    from factlens.bios.history import TrainingHistory
    from factlens.bios.metrics import AttributeMetrics
    from factlens.bios.patching.circuits import AttentionToNameResult
    from factlens.bios.patching.grid import GridResult

    evals = pd.DataFrame({"step": list(range(0, 5000, 100)), "attr_loss": torch.linspace(5, 0.1, 50).tolist(),
                          "attr_acc": torch.linspace(0, 1, 50).tolist()})
    history = TrainingHistory(evals=evals, train=evals[["step"]].assign(loss=1.0), baseline=4.2,
                              run_dir=Path("runs/demo"))
    metrics = AttributeMetrics(loss=torch.rand(6), accuracy=torch.rand(6), top_prob=torch.rand(6),
                               entropy=torch.rand(6), n_sequences=512, n_tokens=torch.full((6,), 512))
    grid = GridResult(table=pd.DataFrame({"reference_step": [0, 500], "start_patching": [0, 0],
                                          "attr_loss": [3.0, 0.5], "attr_acc": [0.1, 0.8]}), unpatched={"attr_loss": 4})
    atn = AttentionToNameResult(values=torch.rand(30, 4, 3), steps=list(range(0, 3000, 100)))
    return [history, metrics, grid, atn]


def _lv_results(model, ds):
    from factlens.recall.regression import fit_decomposition, fit_per_group, project_to_vocab

    lens = recall.logit_lens(model, ds, progress=False)
    pp = recall.path_patch(model, ds, progress=False)
    movers = recall.mover_scores(model, ds, progress=False)
    dec = recall.decompose_mlp(model, ds, layer=-1)
    final = recall.final_layer_effect(model, ds)
    table = capitals.mitigation_table(model, shots=[0], folds=2, n=24, progress=False)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 3, 8, generator=g)
    fit = fit_decomposition(h.sum(1) + 0.1 * torch.randn(40, 8, generator=g), h)
    grouped = fit_per_group(h.sum(1), h, [i % 2 for i in range(40)])
    proj = project_to_vocab(torch.randn(8, generator=g), torch.randn(8, 50, generator=g), None, k=5, answer_ids=[3])
    return [lens, pp, movers, dec, final, table, fit, grouped, proj]


def _check(result):
    assert isinstance(result, ResultDisplay), type(result).__name__
    text = repr(result)
    assert text.startswith(type(result).__name__ + "(")
    assert len(text) < 900, text  # concise: shapes, not tensor contents
    assert "tensor(" not in text and "\n     " not in text.replace("\n    ", "")
    page = result._repr_html_()
    assert page.startswith("<div") and type(result).__name__ in page
    frame = result._display_frame(MAX_ROWS)
    if frame is not None and len(frame.columns):
        body = page[page.index("<tbody>"):page.index("</tbody>")]
        assert body.count("<tr") == min(MAX_ROWS, len(frame))
        first = frame.iloc[0]
        for value in first.values[:4]:  # the top row's values, formatted to significant digits
            shown = fmt(value) if isinstance(value, float) else str(value)
            assert shown in body, (shown, body[:400])
    assert not re.search(r"\d\.0000(?!\d)", page), "numbers shown with fixed decimals, not significant digits"
    return text, page


def test_every_lv_result_displays(lv):
    model, ds = lv
    for result in _lv_results(model, ds):
        _check(result)


def test_every_bios_and_patching_result_displays():
    for result in _bios_results():
        _check(result)


def test_capitals_report_displays(lv):
    from factlens.recall import analyze

    model, _ = lv
    report = analyze(model, n=24, folds=2, progress=False)
    text, _ = _check(report)
    assert "lens=LogitLensResult" in text and "<table" not in text


def test_path_patching_html_shows_its_top_rows(lv):
    model, ds = lv
    pp = recall.path_patch(model, ds, progress=False)
    body = pp._repr_html_()
    top = pp.top(MAX_ROWS)
    assert body.index(top["name"].iloc[0]) < body.index(top["name"].iloc[1])  # ranked, as top() ranks them


def test_fmt_uses_significant_digits():
    assert fmt(0.0000123456) == "1.235e-05"
    assert fmt(0.15512) == "0.1551"
    assert fmt(torch.tensor(2.5)) == "2.5"
    assert fmt(19552.4) == "19,552"


def test_repr_installed_even_under_dataclass():
    from dataclasses import dataclass

    @dataclass
    class R(ResultDisplay):
        x: torch.Tensor

    assert repr(R(torch.zeros(1000, 3))) == "R(x=Tensor[1000, 3] float32)"


def test_notebook_extra_installs_ipywidgets():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("ipywidgets") for dep in extras["notebook"])
