"""Decompose an MLP's output at ``end`` into its attention heads plus an intercept (Lv et al. 2024 §5).

``mlp_out_i ≈ Σ_j β_j · head_ij + c``: ``head_ij`` is head j's output (``z·W_O[j]``, **without** ``b_O``) of
the attention sub-layer in the same block, β_j a scalar per head (head j's residual share becomes 1 + β_j),
c ∈ R^d the intercept shared by the prompts in the fit set (pooled over subjects, or one per subject with
``group_by="subject"``). The intercept is read through the final LayerNorm and the unembedding: its all-ones
part is removed (LayerNorm's centring removes it), it is optionally divided by the mean
``ln_final.hook_scale`` at ``end``, and multiplied by ``W_U`` with the final LayerNorm weight folded in.
This module is the model side (which activations, read how); the regression itself is
:func:`factlens.recall.regression.fit_decomposition`, pure torch on any tensors.

Example:
    >>> import factlens
    >>> from factlens.recall import decompose_mlp, dataset_for
    >>> model = factlens.tiny("opt")
    >>> res = decompose_mlp(model, dataset_for(model), layer=1)
    >>> res.beta.shape, 0 <= res.r2 <= 1
    (torch.Size([4]), True)
    >>> res.answer_ranks[["subject", "answer", "rank"]].head(2)         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int

from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.indices import check_index
from factlens.recall.datasets import RelationDataset
from factlens.recall.forward import (
    EndRun,
    center,
    head_outputs,
    require_eval,
    reuse_run,
    run_at_end,
    unembed_params,
)
from factlens.recall.regression import (
    Decomposition,
    GroupedDecomposition,
    VocabProjection,
    check_ridge,
    fit_decomposition,
    fit_per_group,
    project_to_vocab,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Regressors = str | Sequence[tuple[int, int]]


@dataclass
class MLPActivations(ResultDisplay):
    """What the decomposition needs, at ``end``: target ``[n, d]``, regressors ``[n, k, d]``, LN scale ``[n]``."""

    layer: int
    target: Float[torch.Tensor, "n d"]
    regressors: Float[torch.Tensor, "n k d"]
    names: list[str]
    ln_scale: Float[torch.Tensor, " n"]
    subjects: list[str]

    def select(self, idx: Sequence[int] | Int[torch.Tensor, " k"]) -> MLPActivations:
        """The rows ``idx`` (e.g. one cross-validation fold)."""
        i = torch.as_tensor(idx, dtype=torch.long, device=self.target.device)
        return MLPActivations(self.layer, self.target[i], self.regressors[i], self.names, self.ln_scale[i],
                              [self.subjects[int(j)] for j in i.tolist()])


def _regressor_pair(model, pair) -> tuple[int, int]:
    """One ``(layer, head)`` regressor, both indices validated (negative counts from the end, no wrap)."""
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise ConfigError(f"regressor {pair!r} is not a (layer, head) pair; pass e.g. regressors=[(11, 0), (10, 7)]")
    return (check_index(pair[0], model.cfg.n_layers, "regressor layer", "layers"),
            check_index(pair[1], model.cfg.n_heads, "regressor head", "heads per layer"))


def _regressor_list(model, layer: int, regressors: Regressors) -> list[tuple[int, int]]:
    H = model.cfg.n_heads
    if isinstance(regressors, str):
        if regressors != "heads":
            raise ConfigError(f"regressors={regressors!r}; use 'heads' (this layer's heads) or a list of "
                              "(layer, head) pairs")
        return [(layer, h) for h in range(H)]
    pairs = [_regressor_pair(model, pair) for pair in regressors]
    if not pairs:
        raise ConfigError("regressors=[] has no heads; pass 'heads' or at least one (layer, head) pair")
    if len(set(pairs)) != len(pairs):
        dup = sorted({f"L{a}H{b}" for a, b in pairs if pairs.count((a, b)) > 1})
        raise ConfigError(f"regressors name {dup} more than once (negative indices count from the end); pass "
                          "each (layer, head) once: a repeated regressor makes the regression rank-deficient")
    for a, b in pairs:
        if a > layer:
            raise ConfigError(f"regressor head L{a}H{b} is not an attention head at or below MLP layer {layer} "
                              f"(0 <= head < {H}); heads after the MLP cannot explain its output")
    return pairs


def mlp_activation_hooks(model: TransformerBridge, layer: int = -1, regressors: Regressors = "heads") -> list[str]:
    """The hooks :func:`capture_mlp_activations` reads at ``end`` for the MLP of ``layer``.

    Example:
        >>> import factlens
        >>> from factlens.recall.mlp_decomposition import mlp_activation_hooks
        >>> mlp_activation_hooks(factlens.tiny("gpt2"), -1)
        ['blocks.1.hook_mlp_out', 'ln_final.hook_scale', 'blocks.1.attn.hook_z']
    """
    layer = check_index(layer, model.cfg.n_layers, "layer", "layers")
    layers = sorted({a for a, _ in _regressor_list(model, layer, regressors)})
    return [f"blocks.{layer}.hook_mlp_out", "ln_final.hook_scale"] + [f"blocks.{a}.attn.hook_z" for a in layers]


def capture_mlp_activations(model: TransformerBridge, dataset: RelationDataset, layer: int = -1, regressors: Regressors = "heads",
                            *, max_batch: int = 64, progress: bool = False, interventions=None,
                            run: EndRun | None = None) -> MLPActivations:
    """Cache ``hook_mlp_out``, the regressor heads' ``hook_z`` and ``ln_final.hook_scale``, at ``end`` only
    (:func:`mlp_activation_hooks`), or read them from a shared ``run`` that holds them.

    ``interventions`` are active during the pass (a new pass: not with ``run``).
    """
    require_eval(model, "the MLP decomposition")
    layer = check_index(layer, model.cfg.n_layers, "layer", "layers")
    pairs = _regressor_list(model, layer, regressors)
    layers = sorted({a for a, _ in pairs})
    names = mlp_activation_hooks(model, layer, regressors)
    if interventions is not None:
        if run is not None:
            raise ConfigError("capture_mlp_activations got both run= and interventions=; a shared run was made "
                              "without the interventions: pass one of them")
        run = run_at_end(model, dataset, names, logits=False, max_batch=max_batch, progress=progress,
                         interventions=interventions, desc=f"MLP{layer} decomposition")
    run = reuse_run(model, dataset, run, names, max_batch=max_batch, progress=progress, desc=f"MLP{layer} decomposition")
    outputs = {a: head_outputs(model, a, run[f"blocks.{a}.attn.hook_z"]) for a in layers}  # a -> [n, H, d]
    heads = [outputs[a][:, b] for a, b in pairs]  # [n, d] each
    return MLPActivations(layer=layer, target=run[f"blocks.{layer}.hook_mlp_out"],
                          regressors=torch.stack(heads, 1), names=[f"L{a}H{b}" for a, b in pairs],
                          ln_scale=run["ln_final.hook_scale"].reshape(-1), subjects=dataset.subjects)


@dataclass
class MLPDecompositionResult(ResultDisplay):
    """β per head, R², the intercept and what it promotes in the vocabulary.

    Attributes:
        layer: The MLP's layer.
        fit: A :class:`~factlens.recall.regression.Decomposition` (pooled) or
            :class:`~factlens.recall.regression.GroupedDecomposition` (``group_by="subject"``).
        projections: ``"pooled"`` or subject → the intercept's :class:`~factlens.recall.regression.VocabProjection`.
        answer_ranks: One row per subject: its gold answer's rank (0 = top) and logit under the intercept
            (the pooled one, or the subject's own).
        group_by: None or ``"subject"``; ln_scale: whether the intercept was divided by the final LN scale.
    """

    layer: int
    fit: Decomposition | GroupedDecomposition
    projections: dict[str, VocabProjection]
    answer_ranks: pd.DataFrame
    group_by: str | None
    ln_scale: bool

    @property
    def pooled(self) -> bool:
        return isinstance(self.fit, Decomposition)

    @property
    def beta(self) -> torch.Tensor:
        """``[k]`` (pooled) or ``[group, k]``."""
        return self.fit.beta if isinstance(self.fit, Decomposition) else self.fit.betas

    @property
    def intercept(self) -> torch.Tensor:
        """``[d]`` (pooled) or ``[group, d]``."""
        return self.fit.intercept if isinstance(self.fit, Decomposition) else self.fit.intercepts

    @property
    def r2(self) -> float:
        """R² (pooled) or the mean over groups."""
        if isinstance(self.fit, Decomposition):
            return self.fit.r2
        return float(sum(f.r2 for f in self.fit.fits.values()) / len(self.fit))

    def to_dataframe(self) -> pd.DataFrame:
        """β per regressor (long; a ``group`` column, ``"pooled"`` when pooled), with r2 and the MLP layer."""
        df = self.fit.to_dataframe()
        if "group" not in df:
            df.insert(0, "group", "pooled")
        df.insert(0, "layer", self.layer)
        return df

    def intercept_table(self) -> pd.DataFrame:
        """Top tokens and answer ranks of each intercept projection (long format with a ``group`` column)."""
        return pd.concat([p.to_dataframe().assign(group=g) for g, p in self.projections.items()], ignore_index=True)

    def plot(self, title: str | None = None) -> go.Figure:
        """β per head (bars, pooled) or per subject × head (heat-map)."""
        mean_rank = float(self.answer_ranks["rank"].mean())
        return self.fit.plot(title or f"MLP{self.layer} = Σ β·head + c  (R² = {self.r2:.3f}; mean gold-answer "
                                      f"rank under c = {mean_rank:.1f})")


def decompose_from_activations(model: TransformerBridge, acts: MLPActivations, dataset: RelationDataset, *,
                               group_by: str | None = None, ln_scale: bool = True, k: int = 10,
                               ridge: float = 0.0) -> MLPDecompositionResult:
    """:func:`decompose_mlp` on activations already captured with :func:`capture_mlp_activations`."""
    if group_by not in (None, "subject"):
        raise ConfigError(f"group_by={group_by!r}; use None (pooled) or 'subject'")
    W_eff, _ = unembed_params(model)
    tok = dataset.tokenizer
    answers = dict(zip(dataset.subjects, dataset.answer_ids.tolist()))
    answer_names = dict(zip(dataset.subjects, dataset.answers))
    projections: dict[str, VocabProjection] = {}
    rows = []
    if group_by is None:
        fit: Decomposition | GroupedDecomposition = fit_decomposition(
            acts.target, acts.regressors, ridge=ridge, regressor_names=acts.names)
        subjects = list(answers)
        proj = project_to_vocab(center(fit.intercept), W_eff, tok, k,
                                ln_scale=acts.ln_scale if ln_scale else None,
                                answer_ids=[answers[s] for s in subjects])
        projections["pooled"] = proj
        for s, r, lg in zip(subjects, proj.answer_ranks.tolist(), proj.answer_logits.tolist()):
            rows.append({"subject": s, "answer": answer_names[s], "answer_id": answers[s], "rank": r, "logit": lg,
                         "intercept": "pooled"})
    else:
        fit = fit_per_group(acts.target, acts.regressors, acts.subjects, ridge=ridge, regressor_names=acts.names)
        for s in fit.labels:
            idx = [i for i, x in enumerate(acts.subjects) if x == s]
            proj = project_to_vocab(center(fit[s].intercept), W_eff, tok, k,
                                    ln_scale=acts.ln_scale[idx] if ln_scale else None, answer_ids=answers[s])
            projections[str(s)] = proj
            rows.append({"subject": s, "answer": answer_names[s], "answer_id": answers[s],
                         "rank": int(proj.answer_ranks[0]), "logit": float(proj.answer_logits[0]), "intercept": s})
    return MLPDecompositionResult(layer=acts.layer, fit=fit, projections=projections,
                                  answer_ranks=pd.DataFrame(rows), group_by=group_by, ln_scale=ln_scale)


def decompose_mlp(model: TransformerBridge, dataset: RelationDataset, layer: int = -1, regressors: Regressors = "heads", *,
                  group_by: str | None = None, ln_scale: bool = True, k: int = 10, ridge: float = 0.0,
                  max_batch: int = 64, progress: bool = False) -> MLPDecompositionResult:
    """Fit ``mlp_out ≈ Σ_j β_j head_j + c`` at ``end`` and read the intercept in the vocabulary.

    Args:
        layer: The MLP (negative counts from the end).
        regressors: ``"heads"`` (that layer's attention heads) or a list of ``(layer, head)`` pairs at or
            below ``layer``.
        group_by: None (one pooled fit) or ``"subject"`` (one fit per subject, Lv et al.'s "all same"
            datasets; needs several templates per subject).
        ln_scale: Divide the intercept by the mean ``ln_final.hook_scale`` at ``end`` before unembedding.
        k: Top tokens to report per intercept.
        ridge: Relative ridge for :func:`~factlens.recall.regression.fit_decomposition`.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.mlp_decomposition import decompose_mlp
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> res = decompose_mlp(model, ds, layer=-1, group_by="subject")
        >>> res.answer_ranks["rank"].mean()                                # doctest: +SKIP
    """
    check_ridge(ridge)
    acts = capture_mlp_activations(model, dataset, layer, regressors, max_batch=max_batch, progress=progress)
    return decompose_from_activations(model, acts, dataset, group_by=group_by, ln_scale=ln_scale, k=k, ridge=ridge)


__all__ = ["MLPActivations", "MLPDecompositionResult", "capture_mlp_activations", "decompose_from_activations",
           "decompose_mlp", "mlp_activation_hooks"]
