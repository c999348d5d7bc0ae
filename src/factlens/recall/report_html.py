"""The capitals analysis as one self-contained HTML page that a person reads.

:func:`render_html` turns a :class:`~factlens.recall.report.CapitalsReport` into a single HTML file, built
with jinja2 from ``factlens/data/templates/capitals_report.html.j2``: every figure inline (plotly.js embedded
once, so the page opens offline), a short explanation under each figure of what it shows and how to read it,
and the model, its mode (compatibility mode or not), the dataset and shots, the date and the factlens,
TransformerLens and torch versions. A random-weight twin's page says so in a banner at the top, and the paper's
reference values (15.5% → 25.9%) are never drawn beside it. Numbers use significant digits.

Example:
    >>> import factlens
    >>> from factlens.recall.report import analyze
    >>> from factlens.recall.report_html import render_html
    >>> report = analyze(factlens.tiny("gpt2"), folds=2, n=24, progress=False)
    >>> page = render_html(report)
    >>> page.count("Random weights."), page.count('class="figure"') >= 4
    (1, True)
"""

from __future__ import annotations

import datetime
import html
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from factlens.display import fmt
from factlens.loading import is_compat, is_twin
from factlens.storage import atomic_write

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

TEMPLATE = "capitals_report.html.j2"
_PAPER_TRACE = "Lv et al. (paper)"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """The machine in words, e.g. ``"CPU (2 threads), no GPU, Linux x86_64"``."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"CPU ({torch.get_num_threads()} threads), {gpu}, {platform.system()} {platform.machine()}"


def model_info(model: TransformerBridge) -> dict[str, Any]:
    """What the report says about a bridge: name, weights (pretrained or random twin), architecture, mode.

    Example:
        >>> import factlens
        >>> from factlens.recall.report_html import model_info
        >>> info = model_info(factlens.tiny("opt"))
        >>> info["name"], info["twin"], info["compat"]
        ('tiny-opt', True, True)
    """
    cfg = model.cfg
    family = getattr(model, "factlens_family", None) or getattr(model.original_model.config, "model_type", "?")
    name = getattr(model, "factlens_name", None) or cfg.model_name
    return {"name": str(name), "family": family, "twin": is_twin(model), "compat": is_compat(model),
            "architecture": f"{family}: {cfg.n_layers} layers × {cfg.n_heads} heads, d_model {cfg.d_model}, "
                            f"d_mlp {cfg.d_mlp}, vocabulary {cfg.d_vocab}",
            "device": str(cfg.device), "dtype": str(getattr(cfg, "dtype", "")).removeprefix("torch.")}


def _figure_html(fig, first: bool) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 80, "r": 30, "t": 70, "b": 60})
    fig.update_yaxes(exponentformat="power")  # 2×10⁻⁵, not plotly's SI "20µ", for probabilities
    return fig.to_html(full_html=False, include_plotlyjs="inline" if first else False,
                       config={"displaylogo": False, "responsive": True})


def _table(df, max_rows: int = 12, percent: tuple[str, ...] = ()) -> str:
    df = df.head(max_rows).copy()
    for col in percent:
        if col in df:
            df[col] = [("" if v is None or v != v else f"{fmt(100 * float(v))}%") for v in df[col]]
    return df.to_html(index=False, border=0, float_format=fmt, na_rep="")


def _drop_paper_markers(fig) -> None:
    fig.data = tuple(t for t in fig.data if getattr(t, "name", None) != _PAPER_TRACE)


def sections(report, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The page's sections: id, title, figures (plotly objects), explanation paragraphs and tables."""
    twin = info["twin"]
    pp, movers, lens = report.path_patching, report.movers, report.lens
    out: list[dict[str, Any]] = []

    out.append(dict(id="logit-lens", title="1. Logit lens", figures=[lens.plot()], tables=[], explain=[
        "<b>What it shows.</b> The mean probability the model gives the first token of the correct answer when the "
        "residual stream at the last prompt position (<code>end</code>), after each layer, is read through the final "
        "LayerNorm and the unembedding. The band is ±1 standard deviation over prompts; hover for the mean rank.",
        "<b>How to read it.</b> The layer where the curve rises is where the answer becomes readable from the "
        "residual stream. In GPT-2, Lv et al. find it in the upper layers, with a fall at the very last layer: "
        "the anti-overconfidence effect that the mitigations in section 6 undo."]))

    out.append(dict(id="path-patching", title="2. Path patching to the final residual", figures=[pp.plot()],
                    tables=[dict(caption="Components with the most negative effect",
                                 html=_table(pp.top(8, by="neg")[["name", "component", "pct_change"]]))],
                    explain=[
        f"<b>What it shows.</b> Each cell is the change, in percent of the clean value "
        f"({html.escape(pp.metric)} = {fmt(pp.clean)}), of the answer metric at <code>end</code> when only the "
        "direct path from one head (columns H0…) or MLP (last column) to the final residual stream carries its "
        "output from counterfactual prompts about other subjects; every other path stays clean.",
        "<b>How to read it.</b> Red (negative) cells are components whose direct output carries the answer: "
        "replacing it lowers the metric. Blue cells push against the answer. Lv et al.'s mover heads are the deep "
        "red cells in the upper layers."]))

    cand = report.mover_candidates
    top_l, top_h = report.top_mover
    out.append(dict(id="movers", title="3. Mover heads",
                    figures=[movers.plot(), movers.plot(int(top_l), int(top_h))],
                    tables=[dict(caption=f"Top path-patching heads as movers (chosen: L{top_l}H{top_h})",
                                 html=_table(cand))],
                    explain=[
        "<b>What it shows.</b> Top: for every head, the Pearson correlation r over prompts between its attention "
        "from <code>end</code> to the subject token and the projection of its output onto the subject's "
        f"unembedding. Bottom: that scatter for L{top_l}H{top_h}, the top path-patching head with the highest r, "
        "one point per prompt.",
        "<b>How to read it.</b> A mover head (Lv et al.'s argument passing) attends to the subject and writes it "
        "into the last position: high r (blue) and high mean attention. The table lists the heads of section 2 "
        "with their mover statistics."]))

    figs, tables = [], []
    for key, res in report.decompositions.items():
        pooled = key.endswith("/pooled")
        mean_rank = float(res.answer_ranks["rank"].mean())
        figs.append(res.plot(title=f"MLP{res.layer}, {'one fit over all prompts' if pooled else 'one fit per subject'}: "
                                   f"Σ β·head + c (R² = {res.r2:.3f}; mean answer rank under c = {mean_rank:.1f})"))
        df = res.intercept_table()
        if not pooled:  # one row per subject: its intercept's top tokens, so that every country is shown
            top = df[df["kind"] == "top"].sort_values("rank")
            df = top.groupby("group", sort=False)["token"].apply(lambda t: " · ".join(map(repr, t.head(5))))
            df = df.rename("top tokens of c").reset_index().rename(columns={"group": "subject"})
        tables.append(dict(caption=f"{key}: tokens of the intercept c read through the unembedding"
                                   + ("" if pooled else ", per subject"), html=_table(df, 10 if pooled else len(df))))
    out.append(dict(id="decomposition", title="4. MLP-output decomposition", figures=figs, tables=tables, explain=[
        "<b>What it shows.</b> The MLP output at <code>end</code> regressed on the outputs of the attention heads "
        "before it: <code>mlp_out ≈ Σ β_j head_j + c</code>, one fit over all prompts (pooled, bars) or one per "
        "subject (heat-map). R² in each title is the share of the MLP output's variance the fit explains.",
        "<b>How to read it.</b> β = −1: the MLP erases head j's contribution; β = 0: it leaves it alone; the share "
        "that survives the MLP is 1 + β. The intercept c is what the MLP adds whatever the heads do; the tables "
        "read it in the vocabulary, with the gold answer's rank in the titles."]))

    final = report.final_layer
    out.append(dict(id="final-layer", title="5. What the last layer does", figures=[final.plot()],
                    tables=[dict(caption="Tokens the last layer promotes and demotes most",
                                 html=_table(final.promoted, 12))],
                    explain=[
        "<b>What it shows.</b> The direct effect, in logits, of each last-layer head, the attention output bias "
        "<code>b_O</code> and the last MLP on the answer's logit at <code>end</code> (through the real final "
        "LayerNorm scale), mean ± one standard deviation over prompts. The title gives the mean P(answer) before "
        "and after the last layer.",
        "<b>How to read it.</b> Negative bars push the answer down. Lv et al. find that GPT-2's last layer lowers "
        "the answer's probability (anti-overconfidence); the two mitigations of section 6 target its attention "
        "heads (a) and its MLP's intercept (b)."]))

    mit = report.mitigation
    fig = mit.plot()
    if twin:
        _drop_paper_markers(fig)
    rows = mit.rows.drop(columns=["paper_prob"] if twin else [], errors="ignore")
    paper_note = ("This model has random weights, so the paper's values are not shown." if twin else
                  "For GPT-2 small zero-shot the paper reports 15.5% → 25.9% (baseline → (a)+(b)); the crosses "
                  "mark those values, shown only for that model.")
    out.append(dict(id="mitigations", title="6. Final-layer mitigations", figures=[fig],
                    tables=[dict(caption="Mean P(first answer token), accuracy and mean rank, out of fold",
                                 html=_table(rows, 20, percent=("mean_prob", "accuracy", "paper_prob")))],
                    explain=[
        "<b>What it shows.</b> The mean probability of the first answer token with no intervention, with (a) the "
        "last layer's heads at <code>end</code> attending only to themselves, with (b) the fitted MLP intercept "
        f"subtracted from the last MLP, and with both. c is fitted on {mit.metadata.get('folds', 'k')}−1 template "
        "folds and evaluated on the held-out one, so no prompt is scored by an intercept fitted on it.",
        f"<b>How to read it.</b> Bars above the baseline mean the mitigation helps. {paper_note}"]))
    return out


