"""A training run's metrics log (``metrics.jsonl``): reading, plotting one run or several (:func:`compare_runs`).

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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from factlens.bios.data.pools import Pools, no_knowledge_baseline
from factlens.bios.phases import ratio_phases
from factlens.checkpoints import atomic_write_text, storage_errors
from factlens.display import ResultDisplay
from factlens.errors import CheckpointError, ConfigError, EmptyDatasetError, RunNotFoundError

METRICS = "metrics.jsonl"
KINDS = ("train", "eval")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON record (a line) and flush it to disk."""
    line = json.dumps(record) + "\n"
    with storage_errors(path, len(line)), open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics log. A torn last line (the process died mid-write) is dropped with a warning;
    any other line that is not a factlens record raises :class:`~factlens.errors.CheckpointError`."""
    path = Path(path)
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: a write cut short by a crash
                warnings.warn(f"{path}: dropped a torn last line (the run was interrupted while writing it).",
                              stacklevel=2)
                continue
            raise CheckpointError(f"{path} line {i + 1} is not JSON: the file is corrupt or not a factlens "
                                  "metrics log. Delete that line, or the file, and resume the run.") from None
        if not (isinstance(record, dict) and record.get("kind") in KINDS and isinstance(record.get("step"), int)):
            raise CheckpointError(f"{path} line {i + 1} is not a factlens metrics record (a dict with 'kind' "
                                  f"{' or '.join(KINDS)} and an integer 'step'); this file belongs to another tool. "
                                  "Use another output directory.")
        rows.append(record)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep exactly what a run resumed at ``step`` has already logged: training rows up to ``step`` and
    evaluations before it (the evaluation at ``step`` runs again). ``step=0`` empties the log. A torn last line
    is dropped. Rewritten atomically, only when something changes."""
    if not path.exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn line is expected here: this is the recovery
        rows = read_jsonl(path)
    keep = [r for r in rows if r["step"] < step or (r["step"] == step and r["kind"] == "train")]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if text != path.read_text():
        atomic_write_text(path, text)


def _run_pools(run_dir: Path) -> Pools:
    """The pools of the run in ``run_dir`` (its verified config); the paper's when it has no config at all."""
    from factlens.bios.runs import run_config

    try:
        return run_config(run_dir, require_checkpoint=False).make_pools()
    except RunNotFoundError:
        return Pools.default()


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
        """Read ``run_dir/metrics.jsonl``; the baseline uses the run's pools (from its checkpoints' config)."""
        run_dir = Path(run_dir)
        path = run_dir / METRICS
        if not path.is_file():
            raise RunNotFoundError(f"{run_dir} has no {METRICS}: it is not a training run, or the run has not "
                                   f"started. Check the path, or train it (factlens bios train --out {run_dir}).")
        rows = read_jsonl(path)
        evals = pd.DataFrame([r for r in rows if r["kind"] == "eval"]).drop(columns="kind", errors="ignore")
        train = pd.DataFrame([r for r in rows if r["kind"] == "train"]).drop(columns="kind", errors="ignore")
        if not rows:
            raise EmptyDatasetError(f"{path} is empty: the run has not logged anything yet. Let it reach its first "
                                    f"evaluation (step 0), or resume it (factlens bios train --out {run_dir}).")
        if evals.empty:
            raise EmptyDatasetError(f"{path} has no evaluation record yet (the run logs one at step 0 and at every "
                                    "checkpoint); let the run reach its first checkpoint, or resume it.")
        if pools is None:
            pools = _run_pools(run_dir)
        baseline = no_knowledge_baseline(pools)
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
        """Attribute loss and accuracy over steps, the baseline line and the plateau end.

        ``loss_range``: ``None`` plots the loss on a log scale over all its values; ``(lo, hi)`` plots it on a
        linear scale over that range (e.g. zoomed on the baseline, to see a plateau's few percent).
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        scale = "log scale" if loss_range is None else "linear scale"
        fig = make_subplots(rows=1, cols=2, subplot_titles=(f"Attribute loss (nats, {scale})", "Attribute accuracy"))
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
        if loss_range is None:
            fig.update_yaxes(type="log", title_text="nats", row=1, col=1,
                             range=[math.log10(lo) - 0.15, math.log10(max(hi, self.baseline)) + 0.15])
        else:
            fig.update_yaxes(type="linear", title_text="nats", row=1, col=1, range=list(loss_range))
        fig.update_yaxes(range=[0, 1.02], title_text="fraction of values", row=1, col=2)
        fig.update_xaxes(title_text="training step")
        fig.update_layout(title=title or f"Knowledge acquisition ({self.run_dir.name if self.run_dir else 'run'})",
                          template="plotly_white", height=420, width=1000)
        return fig


    def compare(self, *others, labels: list[str] | None = None, metrics: tuple[str, ...] = ("attr_loss", "attr_acc"),
                title: str | None = None):
        """This run (the reference, drawn thick and black) against other runs, on one figure.

        The no-knowledge baseline is the dashed grey line, each run's plateau end a dotted line in its colour
        (and in its legend entry). See :func:`compare_runs`.

        Args:
            *others: Histories, run folders, or ``{label: history or folder}`` mappings (e.g. a whole grid).
            labels: Legend names, this run's first (default: the run folders' names).
            metrics: Columns of ``evals``, one panel each.

        Example:
            >>> reference = TrainingHistory.load("runs/ref")                                 # doctest: +SKIP
            >>> reference.compare("runs/patched", {"grid 500": "runs/grid/ref500"}).show()   # doctest: +SKIP
        """
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
