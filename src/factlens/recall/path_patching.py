"""Path patching from every head and MLP to the final residual at ``end`` (Lv et al. 2024 §4.1).

The official procedure (``fact_utils.path_patching``), for one sender:

- **A.** Run D_new (the counterfactual prompts) and take the mean over prompts of the sender's output at
  ``end`` (a head's ``hook_z`` row, read through ``W_O[h]``, or ``hook_mlp_out``).
- **B.** Run D_orig (the clean prompts) and cache everything.
- **C.** Rerun D_orig with ``hook_q``/``hook_k``/``hook_v`` of *every* head frozen to their clean values,
  optionally every MLP frozen too (``freeze_mlps``), and the sender's output at ``end`` replaced by the
  D_new mean. Cache the receiver ``blocks.{L-1}.hook_resid_post`` at ``end``.
- **D.** Run D_orig clean with the receiver at ``end`` overwritten and compute the metric.

The effect is reported as ``100·(patched − clean)/clean`` (% Δ metric).

Pass D only re-reads the receiver at ``end``, so its logits there are ``unembed(ln_final(receiver))``.

:func:`path_patch` computes the same numbers as that procedure, much faster. With every head frozen, every
attention output equals its clean value, plus the sender's own change, which is linear in ``z``:
``(z̄ − z_clean)·W_O[h]``. MLPs act position by position, so pass C changes the residual at ``end`` only,
through the MLPs. :func:`path_patch` therefore stacks copies of the batch, one per sender (a chunk of S
senders is a batch of S·n rows), starts each row from the clean ``resid_mid`` of the sender's layer at ``end``
plus the sender's change, and runs only the model's own ``ln2``/MLP weights from there up (with fused
LayerNorm and activation kernels), adding the clean attention outputs. It first checks that these MLP
functions reproduce the cached clean MLP outputs, and raises if they do not. This is about 25× faster than a
TransformerLens per-index sweep on full-size GPT-2 (``benchmarks/bench_path_patching.py``, which checks the
numbers equal TransformerLens's ``generic_activation_patch``); the tests check them against the literal
procedure, one sender at a time (``tests/reference_recall.py``).

For linear metrics (``iw``, ``n``, ``iw-n``, ``logit``), only the unembedding columns that are needed are
computed.

D_new's mean is taken at each D_new prompt's own ``end``. (The official code averages at the same absolute
index; for :meth:`~factlens.recall.relations.RelationDataset.counterfactual` datasets with single-token subjects
the two coincide.)

Example:
    >>> import factlens
    >>> from factlens.recall import path_patch, dataset_for
    >>> model = factlens.tiny("gpt2")
    >>> res = path_patch(model, dataset_for(model, n=16), progress=False)
    >>> res.values.shape, res.mlp.shape
    (torch.Size([2, 4]), torch.Size([2]))
    >>> res.top(3)[["name", "pct_change"]]                             # doctest: +SKIP
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float

from factlens.display import ResultDisplay
from factlens.errors import ConfigError, ShapeError
from factlens.inputs import at_least_fp32, check_seed
from factlens.models import family_of
from factlens.recall.datasets import RelationDataset
from factlens.recall.forward import EndRun, require_eval, reuse_run, run_at_end
from factlens.recall.metrics import LINEAR_KINDS, Metric, check_metric, kind_values, linear_kind, metric
from factlens.resources import track

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

MetricSpec = str | Metric


@dataclass
class PathPatchingResult(ResultDisplay):
    """Sender → ``blocks.{L-1}.hook_resid_post`` at ``end``: % change of the metric per head and per MLP.

    Attributes:
        values: % change per head, ``[layer, head]``.
        mlp: % change per MLP, ``[layer]``.
        patched_heads: The patched metric per head, ``[layer, head]``.
        patched_mlp: The patched metric per MLP, ``[layer]``.
        clean: The clean metric.
        metric: Metric name.
        receiver: The receiver hook (at ``end``).
        freeze_mlps: Whether MLPs were frozen in pass C.
        n_prompts: Clean prompts; n_counterfactual: D_new prompts.
        method: How it was computed (``"batched"``); seconds: wall time.
    """

    values: Float[torch.Tensor, "layer head"]
    mlp: Float[torch.Tensor, " layer"]
    patched_heads: Float[torch.Tensor, "layer head"]
    patched_mlp: Float[torch.Tensor, " layer"]
    clean: float
    metric: str
    receiver: str
    freeze_mlps: bool
    n_prompts: int
    n_counterfactual: int
    method: str = "batched"
    seconds: float = float("nan")

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: component (head/mlp), layer, head (−1 for MLPs), name, patched, clean, pct_change."""
        L, H = self.values.shape
        rows = [{"component": "head", "layer": layer, "head": h, "name": f"L{layer}H{h}",
                 "patched": float(self.patched_heads[layer, h]), "pct_change": float(self.values[layer, h])}
                for layer in range(L) for h in range(H)]
        rows += [{"component": "mlp", "layer": layer, "head": -1, "name": f"MLP{layer}",
                  "patched": float(self.patched_mlp[layer]), "pct_change": float(self.mlp[layer])}
                 for layer in range(L)]
        df = pd.DataFrame(rows)
        df["clean"] = self.clean
        df["metric"] = self.metric
        return df

    def top(self, k: int = 10, by: str = "abs", component: str | None = None) -> pd.DataFrame:
        """The k senders with the largest effect: ``by="abs"`` (|%|), ``"neg"`` (most negative: the metric
        drops, e.g. mover heads) or ``"pos"``; ``component`` = ``"head"``/``"mlp"`` restricts the senders."""
        df = self.to_dataframe()
        if component is not None:
            df = df[df["component"] == component]
        key = {"abs": df["pct_change"].abs(), "neg": -df["pct_change"], "pos": df["pct_change"]}.get(by)
        if key is None:
            raise ConfigError(f"by={by!r}; use 'abs', 'neg' or 'pos'")
        return df.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def plot(self, title: str | None = None) -> go.Figure:
        """Heat-map layers × heads plus an MLP column, % change on a diverging scale centred at 0."""
        L, H = self.values.shape
        z = torch.cat([self.values, self.mlp[:, None]], dim=1).tolist()  # [L, H+1]
        x = [f"H{h}" for h in range(H)] + ["MLP"]
        y = [f"L{layer}" for layer in range(L)]
        text = [[f"{'MLP' + str(layer) if h == H else f'L{layer}H{h}'}: {z[layer][h]:+.2f} %" for h in range(H + 1)]
                for layer in range(L)]
        bound = max(1e-9, max(abs(v) for row in z for v in row if v == v))
        fig = go.Figure(go.Heatmap(z=z, x=x, y=y, text=text, hoverinfo="text", colorscale="RdBu", zmid=0,
                                   zmin=-bound, zmax=bound, colorbar_title="% Δ"))
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(title=title or f"Path patching → {self.receiver} at end ({self.metric}; clean = "
                                         f"{self.clean:.4g})",
                          xaxis_title="head (last column: MLP)", yaxis_title="layer")
        return fig


