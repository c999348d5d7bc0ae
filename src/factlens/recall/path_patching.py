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

:func:`path_patch_reference` is that procedure literally, one sender at a time (two full forward passes of
the dataset per sender). :func:`path_patch` computes the same numbers much faster. With every head frozen,
every attention output equals its clean value, plus the sender's own change, which is linear in ``z``:
``(z̄ − z_clean)·W_O[h]``. MLPs act position by position, so pass C changes the residual at ``end`` only,
through the MLPs. :func:`path_patch` therefore stacks copies of the batch, one per sender (a chunk of S
senders is a batch of S·n rows), and per row:

- ``engine="mlp"`` (the default when it applies): starts from the clean ``resid_mid`` of the sender's layer
  at ``end`` plus the sender's change and runs only the model's own ``ln2``/MLP modules from there up, adding
  the clean attention outputs. This is about 25× faster than a TransformerLens per-index sweep on full-size
  GPT-2 (``benchmarks/bench_path_patching.py``). ``"auto"`` checks first that these modules reproduce the
  cached clean MLP outputs, and falls back to ``"forward"`` if they do not;
- ``engine="forward"``: a one-token forward pass of the whole model. factlens hooks set the residual entering
  block 0 to the clean ``end`` residual and every ``hook_attn_out`` to its clean ``end`` value plus the row's
  sender change. For MLP senders, and under ``freeze_mlps``, they also set ``hook_mlp_out``.

For linear metrics (``iw``, ``n``, ``iw-n``, ``logit``), only the unembedding columns that are needed are
computed. The tests check that both engines equal the reference on GPT-2 and OPT, and the benchmark checks
they equal TransformerLens's ``generic_activation_patch``.

D_new's mean is taken at each D_new prompt's own ``end``. (The official code averages at the same absolute
index; for :meth:`~factlens.recall.relations.RelationDataset.counterfactual` datasets with single-token subjects
the two coincide.)

Example:
    >>> import factlens
    >>> from factlens.capitals import path_patch, dataset_for
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
from factlens.hooks import Intervention, hook, intervene
from factlens.models import family_of
from factlens.recall.datasets import RelationDataset
from factlens.recall.logit_lens import covers
from factlens.recall.metrics import EndRun, Metric, end_logits, metric, require_eval, run_at_end
from factlens.resources import run_with_cache as guarded_run_with_cache
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
        method: ``"batched"`` or ``"reference"``; seconds: wall time.
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
    name = spec if isinstance(spec, str) else getattr(spec, "__name__", "metric")

    def scalar(logits: torch.Tensor) -> float:  # logits: [n, vocab] at end
        out = torch.as_tensor(fn(logits))
        if out.ndim > 1 or (out.ndim == 1 and out.shape[0] != logits.shape[0]):
            raise ShapeError(f"metric {name!r} returned shape {tuple(out.shape)} for logits of shape "
                             f"{tuple(logits.shape)}; a metric maps [n, vocab] logits at end to a scalar or [n] "
                             "(one value per prompt): reduce the vocabulary axis, e.g. "
                             "logits.gather(1, answer_ids[:, None])[:, 0], or use capitals.metric(dataset, 'iw')")
        if not torch.isfinite(out).all():
            raise ShapeError(f"metric {name!r} returned NaN or inf; check it on the clean logits (log of 0?) or use "
                             "a log-probability metric")
        return float(out.float().mean())

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

    The same function as :func:`_mlp_fns` (TL's LayerNorm bridge and HF's ``NewGELUActivation`` are several
    element-wise passes each; ``F.layer_norm`` and ``F.gelu(approximate="tanh")`` are one), equal to float
    rounding, which :func:`path_patch` checks against the clean MLP outputs before using it.
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


def _mlp_fns(model) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
    """``x ↦ mlp(ln2(x))`` per layer through the bridge's own modules (None where not callable)."""
    family = family_of(model)
    fns = []
    for blk in model.blocks:
        if family == "gpt2":
            fns.append(lambda x, blk=blk: blk.mlp(blk.ln2(x)))
        elif family == "opt":  # TL's OPT MLPBridge is containerless: compose fc1 → activation → fc2
            act = getattr(blk.original_component, "activation_fn", None)
            if act is None:
                return None
            fns.append(lambda x, blk=blk, act=act: blk.mlp.out(act(getattr(blk.mlp, "in")(blk.ln2(x)))).reshape(x.shape))
        else:
            return None
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

    def add(self, p_idx: torch.Tensor, *, logits: torch.Tensor | None = None, resid: torch.Tensor | None = None):
        """Score rows (prompt indices ``p_idx``) from their final residual ``[r, d]`` or logits ``[r, vocab]``."""
        ln = None if resid is None else self.model.ln_final(resid[:, None])[:, 0]  # [r, d]
        if self.kind in ("iw", "n", "iw-n", "logit") and ln is not None:  # linear: a few columns suffice
            a, sub = self._column(ln, self.ans[p_idx]), self._column(ln, self.subj[p_idx])
            mean = ln @ self.W_mean + self.b_mean
            vals = {"iw": a - mean, "n": sub - mean, "iw-n": a - sub, "logit": a}[self.kind]
            return self._push_values(vals)
        if logits is None:
            logits = ln @ self.W_U + self.b_U  # [r, vocab]
        if self.kind is not None:
            logits = logits.float()
            a = logits.gather(1, self.ans[p_idx][:, None])[:, 0]
            if self.kind in ("prob", "logprob"):
                la = a - torch.logsumexp(logits, -1)
                return self._push_values(la.exp() if self.kind == "prob" else la)
            sub, mean = logits.gather(1, self.subj[p_idx][:, None])[:, 0], logits.mean(-1)
            return self._push_values({"iw": a - mean, "n": sub - mean, "iw-n": a - sub, "logit": a}[self.kind])
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


