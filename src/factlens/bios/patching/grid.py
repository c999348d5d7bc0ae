"""The paper's patching grid: reference step × start step, resumable, with a results table and heat-map.

Zucchet et al. (§2.2, Fig D) train one reference run, then for every (reference_step, start_patching) pair a
fresh run from the same initialisation on the same data stream with attention patched from that reference
checkpoint. :func:`run_grid` does exactly that under ``out_dir``:

- ``out_dir/reference``: the reference run (trained first; resumed if interrupted), unless ``reference=RUN``
  names an existing, finished run to reuse (``factlens bios grid --reference RUN``);
- ``out_dir/ref{R}_start{S}``: one patched run per cell (finished runs are skipped, interrupted ones resume);
- ``out_dir/grid.csv`` and ``out_dir/grid.html``: final attribute loss per cell, with the unpatched run.

``start == reference`` is "freeze attention at step s": those cells run only with ``include_freeze=True``
(``--freeze``); ``start = 0`` patches the whole run.

Example:
    >>> from factlens.bios.trainer import TrainConfig
    >>> from factlens.bios.patching.grid import run_grid
    >>> result = run_grid(TrainConfig.preset("demo"), "runs/grid", reference_steps=[0, 200, 1200],
    ...                   start_steps=[0])                                         # doctest: +SKIP
    >>> result.plot().show()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from factlens.bios.cells import Cell
from factlens.bios.config import TrainConfig
from factlens.bios.executor import CellsNotFinished, CellsReport, ExecutorConfig, run_cells
from factlens.bios.patching.config import PatchConfig
from factlens.bios.run import Run, reference_config
from factlens.display import ResultDisplay
from factlens.errors import CheckpointError, ConfigError
from factlens.storage import atomic_write


@dataclass
class GridResult(ResultDisplay):
    """Final metrics of every grid cell (``start_patching`` ≤ ``reference_step`` cells only)."""

    table: pd.DataFrame  # columns: reference_step, start_patching, attr_loss, attr_acc, plateau_end, run_dir
    unpatched: dict

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def pivot(self, value: str = "attr_loss") -> pd.DataFrame:
        return self.table.pivot(index="start_patching", columns="reference_step", values=value)

    def plot(self, value: str = "attr_loss"):
        """Heat-map of the final attribute loss (log colour scale) over reference step × start step."""
        import numpy as np
        import plotly.graph_objects as go

        piv = self.pivot(value)
        z = np.log10(piv.values.astype(float)) if value == "attr_loss" else piv.values
        fig = go.Figure(go.Heatmap(
            z=z, x=[str(c) for c in piv.columns], y=[str(i) for i in piv.index], colorscale="Viridis",
            text=piv.values, texttemplate="%{text:.3g}",
            colorbar=dict(title="log10 loss" if value == "attr_loss" else value),
            hovertemplate="reference step %{x}<br>start patching %{y}<br>" + value + " %{text:.4g}<extra></extra>"))
        fig.update_layout(title=f"Final {value} with patched attention (unpatched: {self.unpatched.get(value, float('nan')):.3g})",
                          xaxis_title="reference checkpoint step", yaxis_title="start patching at step",
                          template="plotly_white", height=450, width=650)
        return fig


def _summary(run_dir: Path) -> dict:
    history = Run(run_dir).history
    final = history.final
    return {"attr_loss": final["attr_loss"], "attr_acc": final["attr_acc"], "plateau_end": history.plateau_end(),
            "run_dir": str(run_dir)}


def _reference(reference: str | Path, config: TrainConfig | None, out: Path) -> tuple[TrainConfig, Path, set[int]]:
    """An existing, finished, unpatched reference run whose config is the grid's: (config, run dir, saved steps)."""
    ref_dir = Path(reference)
    if ref_dir.resolve() == out.resolve():
        raise ConfigError(f"out_dir is the reference run {ref_dir}; write the grid elsewhere (its cells are run "
                          "directories of their own).")
    ref_config = reference_config(ref_dir)
    if ref_config.patch is not None:
        raise ConfigError(f"the reference run {ref_dir} was itself trained with patched attention; a grid compares "
                          "patched runs with an unpatched reference: pass an unpatched run, or omit reference to "
                          "train one.")
    if config is None:
        config = ref_config
    elif config.to_dict() != ref_config.to_dict():
        theirs, ours = ref_config.to_dict(), config.to_dict()
        fields = [k for k in ours if ours[k] != theirs.get(k)]
        raise ConfigError(f"the grid's config differs from the reference run's in {fields}; every cell must share "
                          "the reference's initialisation and data stream. Pass config=None (on the command line: "
                          "no --preset or overrides) to take the reference's, or omit reference to train one.")
    saved = set(Run(ref_dir).steps)
    if not Run(ref_dir).finished(config):
        raise CheckpointError(f"the reference run {ref_dir} has reached step {max(saved)} of {config.steps} (still "
                              "training, or interrupted); let it finish (factlens bios train with its settings and "
                              f"--out {ref_dir} resumes it), then run the grid.")
    return config, ref_dir, saved


