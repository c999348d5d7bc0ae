"""Lv et al.'s final-layer mitigations on any prompt set, with the intercept fitted out of fold.

:func:`mitigation_rows` is what :func:`factlens.testbeds.mechanisms.mechanisms` reports per checkpoint and
attribute of a biography run; on a relation's prompts it gives the numbers of
:func:`factlens.recall.mitigation.mitigation_table` (same folds, same pooled intercept, same two passes).

Example:
    >>> import factlens
    >>> from factlens.recall.datasets import dataset_for
    >>> from factlens.testbeds.mitigations import mitigation_rows
    >>> model = factlens.tiny("gpt2", compat=True)
    >>> rows = mitigation_rows(model, dataset_for(model), folds=3)
    >>> rows["method"].tolist()
    ['baseline', 'a', 'b', 'a+b']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from factlens.recall.forward import head_outputs, run_at_end
from factlens.recall.metrics import answer_prob, answer_rank
from factlens.recall.mitigation import interventions_for, template_folds
from factlens.recall.regression import fit_decomposition

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

#: The methods, in table order: none, (a) attention to ``end`` only, (b) −intercept, both.
MITIGATIONS = ("baseline", "a", "b", "a+b")


def mitigation_rows(model: TransformerBridge, dataset, *, folds: int = 5, seed: int = 0, coeff: float = 1.0,
                    heads: int | Sequence[int] | None = None, run=None, max_batch: int = 64):
    """Lv et al.'s mitigations on one prompt set: baseline, (a), (b) and (a)+(b), the intercept out of fold.

    (a) every (or each of ``heads``) last-layer head attends only to ``end``
    (:func:`~factlens.recall.mitigation.interventions_for`); (b) ``coeff`` × the last MLP's pooled intercept ``c``
    (``mlp_out ≈ Σ β_j head_j + c`` over that layer's heads) is subtracted from the last MLP's output at ``end``.
    ``c`` is fitted on the other folds' prompts only (k folds split by template,
    :func:`~factlens.recall.mitigation.template_folds`), so no prompt is scored with an intercept fitted on it.
    (b) reaches the logits only through the final residual at ``end``, so it is applied to the cached residual
    of the clean and the (a) pass: ``logits = unembed(ln_final(resid_post − coeff·c))``.

    Returns one row per method: mean_prob, accuracy, mean_rank, n_prompts, and per-prompt lists ``prob`` and
    ``fold`` (-1: no intercept).

    Example:
        >>> import factlens
        >>> from factlens.recall.datasets import dataset_for
        >>> from factlens.testbeds.mitigations import mitigation_rows
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> mitigation_rows(model, dataset_for(model), folds=3)["n_prompts"].tolist()
        [225, 225, 225, 225]
    """
    last = model.cfg.n_layers - 1
    resid_name = f"blocks.{last}.hook_resid_post"
    names = [f"blocks.{last}.hook_mlp_out", f"blocks.{last}.attn.hook_z", resid_name]
    if run is None or not set(names) <= run.acts.keys() or run.logits is None:
        run = run_at_end(model, dataset, names, max_batch=max_batch, desc="mitigations (clean)")
    attended = run_at_end(model, dataset, [resid_name], max_batch=max_batch, desc="mitigation (a)",
                          interventions=lambda rows, ends: interventions_for(model, attention=True, heads=heads,
                                                                             positions=ends))
    target = run[f"blocks.{last}.hook_mlp_out"]  # [n, d]
    regressors = head_outputs(model, last, run[f"blocks.{last}.attn.hook_z"])  # [n, H, d]
    n = len(dataset)
    logits = {"baseline": run.logits, "a": attended.logits}
    fold_of = torch.full((n,), -1)
    shifted = {"b": torch.empty_like(run[resid_name]), "a+b": torch.empty_like(run[resid_name])}  # [n, d]
    for f, (fit_idx, eval_idx) in enumerate(template_folds(dataset, folds, seed)):
        fit_rows, eval_rows = torch.as_tensor(fit_idx), torch.as_tensor(eval_idx)
        c = fit_decomposition(target[fit_rows], regressors[fit_rows]).intercept.to(target)  # [d]
        fold_of[eval_rows] = f
        shifted["b"][eval_rows] = run[resid_name][eval_rows] - coeff * c
        shifted["a+b"][eval_rows] = attended[resid_name][eval_rows] - coeff * c
    with torch.no_grad():
        for m, resid in shifted.items():
            logits[m] = model.unembed(model.ln_final(resid[:, None]))[:, 0]  # [n, vocab]
    rows = []
    for m in MITIGATIONS:
        prob, rank = answer_prob(logits[m], dataset).cpu(), answer_rank(logits[m], dataset).cpu()
        rows.append({"method": m, "mean_prob": float(prob.mean()), "accuracy": float((rank == 0).double().mean()),
                     "mean_rank": float(rank.double().mean()), "n_prompts": n, "prob": prob.tolist(),
                     "fold": (fold_of if m in ("b", "a+b") else torch.full((n,), -1)).tolist()})
    return pd.DataFrame(rows)


__all__ = ["MITIGATIONS", "mitigation_rows"]
