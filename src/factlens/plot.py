"""Shared plotting helpers: an attention-pattern viewer with token labels, and several training runs on one figure.

Every factlens result type has its own ``.plot()``; this module holds the viewers that work on raw model
activations.

Example:
    >>> import torch, factlens
    >>> model = factlens.tiny("gpt2", compat=True)
    >>> fig = attention_patterns(model, "The capital of France is", heads=[(0, 1), (1, 3)])
    >>> fig.layout.title.text
    'Attention patterns'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from factlens.hooks import resolve_heads, resolve_layers

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def attention_patterns(model: TransformerBridge, text: str | Int[torch.Tensor, "1 pos"], heads: Sequence[tuple[int, int]],
                       *, prepend_bos: bool | None = None, title: str = "Attention patterns"):
    """Heat-maps of the post-softmax patterns of chosen ``(layer, head)`` pairs, with token labels.

    Rows are query (destination) tokens, columns key (source) tokens; hovering shows both tokens and the weight.

    Args:
        model: a factlens bridge (GPT-2 or OPT).
        text: a prompt, or a ``[1, pos]`` token tensor.
        heads: ``(layer, head)`` pairs (negative indices count from the end).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tokens = model.to_tokens(text, prepend_bos=prepend_bos) if isinstance(text, str) else text
    labels = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    pairs = [(resolve_layers(model, layer)[0], resolve_heads(model, head)[0]) for layer, head in heads]
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in pairs}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=[f"L{layer}H{head}" for layer, head in pairs],
                        horizontal_spacing=0.18)
    for i, (layer, head) in enumerate(pairs):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head].float().cpu()  # [q, k]
        hover = [[f"query {labels[q]}<br>key {labels[k]}<br>weight {pattern[q, k]:.3f}" for k in range(len(labels))]
                 for q in range(len(labels))]
        fig.add_trace(go.Heatmap(z=pattern.numpy(), x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                                 text=hover, hoverinfo="text", showscale=i == len(pairs) - 1,
                                 colorbar=dict(title="weight")), 1, i + 1)
        fig.update_xaxes(title_text="key (source) token", tickangle=-45, row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
    fig.update_yaxes(title_text="query (destination) token", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=420 + 12 * len(labels),
                      width=max(500, 380 * len(pairs)))
    return fig


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
    import math

    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from factlens.errors import ConfigError

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
