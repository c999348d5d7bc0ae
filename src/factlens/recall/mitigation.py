"""Lv et al.'s two mitigations of the final-layer anti-overconfidence mechanism (§6) and their table.

The mechanism itself is detected in :mod:`factlens.recall.final_layer`. Mitigations, applied at each prompt's
``end`` in the last layer only:

- **(a)** every (or the chosen) last-layer head attends only to its own position:
  ``factlens.attend_to_self(model, layers=-1, positions=dataset.end, heads=heads)``;
- **(b)** subtract the last MLP's intercept c (:func:`fit_intercept`) from its output:
  ``factlens.add_vector(model, c, coeff=-alpha, layer=-1, component="mlp_out", positions=dataset.end)``,
  the same as subtracting c from the residual before ``ln_final``. A c (nearly) parallel to all-ones does
  nothing, because ``ln_final`` subtracts the mean; factlens warns.

:func:`mitigation_table` fits c and evaluates on **disjoint** prompts (k folds split by template) and reports
mean P(first answer token), accuracy and mean rank for baseline, (a), (b) and (a)+(b), from two forward
passes per setting (clean and (a)); (b) reaches the logits only through the final residual at ``end``, so it
is applied to theirs. :func:`mitigate` is the same edit as a context manager around any forward or
``model.generate``.

Example:
    >>> import factlens
    >>> from factlens.recall import fit_intercept, mitigate, dataset_for
    >>> model = factlens.tiny("gpt2")
    >>> c = fit_intercept(model, dataset_for(model))
    >>> tokens = model.to_tokens("The capital of France is", prepend_bos=False)
    >>> with mitigate(model, intercept=c, attention=True):
    ...     out = model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int

from factlens.display import ResultDisplay
from factlens.edits import Positions, add_vector, attend_to_self
from factlens.errors import ConfigError, ShapeError
from factlens.indices import check_index
from factlens.intervening import intervene
from factlens.loading import is_twin
from factlens.models import SUPPORTED, family_of
from factlens.recall.datasets import RelationDataset, dataset_for
from factlens.recall.forward import EndRun, center, require_eval, reuse_run, run_at_end
from factlens.recall.metrics import answer_prob, answer_rank
from factlens.recall.mlp_decomposition import MLPActivations, capture_mlp_activations, mlp_activation_hooks
from factlens.recall.regression import check_ridge, fit_decomposition, fit_per_group
from factlens.recall.relations import CAPITALS, Relation
from factlens.resources import memory_usage, track
from factlens.storage import atomic_write

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Intercept = Float[torch.Tensor, " d"] | Float[torch.Tensor, "n d"] | Mapping[str, torch.Tensor]
METHODS = {"baseline": "baseline", "a": "(a) attend to self", "b": "(b) − intercept", "a+b": "(a) + (b)"}
#: Lv et al.'s published mean P(first answer token), GPT-2 small zero-shot (lv2024.md §6; from a summary).
PAPER_REFERENCE: dict[tuple[str, int, str], float] = {("gpt2", 0, "baseline"): 0.1551, ("gpt2", 0, "a+b"): 0.2593}


# ------------------------------------------------------------------------------------------------- intercepts
def check_intercept(intercept: Float[torch.Tensor, "*n d_model"], tol: float = 1e-2, stacklevel: int = 3) -> None:
    """Warn (``UserWarning``) when an intercept is (nearly) parallel to all-ones: LayerNorm removes it."""
    c = intercept.detach().double().reshape(-1, intercept.shape[-1])
    norm, kept = c.norm(dim=-1), center(c).norm(dim=-1)
    bad = (norm > 0) & (kept <= tol * norm)
    if bool(bad.any()):
        frac = float((kept[bad] / norm[bad]).max())
        warnings.warn(
            f"the intercept is (nearly) parallel to the all-ones vector (only {frac:.1e} of its norm is "
            "orthogonal to it). The final LayerNorm subtracts the mean of the residual, so subtracting this "
            "intercept changes (almost) nothing; check the fit (enough prompts, the right layer).",
            UserWarning, stacklevel=stacklevel)


def _fit_from_acts(acts: MLPActivations, pooled: bool, ridge: float) -> torch.Tensor | dict[str, torch.Tensor]:
    if pooled:
        return fit_decomposition(acts.target, acts.regressors, ridge=ridge, regressor_names=acts.names).intercept
    fits = fit_per_group(acts.target, acts.regressors, acts.subjects, ridge=ridge, regressor_names=acts.names)
    return {str(s): fits[s].intercept for s in fits.labels}


def fit_intercept(model: TransformerBridge, calibration_dataset: RelationDataset, layer: int = -1, *, pooled: bool = True,
                  ridge: float = 0.0, max_batch: int = 64) -> torch.Tensor | dict[str, torch.Tensor]:
    """The intercept c of ``mlp_out ≈ Σ β_j head_j + c`` for one MLP, fitted on ``calibration_dataset``.

    Returns ``[d]`` (``pooled=True``, usable on any prompt) or ``{subject: [d]}`` (one per subject; using it
    at inference needs the subject, so it is an oracle upper bound). Warns when c is (nearly) parallel to
    all-ones. Evaluate on prompts disjoint from the calibration set (see :func:`mitigation_table`).

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.mitigation import fit_intercept
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> c = fit_intercept(model, ds.select(range(100)))
        >>> c.shape
        torch.Size([64])
    """
    check_ridge(ridge)
    acts = capture_mlp_activations(model, calibration_dataset, layer, max_batch=max_batch)
    out = _fit_from_acts(acts, pooled, ridge)
    for c in ([out] if isinstance(out, torch.Tensor) else out.values()):
        check_intercept(c, stacklevel=3)
    return out


# -------------------------------------------------------------------------------------------------- applying
def _rows_vector(intercept: Intercept, dataset: RelationDataset | None, rows: torch.Tensor) -> torch.Tensor:
    if isinstance(intercept, Mapping):
        if dataset is None:
            raise ConfigError("a per-subject intercept needs the dataset to know each prompt's subject")
        missing = sorted({dataset.subjects[int(i)] for i in rows} - set(intercept))
        if missing:
            raise ConfigError(f"no intercept for subjects {missing}; fit per-subject intercepts on prompts about "
                              "every evaluated subject, or pass pooled=True")
        return torch.stack([intercept[dataset.subjects[int(i)]] for i in rows])
    if intercept.ndim == 2:
        return intercept[rows.to(intercept.device)]
    if intercept.ndim != 1:
        raise ShapeError(f"intercept of shape {tuple(intercept.shape)}; pass [d_model], [n, d_model] or a dict")
    return intercept


def check_coeff(coeff: float) -> float:
    """``coeff`` (α in ``−α c``) if it is a finite number; else a ConfigError naming the fix."""
    if not isinstance(coeff, (int, float)) or isinstance(coeff, bool) or not math.isfinite(coeff):
        raise ConfigError(f"coeff={coeff!r}; pass a finite scale for the subtraction (1.0 subtracts c once).")
    return float(coeff)


def interventions_for(model: TransformerBridge, *, attention: bool = True, intercept: Intercept | None = None,
                      heads: int | Sequence[int] | None = None, positions: Positions = -1, coeff: float = 1.0,
                      layer: int = -1, dataset: RelationDataset | None = None, rows: Int[torch.Tensor, " n"] | None = None):
    """The factlens interventions of mitigations (a) and/or (b) at ``positions`` (``rows``: prompt indices
    into ``dataset`` for per-prompt intercepts)."""
    layer = check_index(layer, model.cfg.n_layers, "layer", "layers")
    ivs = []
    if attention:
        ivs.append(attend_to_self(model, layers=layer, positions=positions, heads=heads))
    if intercept is not None:
        if isinstance(intercept, Mapping):
            idx = torch.arange(len(dataset)) if rows is None and dataset is not None else rows
            vec = _rows_vector(intercept, dataset, idx)
        elif intercept.ndim == 2 and rows is not None:
            vec = _rows_vector(intercept, dataset, rows)
        else:
            vec = intercept
        ivs.append(add_vector(model, vec.detach(), coeff=-coeff, layer=layer,
                              component="mlp_out", positions=positions))
    for iv, method in zip(ivs, ["(a)"] * attention + ["(b)"] * (intercept is not None), strict=True):
        iv.key = ("mitigate", method, layer)  # one (a) and one (b) per layer at a time: nesting would apply it twice
    return ivs


@contextlib.contextmanager
def mitigate(model: TransformerBridge, intercept: Float[torch.Tensor, " d_model"] | None = None, *, attention: bool = True,
             heads: int | Sequence[int] | None = None, positions: Positions = -1, coeff: float = 1.0,
             layer: int = -1, on_no_effect: str = "raise") -> Iterator[Any]:
    """Apply (a) and/or (b) for the duration of the block (any forward pass or ``model.generate``).

    ``positions=-1`` edits the last position of whatever is run (each generation step's new token);
    for right-padded batches pass each prompt's last index (``dataset.end``).

    Args:
        intercept: c to subtract (``[d_model]`` or ``[batch, d_model]``); None = no (b).
        attention: apply (a); heads: which last-layer heads (None = all, ``[]`` = none).
        coeff: scale α of the subtraction (``−α c``).

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.mitigation import mitigate
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> tokens = model.to_tokens("The capital of France is")
        >>> c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        >>> with mitigate(model, intercept=c, heads=[0, 3]) as run:
        ...     logits = model(tokens)
    """
    if intercept is None and not attention:
        raise ConfigError("mitigate(attention=False) without an intercept applies nothing; pass intercept=c "
                          "(factlens.recall.fit_intercept) for (b), attention=True for (a), or both.")
    if isinstance(intercept, Mapping):
        raise ConfigError("mitigate got a per-subject intercept dict, but a forward pass has no subjects to pick "
                          "from; evaluate(model, dataset, intercept=...) applies per-subject intercepts, or pass "
                          "one [d_model] tensor (e.g. intercepts['France']).")
    if intercept is not None and not isinstance(intercept, torch.Tensor):
        raise ConfigError(f"intercept must be a [d_model] or [batch, d_model] tensor, got {type(intercept).__name__}.")
    check_coeff(coeff)
    if intercept is not None:
        check_intercept(intercept, stacklevel=4)
    ivs = interventions_for(model, attention=attention, intercept=intercept, heads=heads, positions=positions,
                            coeff=coeff, layer=layer)
    with intervene(model, *ivs, on_no_effect=on_no_effect) as run:
        yield run


def evaluate(model: TransformerBridge, dataset: RelationDataset, *, attention: bool = False, intercept: Intercept | None = None,
             heads: int | Sequence[int] | None = None, coeff: float = 1.0, layer: int = -1, max_batch: int = 64,
             progress: bool = False) -> pd.DataFrame:
    """Per-prompt P(answer), rank and correctness with the chosen mitigations applied at ``end``.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.mitigation import evaluate
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> c = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        >>> evaluate(model, ds, attention=True, intercept=c)["prob"].mean()  # doctest: +SKIP
    """
    check_coeff(coeff)
    if intercept is not None:
        check_intercept(intercept if isinstance(intercept, torch.Tensor) else torch.stack(list(intercept.values())))

    def factory(rows, ends):
        return interventions_for(model, attention=attention, intercept=intercept, heads=heads, positions=ends,
                                 coeff=coeff, layer=layer, dataset=dataset, rows=rows)

    run = run_at_end(model, dataset, (), interventions=factory, max_batch=max_batch, progress=progress,
                     desc="evaluate")
    return _frame(dataset, run.logits)


def _frame(dataset: RelationDataset, logits: torch.Tensor) -> pd.DataFrame:
    """:func:`evaluate`'s per-prompt table from logits at ``end`` ``[n, vocab]``."""
    rank = answer_rank(logits, dataset).cpu()
    return pd.DataFrame({"prompt": dataset.prompts, "subject": dataset.subjects,
                         "template_idx": dataset.template_ids.tolist(),
                         "prob": answer_prob(logits, dataset).cpu().tolist(), "rank": rank.tolist(),
                         "correct": (rank == 0).tolist()})


def _final_logits(model: TransformerBridge, resid: torch.Tensor) -> torch.Tensor:
    """Logits at ``end`` from the last block's output there, ``[n, d] -> [n, vocab]``."""
    with torch.no_grad():
        return model.unembed(model.ln_final(resid[:, None]))[:, 0]


def mitigation_hooks(model: TransformerBridge) -> list[str]:
    """The hooks :func:`mitigation_table` reads at ``end`` from a setting's clean run (plus the logits).

    Example:
        >>> import factlens
        >>> from factlens.recall.mitigation import mitigation_hooks
        >>> mitigation_hooks(factlens.tiny("gpt2"))[-1]
        'blocks.1.hook_resid_post'
    """
    return [*mlp_activation_hooks(model, -1), f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]


def _setting(model, ds, splits, *, heads, coeff, pooled, ridge, max_batch, progress, clean):
    """One setting's four methods from two passes: clean (shared) and (a); (b) is applied to their cached final
    residual.

    (b) subtracts ``coeff·c`` from the last MLP's output at ``end``, which reaches the logits only through
    ``blocks.{L-1}.hook_resid_post`` at ``end``: ``logits = unembed(ln_final(resid_post − coeff·c))``. So every
    fold's (b) and (a)+(b) reuse the two passes' residuals instead of running the model again.
    """
    resid_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    clean = reuse_run(model, ds, clean, mitigation_hooks(model), logits=True, max_batch=max_batch, progress=progress,
                      desc="mitigation (clean)")
    acts = capture_mlp_activations(model, ds, -1, run=clean)

    def attention(rows, ends):
        return interventions_for(model, attention=True, heads=heads, positions=ends)

    attended = run_at_end(model, ds, [resid_name], interventions=attention, max_batch=max_batch, progress=progress,
                          desc="mitigation (a)")
    results = {"baseline": _frame(ds, clean.logits), "a": _frame(ds, attended.logits)}
    for m in ("baseline", "a"):
        results[m]["fold"] = -1
    intercepts, parts = {}, {"b": [], "a+b": []}
    for f, (fit_idx, eval_idx) in enumerate(splits):
        c = _fit_from_acts(acts.select(fit_idx), pooled, ridge)
        check_intercept(c if isinstance(c, torch.Tensor) else torch.stack(list(c.values())), stacklevel=4)
        intercepts[f] = c
        rows = torch.as_tensor(eval_idx)
        vec = _rows_vector(c, ds, rows).to(clean[resid_name].device)  # [d] or [n_eval, d]
        eval_ds = ds.select(eval_idx)
        for m, run in (("b", clean), ("a+b", attended)):
            resid = run[resid_name][rows.to(run[resid_name].device)] - coeff * vec  # [n_eval, d]
            df = _frame(eval_ds, _final_logits(model, resid))
            df.index = eval_idx
            df["fold"] = f
            parts[m].append(df)
    for m in ("b", "a+b"):
        results[m] = pd.concat(parts[m]).sort_index()
    return results, intercepts


# ------------------------------------------------------------------------------------------------------ table
def template_folds(dataset: RelationDataset, folds: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """k folds split by template: ``(fit indices, eval indices)``; no prompt (index or text) is in both."""
    templates = sorted(set(dataset.template_ids.tolist()))
    if not 2 <= folds <= len(templates):
        raise ConfigError(f"folds={folds} but the dataset has {len(templates)} templates; pass 2 <= folds <= "
                          f"{len(templates)} (folds split by template so fit and evaluation prompts are disjoint)")
    perm = np.random.default_rng(seed).permutation(templates)
    groups = [set(g.tolist()) for g in np.array_split(perm, folds)]
    tids = dataset.template_ids.tolist()
    out = []
    for g in groups:
        ev = [i for i, t in enumerate(tids) if t in g]
        fit = [i for i, t in enumerate(tids) if t not in g]
        assert not set(ev) & set(fit), "fit and evaluation indices overlap"
        assert not {dataset.prompts[i] for i in ev} & {dataset.prompts[i] for i in fit}, \
            "a prompt text is in both the fit and the evaluation set"
        out.append((fit, ev))
    return out


def _paper_model(model) -> str | None:
    if is_twin(model):  # random weights: the paper's numbers are not comparable; never draw them beside a twin
        return None
    family, L, d = family_of(model), model.cfg.n_layers, model.cfg.d_model
    for name, spec in SUPPORTED.items():
        if (spec.family, spec.n_layers, spec.d_model) == (family, L, d):
            return name
    return None


def _peak_memory(device, rss_before: int) -> dict[str, Any]:
    mem = memory_usage(device)
    if mem.cuda_peak is not None:
        return {"peak_memory_mb": mem.cuda_peak / 2**20, "memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_mb": mem.peak_rss / 2**20, "peak_memory_mb_before": rss_before / 2**20,
            "memory_kind": "process peak RSS (resource.getrusage; includes everything run before)"}


@dataclass
class MitigationTable(ResultDisplay):
    """Mean P(first answer token), accuracy and mean rank per (shots, method), evaluated out of fold.

    Attributes:
        rows: One row per (shots, method): mean_prob, accuracy, mean_rank, n_prompts, paper_prob (Lv et al.'s
            value where known, else None).
        per_prompt: One row per (shots, method, prompt): fold, prob, rank, correct.
        intercepts: ``(shots, fold)`` → the fitted intercept (``[d]`` or ``{subject: [d]}``).
        metadata: Settings, wall time and peak memory.
    """

    rows: pd.DataFrame
    per_prompt: pd.DataFrame
    intercepts: dict[tuple[int, int], Any] = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.rows.copy()

    def cell(self, shots: int, method: str, column: str = "mean_prob") -> float:
        """One value, e.g. ``table.cell(0, "a+b")``."""
        sel = self.rows[(self.rows["shots"] == shots) & (self.rows["method"] == method)]
        if sel.empty:
            raise ConfigError(f"no row for shots={shots}, method={method!r}; methods are {list(METHODS)}")
        return float(sel[column].iloc[0])

    def to_markdown(self) -> str:
        """A GitHub-markdown table (P in %, rank as mean 0-based rank)."""
        head = "| shots | method | mean P(answer) | accuracy | mean rank | n | paper P |\n|---|---|---|---|---|---|---|"
        lines = [head]
        for r in self.rows.itertuples():
            paper = "" if r.paper_prob is None or r.paper_prob != r.paper_prob else f"{100 * r.paper_prob:.4g}%"
            lines.append(f"| {r.shots} | {r.label} | {100 * r.mean_prob:.4g}% | {100 * r.accuracy:.1f}% | "
                         f"{r.mean_rank:.1f} | {r.n_prompts} | {paper} |")
        meta = self.metadata
        lines.append(f"\n{meta.get('folds')}-fold by template; intercept {meta.get('intercept')}; coeff "
                     f"{meta.get('coeff')}; heads {meta.get('heads')}; peak memory {meta.get('peak_memory_mb', 0):.0f} MB "
                     f"({meta.get('memory_kind')}); {meta.get('seconds', 0):.1f} s.")
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        return atomic_write(path, self.rows.to_csv(index=False))

    def plot(self, title: str | None = None) -> go.Figure:
        """Grouped bars: mean P(answer) per shots setting, one bar per method; paper values as markers."""
        fig = go.Figure()
        for method, label in METHODS.items():
            sub = self.rows[self.rows["method"] == method]
            fig.add_trace(go.Bar(name=label, x=[f"{s}-shot" for s in sub["shots"]], y=sub["mean_prob"],
                                 hovertext=[f"{label}: P = {p:.4g}, acc = {a:.3g}, mean rank = {r:.4g}" for p, a, r in
                                            zip(sub["mean_prob"], sub["accuracy"], sub["mean_rank"])],
                                 hoverinfo="text"))
        paper = self.rows.dropna(subset=["paper_prob"])
        if len(paper):
            fig.add_trace(go.Scatter(name="Lv et al. (paper)", mode="markers", marker={"symbol": "x", "size": 12},
                                     x=[f"{s}-shot" for s in paper["shots"]], y=paper["paper_prob"],
                                     hovertext=[f"paper {m}: {p:.4g}" for m, p in zip(paper["method"], paper["paper_prob"])],
                                     hoverinfo="text"))
        fig.update_layout(barmode="group", title=title or "Final-layer mitigations (out-of-fold)",
                          xaxis_title="prompt setting", yaxis_title="mean P(first answer token)")
        return fig


def mitigation_table(model: TransformerBridge, relation: Relation = CAPITALS, shots: Sequence[int] = (0, 1, 2), folds: int = 5,
                     heads: int | Sequence[int] | None = None, coeff: float = 1.0, *, pooled: bool = True,
                     seed: int = 0, n: int | None = None, ridge: float = 0.0, max_batch: int = 64,
                     progress: bool = True, runs: Mapping[int, EndRun] | None = None) -> MitigationTable:
    """Baseline, (a), (b) and (a)+(b) with c fitted and evaluated on disjoint prompts (k folds by template).

    Two forward passes per setting (clean and (a)); every fold's (b) and (a)+(b) are read from their final
    residual at ``end``. The tests check this against one hooked forward pass per method and fold
    (:func:`evaluate`, ``tests/reference_recall.py``).

    Args:
        relation: The relation (default :data:`~factlens.recall.relations.CAPITALS`).
        shots: Few-shot settings to evaluate.
        folds: k; each fold's templates are held out, c is fitted on the other templates' prompts.
        heads: Last-layer heads restricted by (a) (None = all).
        coeff: α in ``−α c``.
        pooled: One intercept over all subjects (True) or one per subject (an oracle: needs the subject).
        n: Prompts per setting (None: all).
        runs: shots → a clean :class:`~factlens.recall.forward.EndRun` of that setting's dataset holding
            :func:`mitigation_hooks` and the logits, used as its clean pass (what
            :func:`~factlens.recall.report.analyze` shares).

    Example:
        >>> import factlens
        >>> from factlens.recall import mitigation_table
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> table = mitigation_table(model, shots=[0], folds=3, progress=False)
        >>> print(table.to_markdown())                                     # doctest: +SKIP
    """
    check_coeff(coeff)
    check_ridge(ridge)
    require_eval(model, "mitigation_table")
    t0, rss_before = time.perf_counter(), memory_usage().peak_rss
    if torch.device(model.cfg.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.cfg.device)
    paper = _paper_model(model) if relation.name == "capitals" else None
    rows, per_prompt, intercepts = [], [], {}
    for s in track(list(shots), device=model.cfg.device, desc="mitigation table", disable=not progress):
        ds = dataset_for(model, relation, shots=s, seed=seed, n=n)
        results, fold_intercepts = _setting(model, ds, template_folds(ds, folds, seed), heads=heads, coeff=coeff,
                                            pooled=pooled, ridge=ridge, max_batch=max_batch, progress=False,
                                            clean=(runs or {}).get(s))
        intercepts.update({(s, f): c for f, c in fold_intercepts.items()})
        for m, df in results.items():
            assert len(df) == len(ds) and sorted(df.index) == list(range(len(ds))), "every prompt evaluated once"
            per_prompt.append(df.assign(shots=s, method=m, prompt_idx=df.index))
            rows.append({"shots": s, "method": m, "label": METHODS[m], "mean_prob": float(df["prob"].mean()),
                         "accuracy": float(df["correct"].mean()), "mean_rank": float(df["rank"].mean()),
                         "n_prompts": len(df), "paper_prob": PAPER_REFERENCE.get((paper, s, m)) if paper else None})
    meta = {"model": paper or model.cfg.model_name, "family": family_of(model), "relation": relation.name,
            "folds": folds, "split": "by template", "intercept": "pooled" if pooled else "per subject",
            "coeff": coeff, "heads": "all" if heads is None else list(np.atleast_1d(heads).tolist()),
            "seed": seed, "seconds": time.perf_counter() - t0, **_peak_memory(model.cfg.device, rss_before)}
    return MitigationTable(rows=pd.DataFrame(rows), per_prompt=pd.concat(per_prompt, ignore_index=True),
                           intercepts=intercepts, metadata=meta)


__all__ = ["METHODS", "PAPER_REFERENCE", "MitigationTable", "check_intercept", "evaluate", "fit_intercept",
           "interventions_for", "mitigate", "mitigation_hooks", "mitigation_table", "template_folds"]
