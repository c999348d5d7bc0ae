"""Repository-wide pytest set-up.

* Docstring examples run with the test suite (``--doctest-modules``), each in an **empty namespace**: pytest
  would hand every example a copy of its module's globals; the hook below replaces them with a namespace that
  holds only ``__name__ == "__main__"`` and the builtins, so an example passes only if it imports and builds
  everything it uses, as it would in a new notebook (``tests/test_doctest_namespace.py`` checks this).
* jaxtyping shape annotations are checked while the tests run: ``factlens`` is imported through
  ``jaxtyping.install_import_hook("factlens", ...)`` with beartype, so a public function called with a tensor of the
  wrong shape or dtype raises, and so does one that returns one. ``FACTLENS_NO_TYPECHECK=1`` turns this off.
* Test tiers: ``python -m pytest -m "not slow"`` is the fast default tier (what the README and CI run);
  ``@pytest.mark.slow`` marks the long cases, which CI runs in its own step.
"""

from __future__ import annotations

import builtins
import os
import warnings

import pytest
from _pytest.doctest import DoctestItem

warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")

if os.environ.get("FACTLENS_NO_TYPECHECK") != "1":
    import sys

    if "factlens" in sys.modules:  # pragma: no cover - only when a plugin imported factlens first
        raise RuntimeError("factlens was imported before conftest.py could install the jaxtyping import hook")
    # The hook compiles every module imported while a factlens module executes; importing the third-party
    # packages factlens imports at module level first keeps it to factlens's own files (2 s instead of 9 s of
    # CPU per test process, measured).
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401
    import torch  # noqa: F401
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401
    from jaxtyping import install_import_hook

    # beartype with PEP 484's numeric tower: an int is a valid float, a float or int a valid complex
    install_import_hook("factlens", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

pytest_plugins = ["pytester"]


def empty_namespace() -> dict:
    """What a new notebook's namespace holds before its first cell: a name and the builtins."""
    return {"__name__": "__main__", "__builtins__": builtins}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """After pytest sets a docstring example up (module globals, ``getfixture``, ``doctest_namespace``), empty its
    namespace."""
    yield
    if isinstance(item, DoctestItem) and item.dtest.filename.endswith(".py"):
        item.dtest.globs.clear()
        item.dtest.globs.update(empty_namespace())


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``), split the cores between the workers instead of letting each torch use all
    of them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
