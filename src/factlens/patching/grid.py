"""The paper's patching grid: reference step × start step, resumable, with a results table and heat-map.

Zucchet et al. (§2.2, Fig D) train one reference run, then for every (reference_step, start_patching) pair a
fresh run from the same initialisation on the same data stream with attention patched from that reference
checkpoint. :func:`run_grid` does exactly that under ``out_dir``:

- ``out_dir/reference``: the reference run (trained first; resumed if interrupted);
- ``out_dir/ref{R}_start{S}``: one patched run per cell (finished runs are skipped, interrupted ones resume);
- ``out_dir/grid.csv`` and ``out_dir/grid.html``: final attribute loss per cell, with the unpatched run.

``start == reference`` is "freeze attention at step s"; ``start = 0`` patches the whole run.

Example:
    >>> from factlens.bios.trainer import TrainConfig
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

from factlens.bios.history import TrainingHistory
from factlens.bios.trainer import PatchConfig, TrainConfig, train
from factlens.display import ResultDisplay
from factlens.errors import ConfigError


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
    history = TrainingHistory.load(run_dir)
    final = history.final
    return {"attr_loss": final["attr_loss"], "attr_acc": final["attr_acc"], "plateau_end": history.plateau_end(),
            "run_dir": str(run_dir)}


def _finished(run_dir: Path, steps: int) -> bool:
    try:
        return int(TrainingHistory.load(run_dir).evals["step"].max()) >= steps
    except (FileNotFoundError, KeyError, ValueError):
        return False


def run_grid(config: TrainConfig, out_dir: str | Path, *, reference_steps: Sequence[int],
             start_steps: Sequence[int] = (0,), include_freeze: bool = True, reset_optimizer: bool = True,
             device=None, progress: bool = True) -> GridResult:
    """Train the reference run and every patched run of the grid (resumable); return the results table.

    Args:
        config: the run configuration shared by the reference and every patched run.
        reference_steps: reference checkpoint steps (each must be on the reference's checkpoint schedule).
        start_steps: ``start_patching`` values; cells with ``start > reference`` are skipped.
        include_freeze: also run ``start == reference`` ("freeze attention at step s") for every reference.
    """
    out = Path(out_dir)
    if config.patch is not None:
        raise ConfigError("pass the unpatched run config; run_grid sets patching per cell.")
    available = set(config.checkpoint_steps())
    missing = [s for s in reference_steps if s not in available]
    if missing:
        raise ConfigError(f"reference steps {missing} are not on the checkpoint schedule; pick from {sorted(available)} "
                          "or set checkpoint_every.")
    ref_dir = out / "reference"
    if not _finished(ref_dir, config.steps):
        train(config, ref_dir, device=device, progress=progress)
    rows = []
    for ref in reference_steps:
        starts = sorted({s for s in start_steps if s <= ref} | ({ref} if include_freeze else set()))
        for start in starts:
            if start == ref == config.steps:
                rows.append({"reference_step": ref, "start_patching": start, **_summary(ref_dir)})
                continue  # freezing at the last step is the unpatched run itself
            cell = out / f"ref{ref}_start{start}"
            patch = PatchConfig(reference=str(ref_dir), reference_step=ref, start_patching=start,
                                reset_optimizer=reset_optimizer)
            if not _finished(cell, config.steps):
                train(dataclasses.replace(config, patch=patch), cell, device=device, progress=progress)
            rows.append({"reference_step": ref, "start_patching": start, **_summary(cell)})
    result = GridResult(pd.DataFrame(rows), _summary(ref_dir))
    result.table.to_csv(out / "grid.csv", index=False)
    result.plot().write_html(out / "grid.html")
    return result
