"""A training run's metrics: evaluations and training losses, plotted for one run or several (:func:`compare_runs`).

A run folder's history is read by :attr:`factlens.bios.run.Run.history`.

Example:
    >>> from factlens.bios.run import Run
    >>> history = Run("runs/demo").history                          # doctest: +SKIP
    >>> history.plateau_end(), history.final["attr_acc"]            # doctest: +SKIP
    >>> history.plot().write_html("runs/demo/curves.html")          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from factlens.bios.data.pools import Pools, no_knowledge_baseline
from factlens.bios.phases import ratio_phases
from factlens.display import ResultDisplay
from factlens.errors import ConfigError, EmptyDatasetError


@dataclass
class TrainingHistory(ResultDisplay):
    """Evaluation and training-loss records of a run, with the no-knowledge baseline.

    Attributes:
        evals: one row per checkpoint (``step``, ``attr_loss``, ``attr_acc``, ``unseen_*``...).
        train: one row per logging interval (``step``, ``loss``, ``lr``, ``tokens_per_s``, ``threads``: torch's
            CPU threads, which fix the order of CPU sums, so two runs are bit-identical only at the same count).
        baseline: the no-knowledge attribute loss of the run's pools (nats).
    """

    evals: pd.DataFrame
    train: pd.DataFrame
    baseline: float
    run_dir: Path | None = None

    @classmethod
    def from_records(cls, rows: list[dict], pools: Pools | None = None, run_dir: Path | None = None) -> TrainingHistory:
        """A history from the records of a metrics log (``kind`` ``"eval"`` or ``"train"``, ``step``, metrics).

        The baseline is the no-knowledge loss of ``pools`` (default: the paper's). Open a run folder's history
        with :attr:`factlens.bios.run.Run.history`.

        Example:
            >>> from factlens.bios import TrainingHistory
            >>> rows = [{"kind": "eval", "step": 0, "attr_loss": 9.0, "attr_acc": 0.0},
            ...         {"kind": "train", "step": 10, "loss": 5.0}]
            >>> TrainingHistory.from_records(rows).evals["attr_loss"].tolist()
            [9.0]
        """
        evals = pd.DataFrame([r for r in rows if r["kind"] == "eval"]).drop(columns="kind", errors="ignore")
        train = pd.DataFrame([r for r in rows if r["kind"] == "train"]).drop(columns="kind", errors="ignore")
        if evals.empty:
            where = run_dir if run_dir is not None else "the metrics log"
            raise EmptyDatasetError(f"{where} has no evaluation record yet (the run logs one at step 0 and at every "
                                    "checkpoint); let the run reach its first checkpoint, or resume it.")
        baseline = no_knowledge_baseline(pools if pools is not None else Pools.default())
        return cls(evals=evals, train=train, baseline=baseline, run_dir=run_dir)

    @property
    def final(self) -> dict:
        """The last evaluation record."""
        return self.evals.iloc[-1].to_dict()

    def plateau_end(self, ratio: float = 0.98, min_step: int | None = None) -> int | None:
        """First checkpoint after the initial drop whose attribute loss is below ``ratio × baseline``.

        The ratio reading of :mod:`factlens.bios.phases` (:func:`~factlens.bios.phases.ratio_phases`):
        ``min_step`` defaults to the end of the initial drop, so a loss that starts below
        ``ratio × baseline`` is not mistaken for knowledge.
        """
        if "attr_loss" not in self.evals:
            return None
        steps, losses = self.evals["step"].tolist(), self.evals["attr_loss"].tolist()
        return ratio_phases(steps, losses, self.baseline, ratio=ratio, min_step=min_step)[1]

    def to_dataframe(self) -> pd.DataFrame:
        return self.evals.copy()

    def plot(self, title: str | None = None, loss_range: tuple[float, float] | None = None):
        """Attribute loss and accuracy over steps, the baseline line and the plateau end; when the run logged
        them, a second row with the mean top-token probability and entropy over value tokens. Every panel shows
        the trained people (held-out templates; old and new people when fine-tuning) beside the people never
        trained on (dotted), so over-confidence on unknown people (hallucination) sits next to real knowledge.

        ``loss_range``: ``None`` plots the loss on a log scale over all its values; ``(lo, hi)`` plots it on a
        linear scale over that range (e.g. zoomed on the baseline, to see a plateau's few percent).
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        ev = self.evals
        scale = "log scale" if loss_range is None else "linear scale"
        titles = [f"Attribute loss (nats, {scale})", "Attribute accuracy"]
        confidence = any(c.endswith("top_prob") for c in ev)
        if confidence:
            titles += ["Mean top-token probability (value tokens)", "Mean predictive entropy (nats, value tokens)"]
        fig = make_subplots(rows=1 + confidence, cols=2, subplot_titles=titles, vertical_spacing=0.14)
        labels = {"": "held-out templates", "old_": "old people", "new_": "new people", "unseen_": "unseen people"}
        colours = {"": "#1f77b4", "unseen_": "#d62728", "old_": "#1f77b4", "new_": "#2ca02c"}
        panels = [("attr_loss", 1, 1, "loss %{y:.4f} nats"), ("attr_acc", 1, 2, "accuracy %{y:.3f}"),
                  ("top_prob", 2, 1, "top-token probability %{y:.3f}"), ("entropy", 2, 2, "entropy %{y:.3f} nats")]
        for prefix, label in labels.items():
            first = True
            for metric, row, col, hover in panels:
                if prefix + metric not in ev or (row == 2 and not confidence):
                    continue
                dash = "dot" if prefix == "unseen_" else "solid"
                fig.add_trace(go.Scatter(x=ev["step"], y=ev[prefix + metric], mode="lines+markers", name=label,
                                         line=dict(color=colours[prefix], dash=dash), legendgroup=label,
                                         showlegend=first,
                                         hovertemplate=f"{label}<br>step %{{x}}<br>{hover}<extra></extra>"),
                              row, col)
                first = False
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
        if loss_range is None:
            fig.update_yaxes(type="log", title_text="nats", row=1, col=1,
                             range=[math.log10(lo) - 0.15, math.log10(max(hi, self.baseline)) + 0.15])
        else:
            fig.update_yaxes(type="linear", title_text="nats", row=1, col=1, range=list(loss_range))
        fig.update_yaxes(range=[0, 1.02], title_text="fraction of values", row=1, col=2)
        if confidence:
            fig.update_yaxes(range=[0, 1.02], title_text="probability", row=2, col=1)
            fig.update_yaxes(rangemode="tozero", title_text="nats", row=2, col=2)
        fig.update_xaxes(title_text="training step")
        fig.update_layout(title=title or f"Knowledge acquisition ({self.run_dir.name if self.run_dir else 'run'})",
                          template="plotly_white", height=420 * (1 + confidence), width=1000)
        return fig

    def compare(self, *others, labels: list[str] | None = None, metrics: tuple[str, ...] = ("attr_loss", "attr_acc"),
                title: str | None = None):
        """This run (the reference, drawn thick and black) against other runs, on one figure.

        The no-knowledge baseline is the dashed grey line, each run's plateau end a dotted line in its colour
        (and in its legend entry). See :func:`compare_runs`.

        Args:
            *others: Histories, runs (:class:`~factlens.bios.run.Run`, anything with a ``history``), or
                ``{label: history or run}`` mappings (e.g. a whole grid).
            labels: Legend names, this run's first (default: the run folders' names).
            metrics: Columns of ``evals``, one panel each.

        Example:
            >>> from factlens.bios.run import Run
            >>> reference = Run("runs/ref").history                                          # doctest: +SKIP
            >>> reference.compare(Run("runs/patched"), {"grid 500": Run("runs/grid/ref500")})  # doctest: +SKIP
        """
        items: list[tuple[str | None, object]] = [(None, self)]
        for other in others:
            items += [(str(k), v) for k, v in other.items()] if isinstance(other, dict) else [(None, other)]
        runs: dict[str, TrainingHistory] = {}
        for i, (name, run) in enumerate(items):
            history = run if isinstance(run, TrainingHistory) else getattr(run, "history", None)
            if not isinstance(history, TrainingHistory):
                raise ConfigError(f"{run!r} is not a training history or run; pass TrainingHistory objects or "
                                  "factlens.bios.run.Run(folder) for run folders.")
            if labels is not None and i < len(labels):
                name = labels[i]
            name = name or (history.run_dir.name if history.run_dir else ("reference" if i == 0 else f"run {i}"))
            while name in runs:
                name = f"{name} ({i})"
            runs[name] = history
        return compare_runs(runs, metrics=metrics, reference=next(iter(runs)), title=title or "Runs compared")


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f")
_AXES = {"loss": ("nats, log scale", "log"), "entropy": ("nats", "linear"), "acc": ("fraction of values", "linear"),
         "prob": ("probability", "linear")}


def _metric_title(metric: str) -> str:
    """``"unseen_attr_loss"`` → ``"attribute loss, unseen people"``."""
    words = metric.replace("attr_", "attribute_").replace("acc", "accuracy").replace("top_prob", "top-token probability")
    for prefix, who in (("unseen_", "unseen people"), ("old_", "old people"), ("new_", "new people")):
        if words.startswith(prefix):
            return f"{words.removeprefix(prefix).replace('_', ' ')}, {who}"
    return words.replace("_", " ")


def _axis(metric: str) -> tuple[str, str]:
    for key, axis in _AXES.items():
        if key in metric:
            return axis
    return ("value", "linear")


def compare_runs(runs, labels: Sequence[str] | None = None, *, metrics: Sequence[str] = ("attr_loss", "attr_acc"),
                 reference: str | None = None, title: str | None = None):
    """Several training runs on one figure: one panel per metric, the no-knowledge baseline, each plateau end.

    Args:
        runs: Training histories (``factlens.bios.TrainingHistory`` or anything with ``evals``, ``baseline`` and
            ``plateau_end()``), as a sequence or a ``{label: history}`` mapping.
        labels: Legend names for a sequence (default: each run's folder name).
        metrics: Columns of ``evals`` to plot, one panel each (``attr_loss``, ``attr_acc``, ``unseen_attr_loss``,
            ``unseen_top_prob``...). Loss panels use a log axis in nats; accuracy panels a 0–1 axis.
        reference: The label of the reference run, drawn thick and black (e.g. against patched runs).

    The dashed grey line is the no-knowledge baseline (on ``*attr_loss`` panels), and a dotted vertical line in a
    run's colour marks its plateau end (also given in its legend entry).

    Example:
        >>> import pandas as pd
        >>> from types import SimpleNamespace
        >>> from factlens.bios.history import compare_runs
        >>> def run(knee):
        ...     steps = list(range(0, 1000, 100))
        ...     loss = [4.0 if s < knee else 0.5 for s in steps]
        ...     ev = pd.DataFrame({"step": steps, "attr_loss": loss, "attr_acc": [0.1 if v > 1 else 0.9 for v in loss]})
        ...     return SimpleNamespace(evals=ev, baseline=4.1, run_dir=None, plateau_end=lambda: knee)
        >>> fig = compare_runs({"reference": run(600), "patched": run(200)}, reference="reference")
        >>> [t.name for t in fig.data if t.showlegend is not False]
        ['reference (plateau end 600)', 'patched (plateau end 200)', 'no knowledge (4.1 nats)']
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if isinstance(runs, dict):
        items = list(runs.items())
    else:
        runs = list(runs)
        if labels is not None and len(labels) != len(runs):
            raise ConfigError(f"{len(labels)} labels for {len(runs)} runs; pass one label per run.")
        names = labels or [getattr(getattr(h, "run_dir", None), "name", None) or f"run {i}" for i, h in enumerate(runs)]
        items = list(zip(names, runs))
    if not items:
        raise ConfigError("compare_runs needs at least one run.")
    for name, h in items:
        missing = [m for m in metrics if m not in h.evals]
        if missing:
            raise ConfigError(f"run {name!r} has no {missing} in its evaluations; it has {list(h.evals.columns)}.")
    titles = [f"{_metric_title(m)} ({_axis(m)[0]})" for m in metrics]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=titles, horizontal_spacing=0.1)
    colour_iter = iter(_COLOURS * (len(items) // len(_COLOURS) + 1))
    for name, h in items:
        is_ref = name == reference
        colour = "black" if is_ref else next(colour_iter)
        end = h.plateau_end()
        label = f"{name} (plateau end {end if end is not None else 'not reached'})"
        for col, metric in enumerate(metrics, start=1):
            ev = h.evals
            fig.add_trace(go.Scatter(x=ev["step"], y=ev[metric], mode="lines+markers", name=label, legendgroup=name,
                                     showlegend=col == 1, line=dict(color=colour, width=3 if is_ref else 2),
                                     hovertemplate=f"{name}<br>step %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>"),
                          1, col)
            if end is not None:
                fig.add_vline(x=end, line=dict(color=colour, dash="dot", width=1.5), row=1, col=col)
    baselines = sorted({round(float(h.baseline), 6) for _, h in items if getattr(h, "baseline", None) is not None})
    steps = [s for _, h in items for s in h.evals["step"]]
    first_loss = next((c for c, m in enumerate(metrics, start=1) if m.endswith("attr_loss")), None)
    for col, metric in enumerate(metrics, start=1):
        axis_title, kind = _axis(metric)
        values = [float(v) for _, h in items for v in h.evals[metric] if v == v]
        if metric.endswith("attr_loss"):
            for i, b in enumerate(baselines):  # a legend entry: plotly misplaces hline annotations on log axes
                fig.add_trace(go.Scatter(x=[min(steps), max(steps)], y=[b, b], mode="lines",
                                         name=f"no knowledge ({b:.3g} nats)", legendgroup=f"baseline{i}",
                                         showlegend=col == first_loss,
                                         line=dict(color="grey", dash="dash"),
                                         hovertemplate="no-knowledge baseline %{y:.4g} nats<extra></extra>"), 1, col)
            values += baselines
        if kind == "log" and values:
            lo, hi = max(min(values), 1e-4), max(max(values), 1e-4)
            fig.update_yaxes(type="log", range=[math.log10(lo) - 0.15, math.log10(hi) + 0.15], row=1, col=col)
        elif "acc" in metric:
            fig.update_yaxes(range=[0, 1.02], row=1, col=col)
        fig.update_yaxes(title_text=axis_title, exponentformat="power", row=1, col=col)
    fig.update_xaxes(title_text="training step")
    fig.update_layout(title=title or f"{len(items)} runs compared", template="plotly_white", height=440,
                      width=max(560, min(480, 1150 // len(metrics)) * len(metrics)), legend=dict(orientation="h", y=-0.22))
    return fig
