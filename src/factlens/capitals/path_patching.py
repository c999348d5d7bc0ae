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

:func:`path_patch_reference` is that procedure literally, one sender at a time (2 full forward passes per
sender). :func:`path_patch` computes the same numbers in a fraction of the time. With every head frozen,
every attention output equals its clean value (plus the sender's change, which is linear in ``z``:
``(z̄ − z_clean)·W_O[h]``), and MLPs act position-wise, so pass C changes the residual at ``end`` only,
through the MLPs. Pass D's logits at ``end`` are ``unembed(ln_final(receiver))``. :func:`path_patch` therefore
stacks copies of the batch, one copy per sender (a chunk of S senders is a batch of S·n rows), and runs
each row as a **one-token** forward pass through the model's own blocks, with factlens hooks that set the
residual entering block 0 to the clean ``end`` residual, every ``hook_attn_out`` to its clean ``end`` value
plus that row's sender change, and (for MLP senders / ``freeze_mlps``) ``hook_mlp_out``. The tests check it
equals the reference on GPT-2 and OPT.

D_new's mean is taken at each D_new prompt's own ``end``. (The official code averages at the same absolute
index; for :meth:`~factlens.relations.RelationDataset.counterfactual` datasets with single-token subjects
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

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from factlens.capitals.recall import Metric, end_logits, metric, require_eval, run_at_end
from factlens.errors import ConfigError
from factlens.hooks import Intervention, hook, intervene
from factlens.relations import RelationDataset

MetricSpec = str | Metric


@dataclass
class PathPatchingResult:
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

    def scalar(logits: torch.Tensor) -> float:
        out = torch.as_tensor(fn(logits))
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
def path_patch(model, dataset: RelationDataset, counterfactual: RelationDataset | None = None, *,
               metric: MetricSpec = "iw", freeze_mlps: bool = False, max_batch: int = 512, seed: int = 0,
               progress: bool = True) -> PathPatchingResult:
    """Batched path patching of every head and MLP → the final residual at ``end`` (% change of ``metric``).

    Args:
        dataset: D_orig, the clean prompts.
        counterfactual: D_new (default ``dataset.counterfactual(seed)``: subject swapped at random).
        metric: ``"iw"`` (default; answer logit − mean logit), ``"n"``, ``"iw-n"``, ``"prob"``, ``"logprob"``,
            ``"logit"``, or a callable taking ``[n, vocab]`` logits at ``end`` (dataset order) and returning
            a scalar or ``[n]`` (averaged), e.g. ``factlens.capitals.metric(dataset, "iw")``.
        freeze_mlps: Freeze every MLP too (direct paths only).
        max_batch: Rows (sender × prompt one-token sequences) per forward pass.
        progress: tqdm progress bar.

    Returns:
        :class:`PathPatchingResult`.

    Raises:
        ModeError: The model is in training mode.

    Example:
        >>> res = path_patch(model, ds, metric="iw", max_batch=1024)
        >>> res.plot().write_html("path_patching.html")                    # doctest: +SKIP
    """
    require_eval(model, "path patching")
    t0 = time.perf_counter()
    counterfactual = dataset.counterfactual(seed) if counterfactual is None else counterfactual
    metric_fn, metric_name = _metric_fn(metric, dataset)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n, device = len(dataset), model.cfg.device
    if max_batch < 1:
        raise ConfigError(f"max_batch={max_batch}; pass max_batch >= 1")

    z_mean, mlp_mean = _counterfactual_means(model, counterfactual, max_batch, progress)
    names = (["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
             + [f"blocks.{layer}.hook_attn_out" for layer in range(L)]
             + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)])
    clean = run_at_end(model, dataset, names, max_batch=max_batch, progress=progress, desc="pass B (clean)")
    clean_metric = metric_fn(clean.logits)
    resid0 = clean["blocks.0.hook_resid_pre"]  # [n, d]
    z_clean = clean.stack("blocks.{}.attn.hook_z", L)  # [n, L, H, dh]
    attn_clean = clean.stack("blocks.{}.hook_attn_out", L)  # [n, L, d]
    mlp_clean = clean.stack("blocks.{}.hook_mlp_out", L)  # [n, L, d]
    W_O = torch.stack([model.blocks[layer].attn.W_O.detach() for layer in range(L)])  # [L, H, dh, d]
    end_tokens = dataset.tokens[torch.arange(n), dataset.end].to(device)  # [n]

    senders = _senders(L, H)
    kind = torch.tensor([0 if s[0] == "head" else 1 for s in senders], device=device)
    s_layer = torch.tensor([s[1] for s in senders], device=device)
    s_head = torch.tensor([max(s[2], 0) for s in senders], device=device)
    total = len(senders) * n
    values: list[float] = []
    pending: list[torch.Tensor] = []  # end logits of the sender being completed, in prompt order
    for start in tqdm(range(0, total, max_batch), desc="path patching (pass C/D)", disable=not progress):
        flat = torch.arange(start, min(start + max_batch, total), device=device)
        s_idx, p_idx = flat // n, flat % n
        r_kind, r_layer, r_head = kind[s_idx], s_layer[s_idx], s_head[s_idx]
        iv = Intervention(f"path patching rows {start}..{start + len(flat)}")
        iv.add("blocks.0.hook_resid_pre", lambda t, hook, p=p_idx: resid0[p][:, None].to(t.dtype))
        for layer in range(L):
            sel = (r_kind == 0) & (r_layer == layer)

            def set_attn(t, hook, layer=layer, sel=sel, p=p_idx, h=r_head):
                out = attn_clean[p, layer].clone()  # [r, d]
                if sel.any():
                    dz = z_mean[layer, h[sel]] - z_clean[p[sel], layer, h[sel]]  # [r', dh]
                    out[sel] += torch.einsum("rk,rkd->rd", dz, W_O[layer, h[sel]])
                return out[:, None].to(t.dtype)

            iv.add(f"blocks.{layer}.hook_attn_out", set_attn)
            msel = (r_kind == 1) & (r_layer == layer)
            if freeze_mlps or bool(msel.any()):
                def set_mlp(t, hook, layer=layer, msel=msel, p=p_idx):
                    out = mlp_clean[p, layer].clone() if freeze_mlps else t[:, 0].clone()  # [r, d]
                    out[msel] = mlp_mean[layer].to(out.dtype)
                    return out[:, None].to(t.dtype)

                iv.add(f"blocks.{layer}.hook_mlp_out", set_mlp)
        with torch.no_grad(), intervene(model, iv):
            logits = model(end_tokens[p_idx][:, None])[:, 0]  # [r, vocab]
        pending.append(logits)
        done = sum(len(x) for x in pending)
        if done >= n:
            buf = torch.cat(pending)
            while len(buf) >= n:
                values.append(metric_fn(buf[:n]))
                buf = buf[n:]
            pending = [buf] if len(buf) else []
    return _result(values, clean_metric, L, H, metric=metric_name, receiver=f"blocks.{L - 1}.hook_resid_post",
                   freeze_mlps=freeze_mlps, n_prompts=n, n_counterfactual=len(counterfactual), method="batched",
                   seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ reference
def path_patch_reference(model, dataset: RelationDataset, counterfactual: RelationDataset | None = None, *,
                         metric: MetricSpec = "iw", freeze_mlps: bool = False, seed: int = 0,
                         progress: bool = False) -> PathPatchingResult:
    """The official four-pass procedure, one sender at a time, with full-sequence forward passes.

    Slow (two forward passes of the whole dataset per sender); kept as the ground truth that
    :func:`path_patch` is tested against. Same arguments and result as :func:`path_patch`.

    Example:
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
        _, cache_new = model.run_with_cache(counterfactual.tokens.to(device))
        r_new, e_new = torch.arange(len(counterfactual), device=device), counterfactual.end.to(device)
        z_mean = {layer: cache_new[f"blocks.{layer}.attn.hook_z"][r_new, e_new].mean(0) for layer in range(L)}
        mlp_mean = {layer: cache_new[f"blocks.{layer}.hook_mlp_out"][r_new, e_new].mean(0) for layer in range(L)}
        del cache_new
        # pass B: clean cache
        clean_logits, cache = model.run_with_cache(tokens)
        clean_metric = metric_fn(end_logits(clean_logits, dataset))

    def frozen(name):
        return lambda t, hook: cache[name].to(t.dtype)

    freeze = Intervention("freeze q/k/v (and MLPs)")
    for layer in range(L):
        for act in ("q", "k", "v"):
            name = f"blocks.{layer}.attn.hook_{act}"
            freeze.add(name, frozen(name))
        if freeze_mlps:
            name = f"blocks.{layer}.hook_mlp_out"
            freeze.add(name, frozen(name))

    values = []
    for kind, layer, head in tqdm(_senders(L, H), desc="path patching (reference)", disable=not progress):
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
