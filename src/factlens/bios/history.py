"""A training run's metrics log (``metrics.jsonl``): reading, plotting, plateau detection.

Example:
    >>> from factlens.bios.history import TrainingHistory
    >>> history = TrainingHistory.load("runs/demo")                 # doctest: +SKIP
    >>> history.plateau_end(), history.final["attr_acc"]            # doctest: +SKIP
    >>> history.plot().write_html("runs/demo/curves.html")          # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from factlens.bios.data.pools import Pools, no_knowledge_baseline
from factlens.bios.metrics import plateau_end as _plateau_end
from factlens.display import ResultDisplay


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON record (a line) and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records with ``step > max_step`` (all of them for ``max_step < 0``), atomically."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= max_step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics-")
    with os.fdopen(fd, "w") as f:
        f.write("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


@dataclass
class TrainingHistory(ResultDisplay):
    """Evaluation and training-loss records of a run, with the no-knowledge baseline.

    Attributes:
        evals: one row per checkpoint (``step``, ``attr_loss``, ``attr_acc``, ``unseen_*``...).
        train: one row per logging interval (``step``, ``loss``, ``lr``, ``tokens_per_s``).
        baseline: the no-knowledge attribute loss of the run's pools (nats).
    """

    evals: pd.DataFrame
    train: pd.DataFrame
    baseline: float
    run_dir: Path | None = None

    @classmethod
    def load(cls, run_dir: str | Path, pools: Pools | None = None) -> TrainingHistory:
        run_dir = Path(run_dir)
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        evals = pd.DataFrame([r for r in rows if r["kind"] == "eval"]).drop(columns="kind", errors="ignore")
        train = pd.DataFrame([r for r in rows if r["kind"] == "train"]).drop(columns="kind", errors="ignore")
        if pools is None:
            sizes = json.loads((run_dir / "config.json").read_text()).get("pools") if (run_dir / "config.json").exists() else None
            pools = Pools.sized(**sizes) if sizes else Pools.default()
        baseline = no_knowledge_baseline(pools)
        return cls(evals=evals, train=train, baseline=baseline, run_dir=run_dir)

    @property
    def final(self) -> dict:
        """The last evaluation record."""
        return self.evals.iloc[-1].to_dict()

    def plateau_end(self, ratio: float = 0.98, min_step: int | None = None) -> int | None:
        """First checkpoint after the initial drop whose attribute loss is below ``ratio × baseline``.

        ``min_step`` defaults to the step where the loss first came within 10% of the baseline (the end of
        the initial drop), so a loss that starts below ``ratio × baseline`` is not mistaken for knowledge.
        """
        if "attr_loss" not in self.evals:
            return None
        steps, losses = self.evals["step"].tolist(), self.evals["attr_loss"].tolist()
        if min_step is None:
            near = [s for s, v in zip(steps, losses) if v < 1.1 * self.baseline]
            min_step = near[0] if near else 0
        return _plateau_end(steps, losses, self.baseline, ratio=ratio, min_step=min_step)

    def to_dataframe(self) -> pd.DataFrame:
        return self.evals.copy()

    def plot(self, title: str | None = None):
        """Attribute loss (log scale) and accuracy over steps, the baseline line and the plateau end."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("Attribute loss (nats, log scale)", "Attribute accuracy"))
        ev = self.evals
        labels = {"": "held-out templates", "unseen_": "unseen people", "old_": "old people", "new_": "new people"}
        colours = {"": "#1f77b4", "unseen_": "#d62728", "old_": "#1f77b4", "new_": "#2ca02c"}
        for prefix, label in labels.items():
            if prefix + "attr_loss" not in ev:
                continue
            dash = "dot" if prefix == "unseen_" else "solid"
            fig.add_trace(go.Scatter(x=ev["step"], y=ev[prefix + "attr_loss"], mode="lines+markers", name=label,
                                     line=dict(color=colours[prefix], dash=dash), legendgroup=label,
                                     hovertemplate=f"{label}<br>step %{{x}}<br>loss %{{y:.4f}} nats<extra></extra>"), 1, 1)
            if prefix != "unseen_":
                fig.add_trace(go.Scatter(x=ev["step"], y=ev[prefix + "attr_acc"], mode="lines+markers", name=label,
                                         line=dict(color=colours[prefix]), legendgroup=label, showlegend=False,
                                         hovertemplate=f"{label}<br>step %{{x}}<br>accuracy %{{y:.3f}}<extra></extra>"),
                              1, 2)
        # the baseline as a legend entry: an add_hline annotation is misplaced on a log axis by plotly
        fig.add_trace(go.Scatter(x=[ev["step"].min(), ev["step"].max()], y=[self.baseline] * 2, mode="lines",
                                 name=f"no knowledge ({self.baseline:.3f} nats)",
                                 line=dict(color="grey", dash="dash"),
                                 hovertemplate="no-knowledge baseline %{y:.3f} nats<extra></extra>"), 1, 1)
        end = self.plateau_end()
        if end is not None:
            for col in (1, 2):
                fig.add_vline(x=end, line=dict(color="orange", dash="dot"), row=1, col=col)
            fig.add_annotation(x=end, y=1, yref="y2 domain", xref="x2", text=f"plateau end ({end})",
                               showarrow=False, font=dict(color="orange"))
        losses = ev[[c for c in ev.columns if c.endswith("attr_loss")]].to_numpy().ravel()
        lo, hi = max(float(losses.min()), 1e-4), float(losses.max())
        fig.update_yaxes(type="log", title_text="nats", row=1, col=1,
                         range=[math.log10(lo) - 0.15, math.log10(max(hi, self.baseline)) + 0.15])
        fig.update_yaxes(range=[0, 1.02], title_text="fraction of values", row=1, col=2)
        fig.update_xaxes(title_text="training step")
        fig.update_layout(title=title or f"Knowledge acquisition ({self.run_dir.name if self.run_dir else 'run'})",
                          template="plotly_white", height=420, width=1000)
        return fig


    def compare(self, *others, labels: list[str] | None = None, metrics: tuple[str, ...] = ("attr_loss", "attr_acc"),
                title: str | None = None):
        """This run (the reference, drawn thick and black) against other runs, on one figure.

        The no-knowledge baseline is the dashed grey line, each run's plateau end a dotted line in its colour
        (and in its legend entry). See :func:`factlens.plot.compare_runs`.

        Args:
            *others: Histories, run folders, or ``{label: history or folder}`` mappings (e.g. a whole grid).
            labels: Legend names, this run's first (default: the run folders' names).
            metrics: Columns of ``evals``, one panel each.

        Example:
            >>> reference = TrainingHistory.load("runs/ref")                                 # doctest: +SKIP
            >>> reference.compare("runs/patched", {"grid 500": "runs/grid/ref500"}).show()   # doctest: +SKIP
        """
        from factlens.plot import compare_runs

        items: list[tuple[str | None, object]] = [(None, self)]
        for other in others:
            items += [(str(k), v) for k, v in other.items()] if isinstance(other, dict) else [(None, other)]
        runs: dict[str, TrainingHistory] = {}
        for i, (name, run) in enumerate(items):
            history = run if isinstance(run, TrainingHistory) else TrainingHistory.load(run)
            if labels is not None and i < len(labels):
                name = labels[i]
            name = name or (history.run_dir.name if history.run_dir else ("reference" if i == 0 else f"run {i}"))
            while name in runs:
                name = f"{name} ({i})"
            runs[name] = history
        return compare_runs(runs, metrics=metrics, reference=next(iter(runs)), title=title or "Runs compared")
