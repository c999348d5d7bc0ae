"""The regression of the MLP decomposition (Lv et al. 2024 §5): ``m_i ≈ Σ_j β_j · h_ij + c``, scalar β, vector c.

Pure torch and model-agnostic (the model side, which activations are fitted, is
:mod:`factlens.recall.mlp_decomposition`): pass the MLP outputs at ``end`` as ``target`` ``[n, d]`` and the
head outputs of the attention sub-layer before it as ``regressors`` ``[n, k, d]``. Each β_j is shared over the d
coordinates: after the MLP, head j's share of the residual is (1 + β_j), so β ≈ −1 erases the head and
β > 0 amplifies it. The intercept c ∈ R^d is the prompt-independent part (read as the task-aware "function
application" component); :func:`project_to_vocab` reads it through the unembedding.

Example:
    >>> import torch
    >>> from factlens.recall.regression import fit_decomposition
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.randn(20, 3, 8, generator=g, dtype=torch.float64)
    >>> c = torch.randn(8, generator=g, dtype=torch.float64)
    >>> fit = fit_decomposition(h[:, 0] - h[:, 1] + 2 * h[:, 2] + c, h)
    >>> [round(b, 6) for b in fit.beta.tolist()], round(fit.r2, 6)
    ([1.0, -1.0, 2.0], 1.0)
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int

from factlens.display import ResultDisplay
from factlens.errors import ConfigError, EmptyDatasetError, IllConditionedWarning, ShapeError
from factlens.inputs import at_least_fp32

COND_LIMIT = 1e12  # G with a larger condition number is treated as singular
COND_WARN = 1e8  # above this the fit warns: relative noise e in the data can move the betas by up to cond·e


def head_names(layer: int, n_heads: int) -> list[str]:
    """Regressor names ``L{layer}H{h}`` for the heads of one layer.

    Example:
        >>> from factlens.recall.regression import head_names
        >>> head_names(9, 3)
        ['L9H0', 'L9H1', 'L9H2']
    """
    return [f"L{layer}H{h}" for h in range(n_heads)]


def _check(target: torch.Tensor, regressors: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor) or not isinstance(regressors, torch.Tensor):
        raise ShapeError("target and regressors must be torch tensors; convert with torch.as_tensor")
    if target.ndim != 2 or regressors.ndim != 3:
        raise ShapeError(f"need target [n, d] and regressors [n, k, d], got {tuple(target.shape)} and "
                         f"{tuple(regressors.shape)}; index the end position first, e.g. cache[...][:, end]")
    if target.shape[0] != regressors.shape[0] or target.shape[1] != regressors.shape[2]:
        raise ShapeError(f"target {tuple(target.shape)} and regressors {tuple(regressors.shape)} disagree on "
                         "n (dim 0) or d (last dim); pass the same prompts and the same residual width")
    if target.shape[0] == 0 or regressors.shape[1] == 0 or target.shape[1] == 0:
        n, k, d = regressors.shape
        raise EmptyDatasetError(f"empty input: n={n}, k={k}, d={d}; pass at least one prompt and one "
                                "regressor")
    for name, x in (("target", target), ("regressors", regressors)):
        if x.is_complex() or not torch.isfinite(x.double()).all():
            raise ShapeError(f"{name} has NaN/inf or complex values; drop those prompts or recompute them "
                             "in float32")


@dataclass
class Decomposition(ResultDisplay):
    """A fitted ``target ≈ Σ_j beta_j · regressor_j + intercept``.

    Attributes:
        beta: One scalar per regressor, ``[k]``.
        intercept: Vector intercept c, ``[d]`` (zeros when fitted without one).
        r2: 1 − SSE/SST, summed over samples and coordinates (SST about the mean target).
        n_samples: Prompts used.
        regressor_names: One name per regressor (e.g. ``L9H8``).
        ridge: Relative ridge used (see :func:`fit_decomposition`).
        fit_intercept: Whether c was fitted.

    Example:
        >>> import torch
        >>> from factlens.recall.regression import fit_decomposition
        >>> h = torch.randn(10, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        >>> fit = fit_decomposition(-h[:, 0] + 0.5 * h[:, 1] + 1.0, h, regressor_names=["a", "b"])
        >>> fit.to_dataframe()[["regressor", "beta"]].round(6).values.tolist()
        [['a', -1.0], ['b', 0.5]]
    """

    beta: Float[torch.Tensor, " k"]
    intercept: Float[torch.Tensor, " d"]
    r2: float
    n_samples: int
    regressor_names: list[str]
    ridge: float = 0.0
    fit_intercept: bool = True
    condition_number: float = float("nan")  # of the solved normal matrix G (after ridge); > COND_WARN is warned

    @property
    def ill_conditioned(self) -> bool:
        """Whether G's condition number exceeds ``COND_WARN`` (the betas are unstable: small noise moves them)."""
        return bool(self.condition_number > COND_WARN)

    def predict(self, regressors: Float[torch.Tensor, "n k d"]) -> Float[torch.Tensor, "n d"]:
        """``Σ_j beta_j · regressors[:, j] + intercept`` (float64 inside, returned in the input dtype)."""
        if regressors.ndim != 3 or regressors.shape[1:] != (len(self.beta), len(self.intercept)):
            raise ShapeError(f"regressors must be [n, {len(self.beta)}, {len(self.intercept)}], got "
                             f"{tuple(regressors.shape)}; pass the same heads/width the fit used")
        beta = self.beta.to(regressors.device, torch.float64)
        intercept = self.intercept.to(regressors.device, torch.float64)  # [d]
        out = torch.einsum("nkd,k->nd", regressors.double(), beta) + intercept  # [n, d]
        return out.to(regressors.dtype if regressors.is_floating_point() else torch.float64)

    def residual(self, target: Float[torch.Tensor, "n d"], regressors: Float[torch.Tensor, "n k d"]
                 ) -> Float[torch.Tensor, "n d"]:
        """``target − predict(regressors)``: what the decomposition leaves unexplained."""
        _check(target, regressors)
        return target - self.predict(regressors).to(target.dtype)

    def intercept_logits(self, W_U: Float[torch.Tensor, "d vocab"],
                         ln_scale: float | Float[torch.Tensor, "..."] | None = None,
                         b_U: Float[torch.Tensor, " vocab"] | None = None) -> Float[torch.Tensor, " vocab"]:
        """Logits of the intercept, ``(c / ln_scale) @ W_U + b_U`` (ln_scale: ``ln_final.hook_scale``)."""
        return _logits(self.intercept, W_U, ln_scale, b_U)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per regressor: name, index, beta and the residual share 1 + beta."""
        beta = self.beta.double().cpu()
        return pd.DataFrame({"regressor": self.regressor_names, "index": range(len(beta)),
                             "beta": beta.tolist(), "share": (1 + beta).tolist(),
                             "r2": self.r2, "n_samples": self.n_samples})

    def plot(self, title: str | None = None) -> go.Figure:
        """Bar chart of beta per regressor, with dashed lines at −1 ("erased") and 0 ("unchanged")."""
        df = self.to_dataframe()
        fig = go.Figure(go.Bar(
            x=df["regressor"], y=df["beta"],
            hovertext=[f"{r}: β = {b:.3f}, share after MLP = {s:.3f}" for r, b, s in
                       zip(df["regressor"], df["beta"], df["share"])], hoverinfo="text"))
        fig.add_hline(y=-1, line_dash="dash", line_color="firebrick", annotation_text="erased")
        fig.add_hline(y=0, line_dash="dash", line_color="gray", annotation_text="unchanged")
        default = f"MLP-output decomposition (R² = {self.r2:.3f}, n = {self.n_samples})"
        fig.update_layout(title=title or default,
                          xaxis_title="regressor", yaxis_title="β (dimensionless; share after MLP = 1 + β)")
        return fig


def check_ridge(ridge: float) -> float:
    """``ridge`` as a float if it is a finite number >= 0; else a ConfigError naming the fix.

    Example:
        >>> from factlens.recall.regression import check_ridge
        >>> check_ridge(float("nan"))
        Traceback (most recent call last):
        ...
        factlens.errors.ConfigError: ridge=nan; pass a finite ridge >= 0 (0 = plain least squares, 1e-6 = a tiny penalty relative to G's mean diagonal).
    """
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge) or ridge < 0:
        raise ConfigError(f"ridge={ridge!r}; pass a finite ridge >= 0 (0 = plain least squares, 1e-6 = a tiny "
                          "penalty relative to G's mean diagonal).")
    return float(ridge)


def fit_decomposition(
    target: Float[torch.Tensor, "n d"],
    regressors: Float[torch.Tensor, "n k d"],
    *,
    fit_intercept: bool = True,
    ridge: float = 0.0,
    regressor_names: Sequence[str] | None = None,
) -> Decomposition:
    """Fit ``target_i ≈ Σ_j β_j · regressors_ij + c`` by least squares pooled over samples and coordinates.

    Centres both sides, solves ``G β = g`` with ``G_jk = Σ_i ⟨h̃_ij, h̃_ik⟩`` and ``g_j = Σ_i ⟨h̃_ij, ỹ_i⟩``,
    then sets ``c = m̄ − Σ_j β_j h̄_j``; all in float64. With one β per regressor shared over d coordinates
    the fit is identified whenever G is non-singular, which needs n ≥ 2 (with an intercept), not n > k.

    Args:
        target: MLP output at one position, ``[n, d]``.
        regressors: Component outputs (e.g. per-head ``hook_result``) at that position, ``[n, k, d]``.
        fit_intercept: Fit the vector intercept c (False: c = 0, no centring).
        ridge: Tikhonov penalty relative to the mean diagonal of G (scale-free; 1e-6 is tiny).
        regressor_names: k names (default ``x0..x{k-1}``).

    Returns:
        A :class:`Decomposition` (beta and intercept in the target's float dtype and device).

    Raises:
        ShapeError: Mismatched shapes or NaN/inf values.
        ConfigError: Rank-deficient G (too few prompts or collinear regressors) with ``ridge == 0``.

    Example:
        >>> import torch
        >>> from factlens.recall.regression import fit_decomposition
        >>> h = torch.randn(6, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        >>> fit_decomposition(0.5 * h[:, 1], h, fit_intercept=False).beta.round(decimals=6).tolist()
        [0.0, 0.5]
    """
    _check(target, regressors)
    n, k, _ = regressors.shape
    names = [f"x{j}" for j in range(k)] if regressor_names is None else [str(x) for x in regressor_names]
    if len(names) != k:
        raise ShapeError(f"got {len(names)} regressor_names for k={k} regressors; pass exactly {k} names")
    ridge = check_ridge(ridge)
    y, h = target.double(), regressors.double()  # [n, d], [n, k, d]
    y_mean = y.mean(0) if fit_intercept else torch.zeros_like(y[0])  # [d]
    h_mean = h.mean(0) if fit_intercept else torch.zeros_like(h[0])  # [k, d]
    yc, hc = y - y_mean, h - h_mean  # [n, d], [n, k, d]
    G = torch.einsum("nkd,njd->kj", hc, hc)  # [k, k]
    g = torch.einsum("nkd,nd->k", hc, yc)  # [k]
    scale = G.diagonal().mean()
    if ridge > 0 and scale > 0:
        G = G + ridge * scale * torch.eye(k, dtype=G.dtype, device=G.device)
    eig = torch.linalg.eigvalsh(G)  # ascending
    energy = float(torch.einsum("nkd,nkd->k", h, h).max())  # uncentred: centring round-off is ~1e-32 of it
    if eig[-1] <= 0 or eig[0] <= max(float(eig[-1]) / COND_LIMIT, 1e-20 * energy):
        few = f"n={n} prompt(s)" + (" (centring needs n >= 2)" if fit_intercept and n < 2 else "")
        raise ConfigError(
            f"the regression is rank-deficient: G (k={k} regressors) has rank < {k} with {few}; add prompts "
            "(k+1 varied samples normally suffice), drop duplicate or constant regressors, or use ridge>0")
    cond = float(eig[-1] / eig[0])
    if cond > COND_WARN:
        warnings.warn(IllConditionedWarning(
            f"the regression is ill-conditioned: G has condition number {cond:.2g} (> {COND_WARN:.0e}), so the betas "
            "are unstable (nearly collinear regressors: relative noise of 1e-5 can move them by a factor "
            f"{min(cond * 1e-5, 1e6):.2g}). Pass ridge=1e-6 (or larger) to stabilise them, or drop near-duplicate "
            "regressors; result.condition_number records it."), stacklevel=2)
    beta = torch.linalg.solve(G, g)  # [k]
    intercept = y_mean - torch.einsum("k,kd->d", beta, h_mean)  # [d]
    pred = torch.einsum("nkd,k->nd", h, beta) + intercept  # [n, d]
    sse = float(((y - pred) ** 2).sum())
    sst = float(((y - y.mean(0)) ** 2).sum())
    r2 = (1.0 if sse <= 1e-30 else float("nan")) if sst == 0 else 1.0 - sse / sst
    dtype = target.dtype if target.is_floating_point() else torch.float64
    return Decomposition(beta=beta.to(dtype), intercept=intercept.to(dtype), r2=r2, n_samples=n,
                         regressor_names=names, ridge=float(ridge), fit_intercept=fit_intercept,
                         condition_number=cond)


@dataclass
class GroupedDecomposition(ResultDisplay):
    """One :class:`Decomposition` per group label (e.g. per country: the "all same" fits of notes §5.3).

    Example:
        >>> import torch
        >>> from factlens.recall.regression import fit_per_group
        >>> h = torch.randn(8, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        >>> res = fit_per_group(h.sum(1), h, ["a"] * 4 + ["b"] * 4)
        >>> res.labels, res["a"].beta.round(decimals=6).tolist()
        (['a', 'b'], [1.0, 1.0])
    """

    fits: dict[Hashable, Decomposition] = field(default_factory=dict)

    @property
    def labels(self) -> list[Hashable]:
        """Group labels in first-seen order."""
        return list(self.fits)

    def __getitem__(self, label: Hashable) -> Decomposition:
        if label not in self.fits:
            raise ConfigError(f"no group {label!r}; pick one of {self.labels}")
        return self.fits[label]

    def __len__(self) -> int:
        return len(self.fits)

    @property
    def intercepts(self) -> Float[torch.Tensor, "group d"]:
        """Stacked intercepts, one row per group in :attr:`labels` order."""
        return torch.stack([f.intercept for f in self.fits.values()])

    @property
    def betas(self) -> Float[torch.Tensor, "group k"]:
        """Stacked betas, one row per group."""
        return torch.stack([f.beta for f in self.fits.values()])

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: group, regressor, index, beta, share, r2, n_samples."""
        frames = [f.to_dataframe().assign(group=label) for label, f in self.fits.items()]
        df = pd.concat(frames, ignore_index=True)
        return df[["group", *[c for c in df.columns if c != "group"]]]

    def intercept_ranks(self, W_U: Float[torch.Tensor, "d vocab"], answer_ids: Mapping[Hashable, int],
                        ln_scale: float | Float[torch.Tensor, "..."] | None = None,
                        b_U: Float[torch.Tensor, " vocab"] | None = None) -> pd.DataFrame:
        """Rank (0 = top) and logit of each group's answer token under its own intercept (notes §5.5)."""
        rows = []
        for label, f in self.fits.items():
            if label not in answer_ids:
                raise ConfigError(f"answer_ids has no entry for group {label!r}; pass one token id per group")
            logits = f.intercept_logits(W_U, ln_scale, b_U)
            a = int(answer_ids[label])
            rows.append({"group": label, "answer_id": a, "rank": int((logits > logits[a]).sum()),
                         "logit": float(logits[a])})
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None) -> go.Figure:
        """Heat-map of beta (group × regressor), diverging around 0."""
        df = self.to_dataframe()
        z = df.pivot(index="group", columns="index", values="beta").loc[self.labels]
        names = next(iter(self.fits.values())).regressor_names
        fig = go.Figure(go.Heatmap(z=z.values, x=names, y=[str(x) for x in self.labels], colorscale="RdBu",
                                   zmid=0, colorbar_title="β",
                                   hovertemplate="group %{y}<br>%{x}: β = %{z:.3f}<extra></extra>"))
        fig.update_layout(title=title or "β per group", xaxis_title="regressor", yaxis_title="group")
        return fig


def fit_per_group(
    target: Float[torch.Tensor, "n d"],
    regressors: Float[torch.Tensor, "n k d"],
    groups: Sequence[Hashable] | Int[torch.Tensor, " n"],
    **kwargs: Any,
) -> GroupedDecomposition:
    """Fit one decomposition per group label (e.g. ``dataset.subjects``); kwargs: :func:`fit_decomposition`.

    Example:
        >>> import torch
        >>> from factlens.recall.regression import fit_per_group
        >>> h = torch.randn(6, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        >>> len(fit_per_group(h[:, 0], h, torch.tensor([0, 0, 0, 1, 1, 1])))
        2
    """
    _check(target, regressors)
    labels = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(labels) != target.shape[0]:
        raise ShapeError(f"got {len(labels)} group labels for n={target.shape[0]} samples; pass one per "
                         "sample")
    order = list(dict.fromkeys(labels))
    fits = {}
    for label in order:
        idx = torch.tensor([i for i, x in enumerate(labels) if x == label], device=target.device)
        try:
            fits[label] = fit_decomposition(target[idx], regressors[idx], **kwargs)
        except ConfigError as err:
            raise ConfigError(f"group {label!r} ({len(idx)} samples): {err}") from err
    return GroupedDecomposition(fits)


# ---------------------------------------------------------------------------------------------- vocabulary
def _logits(vector: torch.Tensor, W_U: torch.Tensor, ln_scale: float | Float[torch.Tensor, "..."] | None,
            b_U: torch.Tensor | None) -> torch.Tensor:
    if vector.ndim != 1 or W_U.ndim != 2 or W_U.shape[0] != vector.shape[0]:
        raise ShapeError(f"need vector [d] and W_U [d, vocab], got {tuple(vector.shape)} and "
                         f"{tuple(W_U.shape)}; "
                         "pass model.W_U (for an HF lm_head.weight pass weight.T)")
    v = vector.to(W_U.device, W_U.dtype)  # [d]
    if ln_scale is not None:
        s = torch.as_tensor(ln_scale, dtype=W_U.dtype, device=W_U.device).mean()  # per-prompt scales: mean
        if not torch.isfinite(s) or s <= 0:
            raise ShapeError(f"ln_scale must be positive and finite, got {float(s)}; pass "
                             "ln_final.hook_scale at end")
        v = v / s
    logits = v @ W_U  # [vocab]
    if b_U is not None:
        logits = logits + b_U.to(logits.device, logits.dtype)
    return logits


@dataclass
class VocabProjection(ResultDisplay):
    """A vector read through the unembedding: top-k tokens and the rank of chosen answer tokens (0 = top).

    Example:
        >>> import torch
        >>> from factlens.recall.regression import project_to_vocab
        >>> proj = project_to_vocab(torch.tensor([0.0, 1.0]), torch.eye(2), None, k=1, answer_ids=[0])
        >>> proj.top_ids.tolist(), proj.answer_ranks.tolist()
        ([1], [1])
    """

    logits: Float[torch.Tensor, " vocab"]
    top_ids: Int[torch.Tensor, " k"]
    top_logits: Float[torch.Tensor, " k"]
    top_tokens: list[str]
    answer_ids: Int[torch.Tensor, " a"]
    answer_ranks: Int[torch.Tensor, " a"]
    answer_logits: Float[torch.Tensor, " a"]
    answer_tokens: list[str]

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: kind ("top"/"answer"), rank (0 = top), token_id, token, logit."""
        top = pd.DataFrame({"kind": "top", "rank": range(len(self.top_ids)),
                            "token_id": self.top_ids.tolist(), "token": self.top_tokens,
                            "logit": self.top_logits.tolist()})
        ans = pd.DataFrame({"kind": "answer", "rank": self.answer_ranks.tolist(),
                            "token_id": self.answer_ids.tolist(), "token": self.answer_tokens,
                            "logit": self.answer_logits.tolist()})
        return pd.concat([top, ans], ignore_index=True)

    def plot(self, title: str | None = None) -> go.Figure:
        """Horizontal bar chart of the top-k logits (highest on top); answer ranks in the title."""
        labels = [f"{t!r} ({i})" for t, i in zip(self.top_tokens, self.top_ids.tolist())]
        fig = go.Figure(go.Bar(x=self.top_logits.tolist()[::-1], y=labels[::-1], orientation="h",
                               hovertemplate="%{y}: logit %{x:.3f}<extra></extra>"))
        ans = ", ".join(f"{t!r} rank {r}" for t, r in zip(self.answer_tokens, self.answer_ranks.tolist()))
        fig.update_layout(title=title or ("Top tokens" + (f" — {ans}" if ans else "")),
                          xaxis_title="logit (unembedding units)", yaxis_title="token")
        return fig


def project_to_vocab(
    vector: Float[torch.Tensor, " d"],
    W_U: Float[torch.Tensor, "d vocab"],
    tokenizer: Any | None,
    k: int = 10,
    ln_scale: float | Float[torch.Tensor, "..."] | None = None,
    answer_ids: int | Sequence[int] | Int[torch.Tensor, " n"] | None = None,
    b_U: Float[torch.Tensor, " vocab"] | None = None,
) -> VocabProjection:
    """Project a residual-space vector (e.g. an intercept) onto the vocabulary: top-k tokens and answer ranks.

    Args:
        vector: ``[d]``.
        W_U: Unembedding ``[d, vocab]`` (``model.W_U``).
        tokenizer: Decodes token ids (None: ids shown as ``#id``).
        k: Number of top tokens.
        ln_scale: Divide by this final-LayerNorm scale first (tensor: its mean).
        answer_ids: Token ids whose rank (0 = top, ties not counted) and logit to report.
        b_U: Unembedding bias.

    Example:
        >>> import torch
        >>> from factlens.recall.regression import project_to_vocab
        >>> W_U = torch.eye(4)
        >>> proj = project_to_vocab(torch.tensor([0.0, 0.0, 3.0, 1.0]), W_U, None, k=2, answer_ids=2)
        >>> proj.answer_ranks.tolist(), proj.top_ids.tolist()
        ([0], [2, 3])
    """
    logits = at_least_fp32(_logits(vector, W_U, ln_scale, b_U).detach()).cpu()  # [vocab]
    if not 1 <= k <= logits.numel():
        raise ConfigError(f"k={k}; pass 1 <= k <= {logits.numel()} (the vocabulary size)")
    ids = torch.as_tensor([] if answer_ids is None else answer_ids, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() and (ids.min() < 0 or ids.max() >= logits.numel()):
        raise ShapeError(f"answer_ids {ids.tolist()} out of range for a vocabulary of {logits.numel()}")
    top = torch.topk(logits, k)
    dec = (lambda i: f"#{i}") if tokenizer is None else (lambda i: tokenizer.decode([i]))
    ranks = (logits[None, :] > logits[ids][:, None]).sum(1)  # [a]
    return VocabProjection(logits=logits, top_ids=top.indices, top_logits=top.values,
                           top_tokens=[dec(int(i)) for i in top.indices], answer_ids=ids, answer_ranks=ranks,
                           answer_logits=logits[ids], answer_tokens=[dec(int(i)) for i in ids])


__all__ = ["Decomposition", "GroupedDecomposition", "VocabProjection", "fit_decomposition", "fit_per_group",
           "head_names", "project_to_vocab"]