# --------------------------------------------------------------------------------------------------- shared
def _metric_fn(spec: MetricSpec, dataset: RelationDataset) -> tuple[Callable[[torch.Tensor], float], str]:
    fn = metric(dataset, spec) if isinstance(spec, str) else spec
    check_metric(fn, dataset)
    name = spec if isinstance(spec, str) else getattr(spec, "__name__", "metric")

    def scalar(logits: torch.Tensor) -> float:  # logits: [n, vocab] at end
        out = torch.as_tensor(fn(logits))
        if out.ndim > 1 or (out.ndim == 1 and out.shape[0] != logits.shape[0]):
            raise ShapeError(f"metric {name!r} returned shape {tuple(out.shape)} for logits of shape "
                             f"{tuple(logits.shape)}; a metric maps [n, vocab] logits at end to a scalar or [n] "
                             "(one value per prompt): reduce the vocabulary axis, e.g. "
                             "logits.gather(1, answer_ids[:, None])[:, 0], or use factlens.recall.metric(dataset, 'iw')")
        if not torch.isfinite(out).all():
            raise ShapeError(f"metric {name!r} returned NaN or inf; check it on the clean logits (log of 0?) or use "
                             "a log-probability metric")
        return float(at_least_fp32(out).mean())

    return scalar, name


