"""The whole Lv et al. capitals analysis in one call, written out as tables and figures.

:func:`analyze` runs: dataset → logit lens → path patching (heads/MLPs → final residual) → mover check of
the top path-patching heads → MLP decomposition at the layer after the top mover and at the last layer
(pooled and per subject) → final-layer effect → mitigation table. Every step caches only ``end``, so
full-size GPT-2 small on the 225 zero-shot prompts runs in a few minutes on two CPU cores.

One clean pass serves every step: each analysis declares the hooks it reads (``logit_lens_hooks``,
``path_patch_hooks``, ...), :func:`shared_hooks` is their union, and each step reads its hooks from the
shared run (a step that read an undeclared hook would raise, not run a pass of its own).

Example:
    >>> import tempfile, factlens
    >>> from factlens.recall import analyze
    >>> report = analyze(factlens.tiny("gpt2"), out_dir=tempfile.mkdtemp(), folds=3, progress=False)
    >>> print(report.to_markdown())                                     # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.progress import tqdm
from factlens.recall.datasets import RelationDataset, dataset_for
from factlens.recall.final_layer import FinalLayerEffect, final_layer_effect, final_layer_hooks
from factlens.recall.forward import require_eval, run_at_end
from factlens.recall.lens import LogitLensResult, logit_lens, logit_lens_hooks
from factlens.recall.mitigation import MitigationTable, mitigation_hooks, mitigation_table
from factlens.recall.mlp_decomposition import (
    MLPDecompositionResult,
    capture_mlp_activations,
    decompose_from_activations,
    mlp_activation_hooks,
)
from factlens.recall.movers import MoverResult, mover_hooks, mover_scores
from factlens.recall.path_patching import PathPatchingResult, path_patch, path_patch_hooks
from factlens.recall.relations import CAPITALS, Relation
from factlens.recall.report_html import model_info, render_html
from factlens.storage import atomic_write

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


SUMMARY_LABELS = {
    "n_prompts": "prompts", "prob_before": "P(answer) before the last layer",
    "prob_after": "P(answer) after the last layer", "delta_prob": "change of P(answer) in the last layer",
    "rank_before": "answer rank before the last layer", "rank_after": "answer rank after the last layer",
    "top_sender": "strongest sender (path patching)", "top_sender_pct": "its change of the answer logit (%)",
    "top_mover": "top mover head", "P baseline": "P(answer), no mitigation",
    "P a": "P(answer), (a) last-layer heads attend to themselves", "P b": "P(answer), (b) MLP intercept removed",
    "P a+b": "P(answer), (a) + (b)", "seconds": "wall time (s)"}
"""Plain labels for the keys of :meth:`CapitalsReport.summary` in :meth:`CapitalsReport.to_markdown`."""


@dataclass
class CapitalsReport(ResultDisplay):
    """Everything :func:`analyze` computed (each part has ``to_dataframe()`` and ``plot()``).

    Attributes:
        dataset: The prompts.
        lens: Logit lens. path_patching: Heads/MLPs → final residual. movers: Mover check of every head.
        mover_candidates: The top path-patching heads with their mover statistics; top_mover: ``(layer, head)``.
        decompositions: ``"MLP{l}/pooled"`` / ``"MLP{l}/subject"`` → :class:`MLPDecompositionResult`.
        final_layer: :class:`FinalLayerEffect`. mitigation: :class:`MitigationTable`.
        timings: Seconds per step. files: Written files (after :meth:`save`).
    """

    dataset: RelationDataset
    lens: LogitLensResult
    path_patching: PathPatchingResult
    movers: MoverResult
    mover_candidates: pd.DataFrame
    top_mover: tuple[int, int]
    decompositions: dict[str, MLPDecompositionResult]
    final_layer: FinalLayerEffect
    mitigation: MitigationTable
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    model_info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Headline numbers."""
        out: dict[str, Any] = {"n_prompts": len(self.dataset), **self.lens.final_layer_effect()}
        top = self.path_patching.top(1, by="neg").iloc[0]
        out.update(top_sender=top["name"], top_sender_pct=float(top["pct_change"]),
                   top_mover=f"L{self.top_mover[0]}H{self.top_mover[1]}")
        for key, res in self.decompositions.items():
            out[f"{key} R2"] = res.r2
            out[f"{key} mean answer rank"] = float(res.answer_ranks["rank"].mean())
        shots = int(self.mitigation.rows["shots"].iloc[0])
        for m in ("baseline", "a", "b", "a+b"):
            out[f"P {m}"] = self.mitigation.cell(shots, m)
        out["seconds"] = sum(self.timings.values())
        return out

    def to_markdown(self) -> str:
        """A short markdown summary: headline numbers and the mitigation table."""
        lines = ["# Capitals analysis", ""]
        if self.model_info.get("twin"):  # the same warning as the HTML report's banner
            lines += [f"> **Random weights.** {self.model_info.get('name', 'This model')} is a factlens random-weight "
                      "twin: it recalls nothing, so these numbers test the pipeline, not a trained model.", ""]
        lines += ["| quantity | value |", "|---|---|"]
        for k, v in self.summary().items():
            k = SUMMARY_LABELS.get(k, k)
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines += ["", "## Mitigations", "", self.mitigation.to_markdown()]
        if self.notes:
            lines += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write CSV/markdown tables into ``out_dir`` and ``report.html``: one self-contained page with every
        figure inline and an explanation under each (:func:`factlens.recall.report_html.render_html`)."""
        from factlens.storage import check_writable_dir

        out = check_writable_dir(out_dir, create=True)  # a file, a read-only or full disk: a StorageError naming the path
        files: list[tuple[str, Path]] = []

        def table(name: str, df: pd.DataFrame, label: str) -> None:
            atomic_write(out / name, df.to_csv(index=False))
            files.append((label, out / name))

        table("prompts.csv", self.dataset.to_dataframe(), "prompts (CSV)")
        table("logit_lens.csv", self.lens.to_dataframe(), "logit lens (CSV)")
        table("path_patching.csv", self.path_patching.to_dataframe(), "path patching (CSV)")
        table("movers.csv", self.movers.to_dataframe(), "mover statistics (CSV)")
        table("mover_candidates.csv", self.mover_candidates, "top path-patching heads as movers (CSV)")
        for key, res in self.decompositions.items():
            stem = key.replace("/", "_").lower()
            table(f"{stem}_beta.csv", res.to_dataframe(), f"{key}: β (CSV)")
            table(f"{stem}_intercept.csv", res.intercept_table(), f"{key}: intercept top tokens (CSV)")
            table(f"{stem}_answer_ranks.csv", res.answer_ranks, f"{key}: gold-answer ranks (CSV)")
        table("final_layer.csv", self.final_layer.to_dataframe(), "final-layer direct effects (CSV)")
        table("final_layer_tokens.csv", self.final_layer.promoted, "tokens the last layer promotes (CSV)")
        self.mitigation.to_csv(out / "mitigation.csv")
        files.append(("mitigation table (CSV)", out / "mitigation.csv"))
        atomic_write(out / "mitigation.md", self.mitigation.to_markdown() + "\n")
        files.append(("mitigation table (markdown)", out / "mitigation.md"))
        atomic_write(out / "summary.md", self.to_markdown() + "\n")
        files.append(("summary (markdown)", out / "summary.md"))
        render_html(self, out / "report.html", files=[p.name for _, p in files])
        self.files = [p for _, p in files] + [out / "report.html"]
        return self.files


def shared_hooks(model: TransformerBridge) -> list[str]:
    """The hooks of :func:`analyze`'s shared clean pass: the union of the hooks its steps declare.

    The MLP decomposition's layer is chosen from path patching's result, so every layer's MLP hooks are in.

    Example:
        >>> import factlens
        >>> from factlens.recall.path_patching import path_patch_hooks
        >>> from factlens.recall.report import shared_hooks
        >>> model = factlens.tiny("gpt2")
        >>> set(path_patch_hooks(model)) <= set(shared_hooks(model))
        True
    """
    L = model.cfg.n_layers
    declared = [logit_lens_hooks(model), path_patch_hooks(model), mover_hooks(model),
                *(mlp_activation_hooks(model, layer) for layer in range(L)), final_layer_hooks(model),
                mitigation_hooks(model)]
    return list(dict.fromkeys(name for names in declared for name in names))


ANALYSIS_PASSES = 8.0
""":func:`analyze`'s wall time in plain forward passes of its prompts (no hooks), as measured on GPT-2-small and
tiny twins, zero-shot, on CPU (``benchmarks/bench_analyze_estimate.py`` prints the ratio; docs/performance.md)."""


def estimate_analysis(model: TransformerBridge, relation: Relation = CAPITALS, shots: int = 0, *,
                      n: int | None = None, seed: int = 0, max_batch: int = 64) -> tuple[float, float]:
    """``(seconds of one plain forward pass of the prompts, estimated seconds of analyze)`` on this machine now.

    The pass is timed here, after a two-prompt pass that takes the one-time set-up (its prompts are
    :func:`analyze`'s own); the estimate is that time × :data:`ANALYSIS_PASSES`.

    Example:
        >>> import factlens
        >>> from factlens.recall.report import estimate_analysis
        >>> one_pass, total = estimate_analysis(factlens.tiny("gpt2"))
        >>> 0 < one_pass < total
        True
    """
    require_eval(model, "estimate_analysis")
    ds = dataset_for(model, relation, shots=shots, seed=seed, n=n)
    run_at_end(model, ds.select(range(min(2, len(ds)))), (), max_batch=max_batch)  # one-time set-up, not timed
    t0 = time.perf_counter()
    run_at_end(model, ds, (), max_batch=max_batch)
    one_pass = time.perf_counter() - t0
    return one_pass, one_pass * ANALYSIS_PASSES


def analyze(model: TransformerBridge, relation: Relation = CAPITALS, shots: int = 0, out_dir: str | Path | None = None, *,
            n: int | None = None, folds: int = 5, top_k: int = 3, seed: int = 0, max_batch: int = 64,
            patch_batch: int = 1024, progress: bool = True) -> CapitalsReport:
    """Run the full analysis on ``model`` (see the module docstring); write it to ``out_dir`` if given.

    One cached clean pass (:func:`shared_hooks` at ``end``) serves the logit lens, path patching's pass B, the
    mover check, the decompositions, the final-layer effect and the mitigation baseline, and the mitigation
    folds reuse it: three forward passes of the prompts. The tests check every result against each step run
    on its own (``tests/reference_recall.py``).

    Args:
        relation, shots, n, seed: The prompts (:func:`~factlens.recall.datasets.dataset_for`).
        folds: k of the mitigation table's template folds.
        top_k: Path-patching heads (most negative effect) checked as movers.
        max_batch: Prompts per forward pass; patch_batch: rows (sender × prompt) per path-patching step.

    Example:
        >>> import factlens
        >>> from factlens.recall import analyze
        >>> report = analyze(factlens.full_size("gpt2"), out_dir="gpt2_report")    # doctest: +SKIP
    """
    require_eval(model, "analyze")
    if out_dir is not None:  # refuse an unwritable out_dir before the analysis, not after it
        from factlens.storage import check_writable_dir

        check_writable_dir(out_dir)
    timings: dict[str, float] = {}
    notes: list[str] = []

    # one progress display for every stage (the stages' own bars stay off), labelled in plain words
    bar = tqdm(total=8, desc="capitals analysis", unit="stage", disable=not progress)

    def timed(name, fn, *args, **kwargs):
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t0
        bar.update(1)
        return out

    L = model.cfg.n_layers
    ds = timed("dataset", dataset_for, model, relation, shots=shots, seed=seed, n=n)
    clean = timed("clean run", run_at_end, model, ds, shared_hooks(model), max_batch=max_batch,
                  progress=False, desc="clean run")  # serves every analysis below
    lens = timed("logit lens", logit_lens, model, ds, max_batch=max_batch, progress=False, run=clean)
    pp = timed("path patching", path_patch, model, ds, metric="iw", max_batch=patch_batch, seed=seed,
               progress=False, run=clean)
    movers = timed("mover heads", mover_scores, model, ds, max_batch=max_batch, progress=False, run=clean)
    cand = pp.top(top_k, by="neg", component="head")[["layer", "head", "name", "pct_change"]]
    stats = movers.to_dataframe().set_index(["layer", "head"])
    cand = cand.join(stats[["r", "mean_attention", "mean_projection", "score"]], on=["layer", "head"])
    best = cand.sort_values("r", ascending=False, na_position="last").iloc[0]
    top_mover = (int(best["layer"]), int(best["head"]))
    decomps: dict[str, MLPDecompositionResult] = {}
    t0 = time.perf_counter()
    bar.set_postfix_str("MLP decomposition")
    for layer in dict.fromkeys([min(top_mover[0] + 1, L - 1), L - 1]):
        acts = capture_mlp_activations(model, ds, layer, max_batch=max_batch, progress=False, run=clean)
        decomps[f"MLP{layer}/pooled"] = decompose_from_activations(model, acts, ds)
        try:
            decomps[f"MLP{layer}/subject"] = decompose_from_activations(model, acts, ds, group_by="subject")
        except ConfigError as err:
            notes.append(f"per-subject decomposition of MLP{layer} skipped: {err}")
    timings["MLP decomposition"] = time.perf_counter() - t0
    bar.update(1)
    final = timed("final layer", final_layer_effect, model, ds, max_batch=max_batch, run=clean)
    table = timed("mitigation table", mitigation_table, model, relation, shots=[shots], folds=folds, seed=seed,
                  n=n, max_batch=max_batch, progress=False, runs={shots: clean})
    bar.close()
    if torch.device(model.cfg.device).type == "cpu":
        notes.append(f"CPU, {torch.get_num_threads()} threads; timings in seconds: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    report = CapitalsReport(dataset=ds, lens=lens, path_patching=pp, movers=movers, mover_candidates=cand,
                            top_mover=top_mover, decompositions=decomps, final_layer=final, mitigation=table,
                            timings=timings, notes=notes, model_info=model_info(model))
    if out_dir is not None:
        report.save(out_dir)
    return report


__all__ = ["ANALYSIS_PASSES", "CapitalsReport", "analyze", "estimate_analysis", "shared_hooks"]
