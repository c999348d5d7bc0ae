"""Training cells: one resumable training run of a grid (a reproduction stage, a patching grid), by content.

A :class:`Cell` is what a grid hands to an executor (:mod:`factlens.bios.executor`): its key (where it sits in
the grid, e.g. ``scaling/N160``), its :class:`~factlens.bios.config.TrainConfig` and its run folder. It is a
small picklable value, so it travels to a SLURM job as it is. Running a cell (:func:`run_cell`) is a
resumable training run into its folder: running it again resumes from the newest resume checkpoint, and a
finished cell is only read. Its :attr:`Cell.fingerprint` is a hash of the config, so a record of a submitted
job is trusted only for the config it was submitted with.

Example:
    >>> from factlens.bios.cells import Cell
    >>> from factlens.bios.config import TrainConfig
    >>> cell = Cell("scaling/N16", TrainConfig.preset("tiny", n_people=16), "runs/repro/scaling/N16")
    >>> len(cell.fingerprint), cell.fingerprint == Cell("x", TrainConfig.preset("tiny", n_people=16), "y").fingerprint
    (16, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from factlens.bios.config import TrainConfig
from factlens.bios.history import TrainingHistory
from factlens.bios.run import Run, pin_reference
from factlens.errors import FactlensError


@dataclass(frozen=True)
class Cell:
    """One training run of a grid.

    Attributes:
        key: the cell's name in its grid (also its run folder relative to the grid's output folder).
        config: what the run trains.
        run_dir: the run folder (resumable; a finished run is read, not retrained).
    """

    key: str
    config: TrainConfig
    run_dir: str

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the config (what the cell trains, not where)."""
        text = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def pinned(self) -> TrainConfig | None:
        """The config as its run records it: a patched cell's reference pinned by its weights' checksum
        (:func:`~factlens.bios.run.pin_reference`); ``None`` while the reference run has no such checkpoint yet
        (a cell queued behind its reference). The fingerprint is the unpinned config's: what was asked."""
        if self.config.patch is None:
            return self.config
        try:
            return pin_reference(self.config)
        except FactlensError:
            return None

    def check(self) -> None:
        """Refuse a run folder that holds another run or another tool's files (writes nothing)."""
        config = self.pinned()
        if config is not None:
            Run(self.path).check(config)

    def finished(self) -> bool:
        """Whether the run folder holds this cell's run trained to its last step (another run there raises)."""
        config = self.pinned()
        return config is not None and Run(self.path).finished(config)

    def history(self) -> TrainingHistory:
        return Run(self.path).history


def cell_threads(cpus: int | None = None) -> int:
    """The torch CPU threads a cell uses: ``cpus``, else the CPUs SLURM gave the job (``SLURM_CPUS_PER_TASK``),
    else torch's current setting. (Runs are bit-identical across executors for the same threads and device;
    another thread count sums in another order, which moves losses in the 7th digit.)

    Example:
        >>> from factlens.bios.cells import cell_threads
        >>> cell_threads(3)
        3
    """
    if cpus:
        return int(cpus)
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    import torch

    return torch.get_num_threads()


def run_cell(cell: Cell, *, threads: int | None = None, device=None, progress: bool = False,
             log_to: str | None = None) -> dict:
    """Train (or resume, or only read) one cell with ``threads`` torch CPU threads; returns its summary.

    ``log_to``: also send the training's metrics to ``"tensorboard"`` or ``"wandb"`` (:mod:`factlens.bios.tracking`).

    The summary is ``{"key", "fingerprint", "final", "trained", "wall_s"}``: ``final`` the last evaluation
    (attribute loss and accuracy), ``trained`` whether this call trained (``False``: it was finished).
    """
    import torch

    from factlens.bios.trainer import train

    t0 = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(cell_threads(threads))
    try:
        trained = not cell.finished()
        history = train(cell.config, cell.path, device=device, progress=progress, log_to=log_to) if trained else cell.history()
    finally:
        torch.set_num_threads(previous)
    return {"key": cell.key, "fingerprint": cell.fingerprint, "final": dict(history.final), "trained": trained,
            "wall_s": time.perf_counter() - t0}


__all__ = ["Cell", "cell_threads", "run_cell"]