def _pct(patched: torch.Tensor, clean: float) -> torch.Tensor:
    if clean == 0:
        warnings.warn("the clean metric is exactly 0, so % change is undefined (inf/nan); use another metric",
                      stacklevel=3)
    return 100.0 * (patched - clean) / clean


def _counterfactual_means(model, counterfactual: RelationDataset, max_batch: int, progress: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass A: mean over D_new of every head's ``z`` and every MLP's output at ``end``."""
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)] + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
    run = run_at_end(model, counterfactual, names, logits=False, max_batch=max_batch, progress=progress,
                     desc="pass A (D_new)")
    z_mean = run.stack("blocks.{}.attn.hook_z", L).mean(0)  # [L, H, dh]
    mlp_mean = run.stack("blocks.{}.hook_mlp_out", L).mean(0)  # [L, d]
    return z_mean, mlp_mean


def _senders(L: int, H: int) -> list[tuple[str, int, int]]:
    return [("head", layer, h) for layer in range(L) for h in range(H)] + [("mlp", layer, -1) for layer in range(L)]


def _result(values: list[float], clean: float, L: int, H: int, **kw) -> PathPatchingResult:
    patched = torch.tensor(values, dtype=torch.float64)
    heads, mlps = patched[: L * H].reshape(L, H), patched[L * H :]
    return PathPatchingResult(values=_pct(heads, clean), mlp=_pct(mlps, clean), patched_heads=heads,
                              patched_mlp=mlps, clean=clean, **kw)


# -------------------------------------------------------------------------------------------------- batched
def _fused_mlp_fns(model) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
    """``x ↦ mlp(ln2(x))`` per layer on the wrapped HF modules, with fused LayerNorm and activation kernels.

    The function the bridge's ``ln2``/``mlp`` compute, with one kernel where TL's LayerNorm bridge and HF's
    ``NewGELUActivation`` take several element-wise passes (``F.layer_norm``, ``F.gelu(approximate="tanh")``),
    equal to float rounding, which :func:`path_patch` checks against the clean MLP outputs before using it.
    None for an architecture it does not know.
    """
    from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

    tanh = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
    fused = {NewGELUActivation: tanh, GELUTanh: tanh, GELUActivation: F.gelu,
             torch.nn.ReLU: F.relu}
    family = family_of(model)
    fns = []
    for blk in model.blocks:
        ln = getattr(blk.ln2, "original_component", None)
        fc_in = getattr(getattr(blk.mlp, "in", None), "original_component", None)
        fc_out = getattr(getattr(blk.mlp, "out", None), "original_component", None)
        if family == "gpt2":
            act = getattr(getattr(blk.mlp, "original_component", None), "act", None)
        elif family == "opt":
            act = getattr(blk.original_component, "activation_fn", None)
        else:
            return None
        if not isinstance(ln, torch.nn.LayerNorm) or fc_in is None or fc_out is None or act is None:
            return None
        act_fn = fused.get(type(act)) or act

        def fn(x, ln=ln, fc_in=fc_in, fc_out=fc_out, act_fn=act_fn):
            return fc_out(act_fn(fc_in(F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps))))

        fns.append(fn)
    return fns


class _Scorer:
    """Turns rows' final residuals (or logits) into per-sender metric values, in sender-major row order."""

    def __init__(self, model, dataset: RelationDataset, spec: MetricSpec, n: int):
        self.model, self.dataset, self.n = model, dataset, n
        self.kind = spec if isinstance(spec, str) else None
        self.fn, self.name = _metric_fn(spec, dataset)
        device = model.cfg.device
        self.W_U, self.b_U = model.W_U.detach(), model.b_U.detach()
        self.W_mean, self.b_mean = self.W_U.mean(1), self.b_U.mean()
        self.ans, self.subj = dataset.answer_ids.to(device), dataset.subject_ids.to(device)
        self.sums: list[float] = []
        self.buffer: list[torch.Tensor] = []
        self.acc, self.count = 0.0, 0

    def _column(self, ln: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (ln * self.W_U[:, ids].T).sum(-1) + self.b_U[ids]  # [r]

    def add(self, p_idx: torch.Tensor, resid: torch.Tensor) -> None:
        """Score rows (prompt indices ``p_idx``) from their final residual at ``end``, ``[r, d]``."""
        ln = self.model.ln_final(resid[:, None])[:, 0]  # [r, d]
        if self.kind in LINEAR_KINDS:  # linear: three columns suffice
            a, sub = self._column(ln, self.ans[p_idx]), self._column(ln, self.subj[p_idx])
            return self._push_values(linear_kind(self.kind, a, sub, ln @ self.W_mean + self.b_mean))
        logits = ln @ self.W_U + self.b_U  # [r, vocab]
        if self.kind is not None:
            return self._push_values(kind_values(self.kind, logits, self.ans[p_idx], self.subj[p_idx]))
        self.buffer.append(logits)  # callables see the whole dataset's [n, vocab] logits of one sender
        buf = torch.cat(self.buffer)
        while len(buf) >= self.n:
            self.sums.append(self.fn(buf[: self.n]))
            buf = buf[self.n :]
        self.buffer = [buf] if len(buf) else []

    def _push_values(self, vals: torch.Tensor) -> None:
        for v in vals.double().tolist():
            self.acc += v
            self.count += 1
            if self.count == self.n:
                self.sums.append(self.acc / self.n)
                self.acc, self.count = 0.0, 0


def path_patch_hooks(model: TransformerBridge) -> list[str]:
    """The hooks :func:`path_patch` reads at ``end`` from the clean run (pass B; it also needs the logits).

    Example:
        >>> import factlens
        >>> from factlens.recall.path_patching import path_patch_hooks
        >>> path_patch_hooks(factlens.tiny("gpt2"))[:2]
        ['blocks.0.hook_resid_pre', 'blocks.0.attn.hook_z']
    """
    L = model.cfg.n_layers
    return (["blocks.0.hook_resid_pre"]
            + [f"blocks.{layer}.{name}" for name in ("attn.hook_z", "hook_attn_out", "hook_mlp_out", "hook_resid_mid")
               for layer in range(L)])


def path_patch(model: TransformerBridge, dataset: RelationDataset, counterfactual: RelationDataset | None = None, *,
               metric: MetricSpec = "iw", freeze_mlps: bool = False, max_batch: int = 1024, seed: int = 0,
               progress: bool = True, run: EndRun | None = None) -> PathPatchingResult:
    """Batched path patching of every head and MLP → the final residual at ``end`` (% change of ``metric``).

    Args:
        dataset: D_orig, the clean prompts.
        counterfactual: D_new (default ``dataset.counterfactual(seed)``: subject swapped at random).
        metric: ``"iw"`` (default; answer logit − mean logit), ``"n"``, ``"iw-n"``, ``"prob"``, ``"logprob"``,
            ``"logit"``, or a callable taking ``[n, vocab]`` logits at ``end`` (dataset order) and returning
            a scalar or ``[n]`` (averaged), e.g. ``factlens.recall.metric(dataset, "iw")``.
        freeze_mlps: Freeze every MLP too (direct paths only).
        max_batch: Rows (sender × prompt) per step; clean/counterfactual passes use ``min(max_batch, 64)``.
        progress: tqdm progress bar.
        run: A clean :class:`~factlens.recall.forward.EndRun` of ``dataset`` to use as pass B; it must hold
            :func:`path_patch_hooks` and the logits.

    Returns:
        :class:`PathPatchingResult`.

    Raises:
        ModeError: The model is in training mode, or not in compatibility mode (load it with ``compat=True``).
        ConfigError: ``run`` lacks a hook, or the model's MLPs are not reproduced by ``mlp(ln2(resid_mid))`` at
            ``end`` (an architecture other than pre-norm GPT-2/OPT).

    Example:
        >>> import factlens
        >>> from factlens.recall import dataset_for, path_patch
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> ds = dataset_for(model, n=16)
        >>> res = path_patch(model, ds, metric="iw", progress=False)
        >>> res.plot().write_html("path_patching.html")                    # doctest: +SKIP
    """
    check_seed(seed)
    require_eval(model, "path patching")
    if max_batch < 1:
        raise ConfigError(f"max_batch={max_batch}; pass max_batch >= 1")
    t0 = time.perf_counter()
    counterfactual = dataset.counterfactual(seed) if counterfactual is None else counterfactual
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n, device = len(dataset), model.cfg.device
    fwd_batch = min(max_batch, 64)

    z_mean, mlp_mean = _counterfactual_means(model, counterfactual, fwd_batch, progress)
    clean = reuse_run(model, dataset, run, path_patch_hooks(model), logits=True, max_batch=fwd_batch,
                      progress=progress, desc="path patching (pass B, clean)")
    metric_fn, metric_name = _metric_fn(metric, dataset)
    clean_metric = metric_fn(clean.logits)
    z_clean = clean.stack("blocks.{}.attn.hook_z", L)  # [n, L, H, dh]
    attn_clean = clean.stack("blocks.{}.hook_attn_out", L)  # [n, L, d]
    mlp_clean = clean.stack("blocks.{}.hook_mlp_out", L)  # [n, L, d]
    mid_clean = clean.stack("blocks.{}.hook_resid_mid", L)  # [n, L, d]
    W_O = torch.stack([model.blocks[layer].attn.W_O.detach() for layer in range(L)])  # [L, H, dh, d]
    mlp_fns = _checked_mlp_fns(model, mid_clean, mlp_clean)

    senders = _senders(L, H)
    # rows go sender by sender in layer order (heads, then the MLP, of layer 0, 1, ...), so that in a chunk the
    # rows still active at layer j are a prefix: pass C slices instead of gathering and scattering
    order = sorted(range(len(senders)), key=lambda i: senders[i][1])
    order_t = torch.tensor(order, device=device)
    kind = torch.tensor([0 if s[0] == "head" else 1 for s in senders], device=device)
    s_layer = torch.tensor([s[1] for s in senders], device=device)
    scorer = _Scorer(model, dataset, metric, n)
    total = len(senders) * n
    for start in track(range(0, total, max_batch), device=device, desc="path patching (pass C/D)",
                       disable=not progress):
        flat = torch.arange(start, min(start + max_batch, total), device=device)
        s_idx, p_idx = order_t[flat // n], flat % n
        r_kind, r_layer = kind[s_idx], s_layer[s_idx]
        delta = _head_deltas(senders, s_idx, p_idx, z_mean, z_clean, W_O).to(attn_clean.dtype)  # [r, d]
        with torch.no_grad():
            scorer.add(p_idx, _pass_c(mlp_fns, p_idx, r_kind, r_layer, delta, mid_clean, attn_clean, mlp_clean,
                                      mlp_mean, freeze_mlps))
    values = [0.0] * len(senders)
    for pos, i in enumerate(order):  # back to the senders' own order (heads by layer, then MLPs)
        values[i] = scorer.sums[pos]
    return _result(values, clean_metric, L, H, metric=metric_name, receiver=f"blocks.{L - 1}.hook_resid_post",
                   freeze_mlps=freeze_mlps, n_prompts=n, n_counterfactual=len(counterfactual), method="batched",
                   seconds=time.perf_counter() - t0)


def _checked_mlp_fns(model, mid_clean: Float[torch.Tensor, "n layer d_model"],
                     mlp_clean: Float[torch.Tensor, "n layer d_model"]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`_fused_mlp_fns`, once they reproduce every layer's cached clean MLP output from its ``resid_mid``."""
    fns = _fused_mlp_fns(model)
    if fns is None:
        raise ConfigError(f"path_patch recomputes the MLPs at end from ln2 and the MLP weights, which it knows for "
                          f"pre-norm GPT-2 and OPT, not for {family_of(model)!r} ({model.cfg.model_name})")
    with torch.no_grad():
        err = max(float((fn(mid_clean[:, j : j + 1])[:, 0] - mlp_clean[:, j]).abs().max()) for j, fn in enumerate(fns))
    tol = max(1e-4, 100 * torch.finfo(mlp_clean.dtype).eps) * max(1.0, float(mlp_clean.abs().max()))
    if not err <= tol:
        raise ConfigError(f"path_patch's MLP recomputation does not reproduce this model's MLP outputs at end (max "
                          f"error {err:.2e} > {tol:.1e}): it supports pre-norm GPT-2 and OPT (not post-norm "
                          "OPT-350m); load one of those")
    return fns


def _head_deltas(senders: list[tuple[str, int, int]], s_idx: torch.Tensor, p_idx: torch.Tensor,
                z_mean: Float[torch.Tensor, "layer head d_head"], z_clean: Float[torch.Tensor, "n layer head d_head"],
                W_O: Float[torch.Tensor, "layer head d_head d_model"]) -> Float[torch.Tensor, "r d_model"]:
    """Each row's change of its sender head's output at ``end``, ``(z̄ − z_clean)·W_O[h]`` (0 for MLP senders).

    Rows (sender ``s_idx``, prompt ``p_idx``) are sender-major, so each sender's rows are one run: one
    ``[c, d_head] @ [d_head, d_model]`` matmul per sender, not a mat-vec per row over a gathered copy of ``W_O``.
    """
    delta = torch.zeros(len(s_idx), W_O.shape[-1], device=W_O.device, dtype=W_O.dtype)  # [r, d]
    ids, counts = torch.unique_consecutive(s_idx, return_counts=True)
    pos = 0
    for s, c in zip(ids.tolist(), counts.tolist()):
        what, layer, head = senders[s]
        if what == "head":
            dz = z_mean[layer, head] - z_clean[p_idx[pos : pos + c], layer, head]  # [c, dh]
            delta[pos : pos + c] = dz @ W_O[layer, head]  # [c, d]
        pos += c
    return delta


def _pass_c(mlp_fns, p_idx, r_kind, r_layer, delta, mid_clean, attn_clean, mlp_clean, mlp_mean,
                freeze_mlps) -> torch.Tensor:
    """Pass C on the ``end`` residual: from the sender's layer up, clean attention outputs, recomputed MLPs.

    Rows are sorted by sender layer (``r_layer`` non-decreasing), so the rows active at layer ``j`` (sender
    layer <= j) are the prefix ``[:k1]`` and those whose sender sits in layer ``j`` are ``[k0:k1]``.
    """
    L = len(mlp_fns)
    r = torch.zeros_like(delta)  # [r, d]
    bounds = torch.searchsorted(r_layer, torch.arange(L + 1, device=r_layer.device)).tolist()  # first row >= j
    lo = int(r_layer[0])
    for j in range(lo, L):
        k0, k1 = bounds[j], bounds[j + 1]
        if j > lo and k0:
            r[:k0] += attn_clean[p_idx[:k0], j]  # rows from earlier layers: clean attention of this layer
        r[k0:k1] = mid_clean[p_idx[k0:k1], j] + delta[k0:k1]  # the sender's layer: clean resid_mid + change
        if not k1:
            continue
        mlp = mlp_clean[p_idx[:k1], j] if freeze_mlps else mlp_fns[j](r[:k1, None])[:, 0]  # [k1, d]
        ablate = (r_kind[k0:k1] == 1)[:, None]  # an MLP sender of this layer: its mean-ablated output
        mlp[k0:k1] = torch.where(ablate, mlp_mean[j].to(mlp.dtype), mlp[k0:k1])
        r[:k1] += mlp
    return r


__all__ = ["PathPatchingResult", "path_patch", "path_patch_hooks"]