def path_patch(model: TransformerBridge, dataset: RelationDataset, counterfactual: RelationDataset | None = None, *,
               metric: MetricSpec = "iw", freeze_mlps: bool = False, max_batch: int = 1024, seed: int = 0,
               engine: str = "auto", progress: bool = True, run: EndRun | None = None) -> PathPatchingResult:
    """Batched path patching of every head and MLP → the final residual at ``end`` (% change of ``metric``).

    Args:
        dataset: D_orig, the clean prompts.
        counterfactual: D_new (default ``dataset.counterfactual(seed)``: subject swapped at random).
        metric: ``"iw"`` (default; answer logit − mean logit), ``"n"``, ``"iw-n"``, ``"prob"``, ``"logprob"``,
            ``"logit"``, or a callable taking ``[n, vocab]`` logits at ``end`` (dataset order) and returning
            a scalar or ``[n]`` (averaged), e.g. ``factlens.capitals.metric(dataset, "iw")``.
        freeze_mlps: Freeze every MLP too (direct paths only).
        max_batch: Rows (sender × prompt) per step; clean/counterfactual passes use ``min(max_batch, 64)``.
        engine: ``"mlp"`` runs pass C on the ``end`` residual only, through the model's own ``ln2``/MLP
            modules from the sender's layer upwards (fastest); ``"forward"`` runs each row as a one-token
            forward pass of the whole model with factlens hooks; ``"auto"`` uses ``"mlp"`` when it
            reproduces the clean MLP outputs, else ``"forward"``.
        progress: tqdm progress bar.
        run: A shared clean :class:`~factlens.recall.metrics.EndRun` of ``dataset`` to use as pass B when it
            holds the hooks pass B needs (``blocks.0.hook_resid_pre`` and every layer's ``hook_z``,
            ``hook_attn_out``, ``hook_mlp_out``, ``hook_resid_mid``) and the logits.

    Returns:
        :class:`PathPatchingResult`.

    Raises:
        ModeError: The model is in training mode.

    Example:
        >>> import torch, factlens
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> res = path_patch(model, ds, metric="iw")
        >>> res.plot().write_html("path_patching.html")                    # doctest: +SKIP
    """
    require_eval(model, "path patching")
    if engine not in ("auto", "mlp", "forward"):
        raise ConfigError(f"engine={engine!r}; use 'auto', 'mlp' or 'forward'")
    if max_batch < 1:
        raise ConfigError(f"max_batch={max_batch}; pass max_batch >= 1")
    t0 = time.perf_counter()
    counterfactual = dataset.counterfactual(seed) if counterfactual is None else counterfactual
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n, device = len(dataset), model.cfg.device
    fwd_batch = min(max_batch, 64)

    z_mean, mlp_mean = _counterfactual_means(model, counterfactual, fwd_batch, progress)
    names = (["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
             + [f"blocks.{layer}.hook_attn_out" for layer in range(L)]
             + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
             + [f"blocks.{layer}.hook_resid_mid" for layer in range(L)])
    clean = run if covers(run, names, logits=True) else run_at_end(model, dataset, names, max_batch=fwd_batch,
                                                                    progress=progress, desc="pass B (clean)")
    metric_fn, metric_name = _metric_fn(metric, dataset)
    clean_metric = metric_fn(clean.logits)
    z_clean = clean.stack("blocks.{}.attn.hook_z", L)  # [n, L, H, dh]
    attn_clean = clean.stack("blocks.{}.hook_attn_out", L)  # [n, L, d]
    mlp_clean = clean.stack("blocks.{}.hook_mlp_out", L)  # [n, L, d]
    mid_clean = clean.stack("blocks.{}.hook_resid_mid", L)  # [n, L, d]
    W_O = torch.stack([model.blocks[layer].attn.W_O.detach() for layer in range(L)])  # [L, H, dh, d]

    mlp_fns, err = None, float("nan")
    if engine != "forward":  # the fused fns first, then the bridge's own modules; each must reproduce pass B
        for candidate in (_fused_mlp_fns(model), _mlp_fns(model)):
            if candidate is None:
                continue
            with torch.no_grad():
                err = max(float((fn(mid_clean[:, j : j + 1])[:, 0] - mlp_clean[:, j]).abs().max()) for j, fn in
                          enumerate(candidate))
            if err <= 1e-4 * max(1.0, float(mlp_clean.abs().max())):
                mlp_fns = candidate
                break
        if mlp_fns is None and engine == "mlp":
            raise ConfigError(f"engine='mlp' does not reproduce this model's MLP outputs (max error {err:.2e}) or "
                              "is not available for this architecture; use engine='forward'")
    use_mlp = mlp_fns is not None

    senders = _senders(L, H)
    # rows go sender by sender in layer order (heads, then the MLP, of layer 0, 1, ...), so that in a chunk the
    # rows still active at layer j are a prefix: pass C slices instead of gathering and scattering
    order = sorted(range(len(senders)), key=lambda i: senders[i][1])
    order_t = torch.tensor(order, device=device)
    kind = torch.tensor([0 if s[0] == "head" else 1 for s in senders], device=device)
    s_layer = torch.tensor([s[1] for s in senders], device=device)
    scorer = _Scorer(model, dataset, metric, n)
    total = len(senders) * n
    end_tokens = dataset.tokens[torch.arange(n), dataset.end].to(device)  # [n]
    for start in track(range(0, total, max_batch), device=device, desc="path patching (pass C/D)",
                       disable=not progress):
        flat = torch.arange(start, min(start + max_batch, total), device=device)
        s_idx, p_idx = order_t[flat // n], flat % n
        r_kind, r_layer = kind[s_idx], s_layer[s_idx]
        delta = _head_deltas(senders, s_idx, p_idx, z_mean, z_clean, W_O).to(attn_clean.dtype)  # [r, d]
        with torch.no_grad():
            if use_mlp:
                scorer.add(p_idx, resid=_pass_c_mlp(mlp_fns, p_idx, r_kind, r_layer, delta, mid_clean, attn_clean,
                                                    mlp_clean, mlp_mean, freeze_mlps))
            else:
                scorer.add(p_idx, logits=_pass_c_forward(model, end_tokens, p_idx, r_kind, r_layer, delta, clean,
                                                         attn_clean, mlp_clean, mlp_mean, freeze_mlps))
    values = [0.0] * len(senders)
    for pos, i in enumerate(order):  # back to the senders' own order (heads by layer, then MLPs)
        values[i] = scorer.sums[pos]
    return _result(values, clean_metric, L, H, metric=metric_name, receiver=f"blocks.{L - 1}.hook_resid_post",
                   freeze_mlps=freeze_mlps, n_prompts=n, n_counterfactual=len(counterfactual),
                   method=f"batched ({'mlp' if use_mlp else 'forward'} engine)", seconds=time.perf_counter() - t0)


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


def _pass_c_mlp(mlp_fns, p_idx, r_kind, r_layer, delta, mid_clean, attn_clean, mlp_clean, mlp_mean,
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


def _pass_c_forward(model, end_tokens, p_idx, r_kind, r_layer, delta, clean, attn_clean, mlp_clean, mlp_mean,
                    freeze_mlps) -> torch.Tensor:
    """Pass C as one-token forward passes (the row's clean ``end`` residual enters block 0); logits [r, vocab]."""
    L = attn_clean.shape[1]
    resid0 = clean["blocks.0.hook_resid_pre"]
    iv = Intervention("path patching (one-token rows)")
    iv.add("blocks.0.hook_resid_pre", lambda t, hook: resid0[p_idx][:, None].to(t.dtype), copy_input=False)
    for layer in range(L):
        def set_attn(t, hook, layer=layer):
            out = attn_clean[p_idx, layer] + torch.where((r_layer == layer)[:, None], delta, 0.0)
            return out[:, None].to(t.dtype)

        iv.add(f"blocks.{layer}.hook_attn_out", set_attn, copy_input=False,
               expect_change=False)  # freezes: may be a no-op
        msel = (r_kind == 1) & (r_layer == layer)
        if freeze_mlps or bool(msel.any()):
            def set_mlp(t, hook, layer=layer, msel=msel):
                out = mlp_clean[p_idx, layer].clone() if freeze_mlps else t[:, 0].clone()  # [r, d]
                out[msel] = mlp_mean[layer].to(out.dtype)
                return out[:, None].to(t.dtype)

            iv.add(f"blocks.{layer}.hook_mlp_out", set_mlp, copy_input=False, expect_change=False)
    with intervene(model, iv):
        return model(end_tokens[p_idx][:, None])[:, 0]


# ------------------------------------------------------------------------------------------------ reference
def path_patch_reference(model: TransformerBridge, dataset: RelationDataset, counterfactual: RelationDataset | None = None, *,
                         metric: MetricSpec = "iw", freeze_mlps: bool = False, seed: int = 0,
                         progress: bool = False) -> PathPatchingResult:
    """The official four-pass procedure, one sender at a time, with full-sequence forward passes.

    Slow (two forward passes of the whole dataset per sender); kept as the ground truth that
    :func:`path_patch` is tested against. Same arguments and result as :func:`path_patch`.

    Example:
        >>> import torch, factlens
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> ref = path_patch_reference(model, ds.select(range(8)))
    """
    require_eval(model, "path patching")
    t0 = time.perf_counter()
    counterfactual = dataset.counterfactual(seed) if counterfactual is None else counterfactual
    metric_fn, metric_name = _metric_fn(metric, dataset)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    device = model.cfg.device
    tokens = dataset.tokens.to(device)
    ends = dataset.end.to(device)
    rows = torch.arange(len(dataset), device=device)
    receiver = f"blocks.{L - 1}.hook_resid_post"

    with torch.no_grad():
        # pass A: D_new means at each D_new prompt's end
        want_new = [f"blocks.{layer}.{n}" for layer in range(L) for n in ("attn.hook_z", "hook_mlp_out")]
        _, cache_new = guarded_run_with_cache(model, counterfactual.tokens.to(device), names_filter=want_new)
        r_new, e_new = torch.arange(len(counterfactual), device=device), counterfactual.end.to(device)
        z_mean = {layer: cache_new[f"blocks.{layer}.attn.hook_z"][r_new, e_new].mean(0) for layer in range(L)}
        mlp_mean = {layer: cache_new[f"blocks.{layer}.hook_mlp_out"][r_new, e_new].mean(0) for layer in range(L)}
        del cache_new
        # pass B: clean cache
        want = [f"blocks.{layer}.attn.hook_{act}" for layer in range(L) for act in "qkv"]
        want += [f"blocks.{layer}.hook_mlp_out" for layer in range(L)] if freeze_mlps else []
        clean_logits, cache = guarded_run_with_cache(model, tokens, names_filter=want)
        clean_metric = metric_fn(end_logits(clean_logits, dataset))

    def frozen(name):
        return lambda t, hook: cache[name].to(t.dtype)

    freeze = Intervention("freeze q/k/v (and MLPs)")
    for layer in range(L):
        for act in ("q", "k", "v"):
            name = f"blocks.{layer}.attn.hook_{act}"
            freeze.add(name, frozen(name), copy_input=False)
        if freeze_mlps:
            name = f"blocks.{layer}.hook_mlp_out"
            freeze.add(name, frozen(name), copy_input=False)

    values = []
    for kind, layer, head in track(_senders(L, H), device=device, desc="path patching (reference)",
                                   disable=not progress):
        if kind == "head":
            def set_sender(t, hook, layer=layer, head=head):  # hook_z [b, p, H, dh]
                out = t.clone()
                out[rows, ends, head] = z_mean[layer][head].to(t.dtype)
                return out

            sender = hook(f"blocks.{layer}.attn.hook_z", set_sender, f"sender L{layer}H{head}")
        else:
            def set_sender(t, hook, layer=layer):  # hook_mlp_out [b, p, d]
                out = t.clone()
                out[rows, ends] = mlp_mean[layer].to(t.dtype)
                return out

            sender = hook(f"blocks.{layer}.hook_mlp_out", set_sender, f"sender MLP{layer}")
        store = {}

        def keep(t, hook, store=store):
            store["r"] = t[rows, ends].clone()

        # pass C: frozen heads, sender replaced at end; cache the receiver at end
        with torch.no_grad(), intervene(model, freeze, on_no_effect="ignore"), intervene(model, sender), \
                intervene(model, hook(receiver, keep), on_no_effect="ignore"):
            model(tokens, return_type=None)

        # pass D: clean run with the receiver at end overwritten
        def set_receiver(t, hook, store=store):
            out = t.clone()
            out[rows, ends] = store["r"]
            return out

        with torch.no_grad(), intervene(model, hook(receiver, set_receiver), on_no_effect="ignore"):
            patched_logits = model(tokens)
        values.append(metric_fn(end_logits(patched_logits, dataset)))
    return _result(values, clean_metric, L, H, metric=metric_name, receiver=receiver, freeze_mlps=freeze_mlps,
                   n_prompts=len(dataset), n_counterfactual=len(counterfactual), method="reference",
                   seconds=time.perf_counter() - t0)


__all__ = ["PathPatchingResult", "path_patch", "path_patch_reference"]
