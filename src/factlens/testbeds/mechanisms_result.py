"""The result of :func:`~factlens.testbeds.mechanisms.mechanisms`: its measurements, figure and files.

:class:`MechanismsResult` holds Lv et al.'s measurements at each checkpoint of a biography run, per attribute
(``[step, attribute, measure]`` in :data:`MEASURES` order), with the final layer's change of the answer logit
split into :data:`FINAL_PARTS`, the top path-patching heads, the logit lens, the mitigations and the phases
of the loss curve. :func:`plot_mechanisms` draws them on one training-step axis; :func:`write_mechanisms`
writes the tables and the figure to a folder.

Example:
    >>> import torch
    >>> from factlens.testbeds.mechanisms_result import FINAL_PARTS, MEASURES, MechanismsResult
    >>> steps = [0, 100, 200]
    >>> values = torch.zeros(len(steps), 1, len(MEASURES), dtype=torch.float64)
    >>> values[:, 0, MEASURES.index("delta_prob")] = torch.tensor([0.0, -0.01, -0.02], dtype=torch.float64)
    >>> res = MechanismsResult(steps=steps, attributes=["birth_place"], values=values,
    ...                        final_logit=torch.zeros(len(steps), 1, len(FINAL_PARTS), dtype=torch.float64),
    ...                        top_heads=None, attr_loss=torch.tensor([3.0, 2.5, 1.0], dtype=torch.float64),
    ...                        loss_steps=steps, loss_curve=[3.0, 2.5, 1.0], baseline=3.0, drop_end=None,
    ...                        plateau_end=None)
    >>> res.suppression_from()
    100
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float

from factlens.errors import ConfigError
from factlens.storage import atomic_write
from factlens.testbeds.mitigations import MITIGATIONS

#: Per (step, attribute) measurements, in :attr:`MechanismsResult.values` order.
MEASURES = ("prob", "accuracy", "top_head_effect", "top_head_pct", "name_attention", "name_attention_max",
            "mover_score", "mover_r",
            "mlp_r2", "type_purity", "prob_before", "prob_after", "delta_prob", "delta_logit",
            "prob_a", "prob_b", "prob_ab", "accuracy_a", "accuracy_b", "accuracy_ab")

#: Parts of the final layer's change of the answer logit, in :attr:`MechanismsResult.final_logit` order.
FINAL_PARTS = ("heads", "attn_bias", "mlp", "ln_scale")


@dataclass
class MechanismsResult:
    """Lv et al.'s measurements at each checkpoint of a biography run, per attribute.

    Attributes:
        steps: Checkpoint steps; attributes: attribute names.
        values: ``[step, attribute, measure]`` (see :data:`MEASURES`); axes :attr:`axis_names`.
        final_logit: ``[step, attribute, part]`` mean change of the answer logit across the last layer, split
            into :data:`FINAL_PARTS` (they add up to ``delta_logit``).
        top_heads: One row per (step, attribute, rank): the top path-patching sender heads and their effect.
        attr_loss: ``[step]`` attribute loss (nats, mean over the 6 attributes) on held-out biographies.
        lens / lens_accuracy: ``[step, attribute, layer]`` mean P(answer) and accuracy read by the logit lens
            after each layer (the last layer's equals the model's own).
        mitigations: One row per (step, attribute, method in :data:`MITIGATIONS`): mean_prob, accuracy,
            mean_rank, n_prompts (see :func:`~factlens.testbeds.mitigations.mitigation_rows`); folds: the k of its out-of-fold intercepts.
        loss_steps / loss_curve: The loss curve used for the phases (``metrics.jsonl`` when present, else
            ``attr_loss``); baseline: the no-knowledge attribute loss (nats); drop_end / plateau_end: steps.
    """

    steps: list[int]
    attributes: list[str]
    values: Float[torch.Tensor, "step attribute measure"]
    final_logit: Float[torch.Tensor, "step attribute part"]
    top_heads: object  # pandas.DataFrame
    attr_loss: Float[torch.Tensor, " step"]
    loss_steps: list[int]
    loss_curve: list[float]
    baseline: float
    drop_end: int | None
    plateau_end: int | None
    lens: Float[torch.Tensor, "step attribute layer"] | None = None
    lens_accuracy: Float[torch.Tensor, "step attribute layer"] | None = None
    mitigations: object = None  # pandas.DataFrame, one row per (step, attribute, method)
    folds: int = 5
    run_dir: str = ""
    n_prompts: int = 0
    seconds: float = float("nan")
    measures: tuple[str, ...] = MEASURES
    parts: tuple[str, ...] = FINAL_PARTS
    axis_names: tuple[str, ...] = field(default=("step", "attribute", "measure"))

    def measure(self, name: str) -> Float[torch.Tensor, "step attribute"]:
        """``[step, attribute]`` values of one measure."""
        if name not in self.measures:
            raise ConfigError(f"unknown measure {name!r}; pick one of {self.measures}")
        return self.values[:, :, self.measures.index(name)]

    def suppression_from(self, attribute: str | None = None, tol: float = 0.0) -> int | None:
        """First step from which the last layer lowers mean P(answer) (``delta_prob < −tol``) at every later
        checkpoint, for one attribute (default: the mean over attributes); None if it does not at the end."""
        delta = self.measure("delta_prob")
        d = delta.mean(1) if attribute is None else delta[:, self._attr(attribute)]
        start = None
        for i in range(len(self.steps) - 1, -1, -1):
            if float(d[i]) < -tol:
                start = self.steps[i]
            else:
                break
        return start

    def _attr(self, attribute: str) -> int:
        if attribute not in self.attributes:
            raise ConfigError(f"attribute {attribute!r} was not analysed; pick one of {self.attributes}")
        return self.attributes.index(attribute)

    def phases(self) -> list[tuple[str, int, int]]:
        """``(name, start step, end step)`` of the phases that the loss curve shows."""
        lo, hi = self.loss_steps[0], self.loss_steps[-1]
        out = []
        if self.drop_end is not None:
            out.append(("1 initial drop", lo, self.drop_end))
            out.append(("2 plateau", self.drop_end, self.plateau_end if self.plateau_end is not None else hi))
        if self.plateau_end is not None:
            out.append(("3 knowledge", self.plateau_end, hi))
        return out

    def mitigation_table(self, step: int | None = None):
        """Mean P(answer) and accuracy per attribute and method at one checkpoint (default: the last), wide.

        Example:
            >>> from factlens.testbeds.mechanisms import mechanisms
            >>> res = mechanisms("runs/demo")    # doctest: +SKIP
            >>> res.mitigation_table()            # doctest: +SKIP
        """
        if self.mitigations is None or len(self.mitigations) == 0:
            raise ConfigError("this result has no mitigation rows; run mechanisms(...) to compute them")
        step = self.steps[-1] if step is None else step
        if step not in self.steps:
            raise ConfigError(f"step {step} was not analysed; pick one of {self.steps}")
        sel = self.mitigations[self.mitigations["step"] == step]
        return sel.pivot(index="attribute", columns="method", values=["mean_prob", "accuracy"])[
            [(v, m) for v in ("mean_prob", "accuracy") for m in MITIGATIONS]]

    def to_dataframe(self):
        """One row per (step, attribute): every measure, the final-layer parts (``final_<part>``) and the
        attribute loss of that checkpoint."""
        import pandas as pd

        rows = []
        for i, step in enumerate(self.steps):
            for j, attr in enumerate(self.attributes):
                row = {"step": step, "attribute": attr, "attr_loss": float(self.attr_loss[i])}
                row.update({m: float(v) for m, v in zip(self.measures, self.values[i, j].tolist())})
                row.update({f"final_{p}": float(v) for p, v in zip(self.parts, self.final_logit[i, j].tolist())})
                rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        last = self.values[-1].mean(0)
        get = dict(zip(self.measures, last.tolist()))
        sup = self.suppression_from()
        return (f"MechanismsResult({len(self.steps)} checkpoints {self.steps[0]}..{self.steps[-1]}, "
                f"{len(self.attributes)} attributes, {self.n_prompts} prompts each; last: P={get['prob']:.3f}, "
                f"acc={get['accuracy']:.3f}, name attention={get['name_attention']:.3f}, "
                f"type purity={get['type_purity']:.2f}, final-layer ΔP={get['delta_prob']:+.4f}; plateau end "
                f"{self.plateau_end}; suppression from {sup})")

    def plot(self, title: str | None = None):
        """All measurements on the training-step axis, with the baseline, the phases and the plateau end."""
        return plot_mechanisms(self, title)


def check_out(out: str | Path) -> Path:
    """The output folder, refused (ConfigError) when it is an existing file."""
    from factlens.storage import check_writable_dir

    return check_writable_dir(out, "pass a writable folder as --out (the run folder may be read-only)")


def write_mechanisms(result: MechanismsResult, out: str | Path, *, png: bool = True) -> list[Path]:
    """Write ``mechanisms.csv``, ``top_heads.csv``, ``mitigations.csv``, ``logit_lens.csv``, ``mechanisms.html``
    and (with kaleido + Chrome installed) ``mechanisms.png`` to ``out``, each atomically; returns the paths written.

    Example:
        >>> from factlens.testbeds.mechanisms_result import write_mechanisms
        >>> from factlens.testbeds.mechanisms import mechanisms
        >>> result = mechanisms("runs/demo")                                    # doctest: +SKIP
        >>> write_mechanisms(result, "runs/demo/mechanisms")                    # doctest: +SKIP
    """
    out = check_out(out)
    fig = result.plot()  # build everything before writing anything
    files = {"mechanisms.csv": result.to_dataframe().to_csv(index=False).encode(),
             "top_heads.csv": result.top_heads.to_csv(index=False).encode(),
             "mechanisms.html": fig.to_html().encode()}
    if result.mitigations is not None and len(result.mitigations):
        files["mitigations.csv"] = result.mitigations.to_csv(index=False).encode()
    if result.lens is not None:
        import pandas as pd

        lens = pd.DataFrame([{"step": step, "attribute": attr, "layer": layer,
                              "prob": float(result.lens[i, j, layer]), "accuracy": float(result.lens_accuracy[i, j, layer])}
                             for i, step in enumerate(result.steps) for j, attr in enumerate(result.attributes)
                             for layer in range(result.lens.shape[2])])
        files["logit_lens.csv"] = lens.to_csv(index=False).encode()
    if png:
        with contextlib.suppress(Exception):  # kaleido/Chrome not installed: the HTML is the figure
            files["mechanisms.png"] = fig.to_image(format="png", scale=1)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write(out / name, data)
    return [out / name for name in files]


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_LAYER_COLOURS = ("#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
_METHOD_COLOURS = {"baseline": "black", "a": "#1f77b4", "b": "#ff7f0e", "a+b": "#2ca02c"}
_PART_COLOURS = {"heads": "#1f77b4", "attn_bias": "#7f7f7f", "mlp": "#2ca02c", "ln_scale": "#d62728"}


def plot_mechanisms(res: MechanismsResult, title: str | None = None):
    """The figure of :meth:`MechanismsResult.plot` (one row per mechanism, a shared training-step axis)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [("Attribute loss (nats)", None), ("Recall: P(first value token) — solid, accuracy — dotted", None),
            ("Path patching: top head's effect on the answer logit (logits)", None),
            ("Attention to the name: top head — solid, best head — dash; top head's mover score — dotted", None),
            ("Last MLP: R² — solid; intercept type purity — dotted", None),
            ("Final layer: ΔP(answer) across the last layer", None),
            ("Final layer: Δ answer logit by part (mean over attributes)", None)]
    extra = []
    if res.lens is not None:
        extra.append("Logit lens: P(answer) after each layer (mean over attributes)")
    if res.mitigations is not None and len(res.mitigations):
        extra.append(f"Mitigations: mean P(answer) — solid, accuracy — dotted ({res.folds}-fold intercepts)")
    rows += [(t, None) for t in extra]
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.035,
                        subplot_titles=[r[0] for r in rows])
    x = res.steps
    fig.add_trace(go.Scatter(x=res.loss_steps, y=res.loss_curve, mode="lines+markers", name="attribute loss",
                             line={"color": "black"},
                             hovertemplate="step %{x}<br>attribute loss %{y:.3f} nats<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(x=[min(res.loss_steps + x), max(res.loss_steps + x)], y=[res.baseline] * 2, mode="lines",
                             name=f"no-knowledge baseline ({res.baseline:.3f} nats)",
                             line={"color": "grey", "dash": "dash"}), 1, 1)
    fig.add_hline(y=res.baseline, line={"color": "grey", "dash": "dash"}, row=1, col=1)  # visible at one checkpoint
    pairs = [(2, "prob", "accuracy", None), (3, "top_head_effect", None, None),
             (4, "name_attention", "mover_score", "name_attention_max"), (5, "mlp_r2", "type_purity", None),
             (6, "delta_prob", None, None)]
    for j, attr in enumerate(res.attributes):
        colour = _COLOURS[j % len(_COLOURS)]
        for row, solid, dotted, dashed in pairs:
            for name, dash in ((solid, "solid"), (dotted, "dot"), (dashed, "dash")):
                if name is None:
                    continue
                fig.add_trace(go.Scatter(
                    x=x, y=res.measure(name)[:, j].tolist(), mode="lines+markers", name=attr, legendgroup=attr,
                    showlegend=row == 2 and dash == "solid", line={"color": colour, "dash": dash},
                    hovertemplate=f"{attr}<br>step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"), row, 1)
    mean_parts = res.final_logit.mean(1)  # [step, part]
    for p, part in enumerate(res.parts):
        fig.add_trace(go.Scatter(x=x, y=mean_parts[:, p].tolist(), mode="lines+markers", name=f"Δ logit: {part}",
                                 line={"color": _PART_COLOURS[part]},
                                 hovertemplate=f"{part}<br>step %{{x}}<br>%{{y:+.4f}} logits<extra></extra>"), 7, 1)
    fig.add_hline(y=0, line={"color": "grey", "width": 1}, row=6, col=1)
    fig.add_hline(y=0, line={"color": "grey", "width": 1}, row=7, col=1)
    row = 8
    if res.lens is not None:
        lens = res.lens.mean(1)  # [step, layer]
        for layer in range(lens.shape[1]):
            fig.add_trace(go.Scatter(x=x, y=lens[:, layer].tolist(), mode="lines+markers", name=f"after layer {layer}",
                                     line={"color": _LAYER_COLOURS[layer % len(_LAYER_COLOURS)]},
                                     hovertemplate=f"after layer {layer}<br>step %{{x}}<br>P %{{y:.4f}}<extra></extra>"),
                          row, 1)
        row += 1
    if res.mitigations is not None and len(res.mitigations):
        mean = res.mitigations.groupby(["step", "method"])[["mean_prob", "accuracy"]].mean()
        for m in MITIGATIONS:
            sub = mean.xs(m, level="method").reindex(x)
            for col, dash in (("mean_prob", "solid"), ("accuracy", "dot")):
                fig.add_trace(go.Scatter(x=x, y=sub[col].tolist(), mode="lines+markers", name=f"mitigation {m}",
                                         legendgroup=f"mitigation {m}", showlegend=dash == "solid",
                                         line={"color": _METHOD_COLOURS[m], "dash": dash},
                                         hovertemplate=f"{m}<br>step %{{x}}<br>{col} %{{y:.4f}}<extra></extra>"),
                              row, 1)
    shades = {"1 initial drop": "rgba(255,127,14,0.10)", "2 plateau": "rgba(127,127,127,0.13)",
              "3 knowledge": "rgba(44,160,44,0.10)"}
    for name, lo, hi in res.phases():
        fig.add_vrect(x0=lo, x1=hi, fillcolor=shades[name], line_width=0, layer="below", row="all", col=1)
        fig.add_annotation(x=(lo + hi) / 2, y=0.98, xref="x", yref="y domain", yanchor="top", text=f"phase {name}",
                           showarrow=False, font={"size": 10})
    if res.plateau_end is not None:
        fig.add_vline(x=res.plateau_end, line={"color": "green", "dash": "dash"}, row="all", col=1)
    sup = res.suppression_from()
    if sup is not None:
        fig.add_vline(x=sup, line={"color": "red", "dash": "dot"}, row=6, col=1)
    y_titles = ["nats", "P / accuracy", "Δ iw (logits)", "attention / score", "R² / purity", "Δ P", "Δ logit",
                *(["P(answer)"] if res.lens is not None else []),
                *(["P / accuracy"] if res.mitigations is not None and len(res.mitigations) else [])]
    for i, t in enumerate(y_titles, start=1):
        fig.update_yaxes(title_text=t, row=i, col=1)
    fig.update_xaxes(title_text="training step", row=len(rows), col=1)
    phase_note = (f"plateau end {res.plateau_end}" if res.plateau_end is not None
                  else "plateau end not visible" + (" (one checkpoint)" if len(x) < 2 else ""))
    fig.update_layout(
        title=title or (f"Recall mechanisms over training — {Path(res.run_dir).name or 'run'} ({phase_note}; "
                        f"final-layer suppression from {sup if sup is not None else '—'})"),
        template="plotly_white", height=1700 + 240 * len(extra), width=1000, legend={"tracegroupgap": 4})
    return fig


__all__ = ["FINAL_PARTS", "MEASURES", "MechanismsResult", "check_out", "plot_mechanisms", "write_mechanisms"]
