"""Repository-wide pytest set-up. Docstring examples run with the test suite (``--doctest-modules``), each in
a fresh namespace: every example imports and builds what it uses, so it runs as written in a notebook."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")
