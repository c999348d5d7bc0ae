"""The example notebooks: ``examples/*.ipynb`` kept in sync with their jupytext sources ``examples/*.py``, and
executed in a real Jupyter kernel, then exported with nbconvert to HTML that still holds the figures.

Each notebook runs cell by cell through ``nbclient`` with ``FACTLENS_TINY=1`` (tiny random models, a few dozen
training steps), so a notebook that no longer matches the API fails here.
"""

from __future__ import annotations

import os
from pathlib import Path

import ipykernel  # noqa: F401  (the "python3" kernel the notebooks run in; a dev dependency)
import jupytext
import nbclient
import nbconvert
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"capitals_zero_shot", "patch_attention_into_training",
                                          "curricula_and_hallucinations"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_ipynb_is_in_sync_with_its_jupytext_source(path):
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --sync {path.relative_to(ROOT)}"
    nb = nbformat.read(ipynb, as_version=4)
    cells = [(c.cell_type, c.source) for c in nb.cells]
    assert cells == [(c.cell_type, c.source) for c in jupytext.read(path).cells], (
        f"{ipynb.name} differs from {path.name}; run: jupytext --sync {path.relative_to(ROOT)}")
    assert not any(c.get("outputs") for c in nb.cells), f"{ipynb.name} is committed with outputs; clear them"
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in EXAMPLES:
        assert f"examples/{path.stem}.ipynb" in readme, path.stem
    assert "FACTLENS_TINY" in readme


@pytest.mark.slow  # 40-100 s each: CI runs them in a step of their own (.ci/run), outside the 10-minute suite
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("FACTLENS_TINY", "1")  # set before the client starts: the kernel inherits it
    monkeypatch.setenv("FACTLENS_OUT", str(tmp_path))  # the notebooks write their figures here, not into the repo
    nb = nbformat.read(path.with_suffix(".ipynb"), as_version=4)  # the notebook a user opens
    assert any(c.cell_type == "markdown" for c in nb.cells) and any(c.cell_type == "code" for c in nb.cells)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert os.environ["FACTLENS_TINY"] == "1"
    out = tmp_path / path.stem
    assert list(out.glob("*.html")), f"{path.name} saved no figure under {out}"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if "TqdmWarning" in str(o.get("text", ""))]
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)  # jupyter nbconvert --to html
    shows = sum(c.source.count("show(") for c in nb.cells if c.cell_type == "code" and "def show" not in c.source)
    assert html.count("Plotly.newPlot") >= max(shows, 1), "figures lost in the HTML export"
    assert "plotly.js v" in html, "plotly.js is not embedded: the exported figures would need the network"
    (tmp_path / f"{path.stem}.html").write_text(html)