def _meta(report, info: dict[str, Any]) -> dict[str, Any]:
    ds = report.dataset
    shots = int(report.mitigation.rows["shots"].iloc[0]) if len(report.mitigation.rows) else getattr(ds, "shots", 0)
    relation = getattr(ds.relation, "name", "relation")
    versions = {p.replace("-", "_"): _version(p) for p in ("factlens", "transformer-lens", "torch", "transformers")}
    mode = ("on (TransformerLens compatibility mode: LayerNorm folded, weights centred)" if info["compat"] else
            "off (raw Hugging Face numerics)")
    weights = ("RANDOM (a factlens random-weight twin; recalls nothing)" if info["twin"] else
               "pretrained checkpoint")
    seconds = sum(report.timings.values())
    rows = [("model", info["name"]), ("weights", weights), ("architecture", info["architecture"]),
            ("mode", mode), ("dataset", f"{relation}: {len(ds)} prompts, {shots}-shot"),
            ("date", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
            ("versions", f"factlens {versions['factlens']}, TransformerLens {versions['transformer_lens']}, "
                         f"torch {versions['torch']}, transformers {versions['transformers']}"),
            ("machine", f"{machine()}; device {info['device']}"),
            ("wall time", f"{seconds:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items())
                          + ")")]
    return {"model": info["name"], "twin": info["twin"], "rows": rows, "versions": versions, "machine": machine(),
            "relation_title": "Country → capital" if relation == "capitals" else relation,
            "date": rows[5][1]}


def _summary_rows(report) -> list[tuple[str, str]]:
    out = []
    for key, value in report.summary().items():
        label = key.replace("_", " ")
        if key.startswith(("P ", "prob", "delta_prob")):
            value = f"{fmt(100 * value)}%"
        elif key.endswith("_pct"):
            label, value = label.removesuffix(" pct") + " (% change)", f"{fmt(value)}%"
        out.append((label, fmt(value) if not isinstance(value, str) else value))
    return out


def render_html(report, path: str | Path | None = None, *, model_info: dict[str, Any] | None = None,
                files: list[str] | tuple[str, ...] = ()) -> str:
    """The report as one self-contained HTML page; written atomically to ``path`` when given.

    Args:
        report: A :class:`~factlens.recall.report.CapitalsReport`.
        path: Where to write the page (``None``: only return it).
        model_info: :func:`model_info` of the analysed model (default: the report's ``model_info``).
        files: Names of table files written next to the page, linked at the end.
    """
    import jinja2

    info = model_info or getattr(report, "model_info", None) or {}
    info = {"name": "model", "twin": False, "compat": False, "architecture": "", "device": "", **info}
    secs = sections(report, info)
    first = True
    for section in secs:
        rendered = []
        for fig in section["figures"]:
            rendered.append(_figure_html(fig, first))
            first = False
        section["figures"] = rendered
    env = jinja2.Environment(loader=jinja2.PackageLoader("factlens", "data/templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    page = env.get_template(TEMPLATE).render(meta=_meta(report, info), summary=_summary_rows(report), sections=secs,
                                             notes=report.notes, files=list(files))
    if path is not None:
        atomic_write(path, page)
    return page


__all__ = ["TEMPLATE", "machine", "model_info", "render_html", "sections"]
