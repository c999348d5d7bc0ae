"""Execute the example notebooks (``examples/*.py``, jupytext percent scripts) in a real Jupyter kernel.

Each script is converted with jupytext and run cell by cell through ``nbclient`` with ``FACTLENS_TINY=1``
(tiny random models, a few dozen training steps), so a notebook that no longer matches the API fails here.
"""

from __future__ import annotations

import os
from pathlib import Path

import ipykernel  # noqa: F401  (the "python3" kernel the notebooks run in; a dev dependency)
import jupytext
import nbclient
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"capitals_zero_shot", "patch_attention_into_training",
                                          "curricula_and_hallucinations"}


@pytest.mark.slow  # 40-100 s each: CI runs them in a step of their own (.ci/run), outside the 10-minute suite
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("FACTLENS_TINY", "1")  # set before the client starts: the kernel inherits it
    monkeypatch.setenv("FACTLENS_OUT", str(tmp_path))  # the notebooks write their figures here, not into the repo
    nb = jupytext.read(path)
    assert any(c.cell_type == "markdown" for c in nb.cells) and any(c.cell_type == "code" for c in nb.cells)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert os.environ["FACTLENS_TINY"] == "1"
    out = tmp_path / path.stem
    assert list(out.glob("*.html")), f"{path.name} saved no figure under {out}"