def _next_step(status: CellsReport) -> str:
    if status.failed:
        return "Failed: " + "; ".join(s.describe() for s in status.failed) + ". Fix them and run the grid again."
    if status.waiting:
        return "Run the same command again (or with --collect) once the queued cells have finished."
    return "Run the grid without --collect to train them."


def run_grid(config: TrainConfig | None, out_dir: str | Path, *, reference_steps: Sequence[int],
             start_steps: Sequence[int] = (0,), reference: str | Path | None = None, include_freeze: bool = False,
             reset_optimizer: bool = True, device=None, progress: bool = True,
             executor: ExecutorConfig | None = None, wait: bool = True, submit: bool = True) -> GridResult:
    """Train (or reuse) the reference run and every patched run of the grid (resumable); return the results table.

    Args:
        config: the run configuration shared by the reference and every patched run; ``None`` with
            ``reference`` takes the reference run's.
        reference_steps: reference checkpoint steps (each must be on the reference's checkpoint schedule).
        start_steps: ``start_patching`` values (training steps, ``0..steps-1``); cells with
            ``start > reference`` are skipped.
        reference: an existing, finished reference run to reuse instead of training ``out_dir/reference``. Its
            config must be the grid's (it is checked), and it is only read.
        include_freeze: also run ``start == reference`` ("freeze attention at step s") for every reference.
        executor: where the cells train (:class:`~factlens.bios.executor.ExecutorConfig`; default: here). On
            SLURM the reference run is one job, then the patched cells one job array; records and logs go to
            ``out_dir/jobs``.
        wait: wait for the cells; ``False`` returns once they are submitted. submit: ``False`` starts nothing.

    Raises:
        CellsNotFinished: cells are still queued or running (``wait=False``), failed, or were not started
            (``submit=False``); it carries every cell's status, failures with their job id, log and error.
    """
    out = Path(out_dir)
    if reference is not None:
        config, ref_dir, available = _reference(reference, config, out)
    elif config is None:
        raise ConfigError("pass config (the reference run is trained with it) or reference=RUN (an existing "
                          "reference run to reuse).")
    else:
        if config.patch is not None:
            raise ConfigError("pass the unpatched run config; run_grid sets patching per cell.")
        ref_dir, available = out / "reference", set(config.checkpoint_steps())
    if not len(reference_steps):
        raise ConfigError(f"reference_steps is empty; pick reference checkpoint steps from {sorted(available)}.")
    missing = [s for s in reference_steps if s not in available]
    if missing:
        where = "saved by the reference run" if reference is not None else "on the checkpoint schedule"
        raise ConfigError(f"reference steps {missing} are not {where}; pick from {sorted(available)}"
                          f"{'' if reference is not None else ' or set checkpoint_every'}.")
    bad = [s for s in start_steps if not 0 <= s < config.steps]
    if bad or not len(start_steps):
        raise ConfigError(f"start steps {list(bad or start_steps)} are not training steps of this {config.steps}-step "
                          f"run; use 0..{config.steps - 1} (0 patches the whole run).")
    run = dict(executor=executor, jobs_dir=out / "jobs", wait=wait, submit=submit, device=device, progress=progress)
    after = []
    if reference is None:  # the reference run is a cell of its own, trained before the patched ones
        status = run_cells([Cell("reference", config, str(ref_dir))], **run)
        (ref_status,) = status.statuses
        if ref_status.state in ("pending", "running") and ref_status.job_id:
            after = [ref_status.job_id]  # queued on SLURM: the patched cells start after it
        elif ref_status.state != "finished":
            raise CellsNotFinished("the reference run is not finished, so no patched cell can start yet. "
                                   + _next_step(status), status)
    cells, table = [], []  # table: (reference step, start step, run folder) in the grid's order
    for ref in reference_steps:
        starts = sorted({s for s in start_steps if s <= ref} | ({ref} if include_freeze else set()))
        for start in starts:
            if start == ref == config.steps:
                table.append((ref, start, ref_dir))
                continue  # freezing at the last step is the unpatched run itself
            patch = PatchConfig(reference=str(ref_dir), reference_step=ref, start_patching=start,
                                reset_optimizer=reset_optimizer)
            cells.append(Cell(f"ref{ref}_start{start}", dataclasses.replace(config, patch=patch),
                              str(out / f"ref{ref}_start{start}")))
            table.append((ref, start, cells[-1].path))
    status = run_cells(cells, **run, after=after)
    if after or status.failed or status.waiting or len(status.finished) < len(cells):
        if after:
            status = CellsReport([ref_status, *status.statuses], status.submitted)
        raise CellsNotFinished(f"{len(cells) - len(status.finished)} of the grid's {len(cells)} patched cells are "
                               "not finished. " + _next_step(status), status)
    rows = [{"reference_step": ref, "start_patching": start, **_summary(path)} for ref, start, path in table]
    out.mkdir(parents=True, exist_ok=True)
    result = GridResult(pd.DataFrame(rows), _summary(ref_dir))
    atomic_write(out / "grid.csv", result.table.to_csv(index=False))
    atomic_write(out / "grid.html", result.plot().to_html())
    return result
