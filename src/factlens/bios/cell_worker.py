"""The worker process of the local executor: ``python -m factlens.bios.cell_worker`` trains one cell.

:func:`factlens.bios.executor.run_cells` with ``workers > 1`` starts one fresh interpreter per cell on this
module, with the pickled ``(cell, threads, device, log_to)`` on its standard input; the worker trains (or
resumes) the cell and exits 0, or prints the error's traceback on standard error and exits 1. A fresh
interpreter imports neither the caller's script nor its notebook, so a script without an
``if __name__ == "__main__":`` guard, or a notebook, can start workers (``multiprocessing``'s spawn would
re-run the caller's main module in each worker).

Example:
    >>> import pickle, subprocess, sys, tempfile
    >>> from factlens.bios.cells import Cell
    >>> from factlens.bios.config import TrainConfig
    >>> cell = Cell("c", TrainConfig.preset("tiny", steps=2, checkpoint_every=1), tempfile.mkdtemp() + "/c")
    >>> job = pickle.dumps((cell, 1, "cpu", None))
    >>> subprocess.run([sys.executable, "-m", "factlens.bios.cell_worker"], input=job).returncode
    0
    >>> cell.finished()
    True
"""

from __future__ import annotations

import pickle
import sys

from factlens.bios.cells import run_cell


def main() -> int:
    """Read one pickled ``(cell, threads, device, log_to)`` from standard input and train it."""
    cell, threads, device, log_to = pickle.load(sys.stdin.buffer)
    run_cell(cell, threads=threads, device=device, progress=False, log_to=log_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
