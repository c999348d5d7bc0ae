"""What the last layer does to the answer (Lv et al. 2024 §6; Stolfo et al. 2024): its effects, split exactly.

:func:`final_layer_effect` is Lv et al.'s detection: P and rank of the answer before (logit lens after layer
L−2) and after the last layer, each last-layer component's direct effect on the answer logit, and the tokens
the last layer promotes. :func:`final_layer_split` splits the same change into parts that add up exactly.
Both read the direct effects from one computation (:func:`last_layer_components`, :func:`direct_effects`).

The last layer turns the residual entering it, ``x_b = blocks.{L-1}.hook_resid_pre`` at ``end`` (what the
logit lens reads "before the last layer"), into the final residual ``x_a = x_b + Σ_h head_h + b_attn + mlp``.
Through the final LayerNorm, ``logit(x) = ⟨centre(x), u⟩ / s(x) + β`` for the answer's unembedding column
``u`` (LN weight folded in) and bias ``β``, where ``s(x)`` is ``ln_final.hook_scale``. The change of the answer
logit splits **exactly** into

- one **direct** part per component ``k`` (each last-layer head, the attention biases, the MLP):
  ``⟨centre(Δ_k), u⟩ / s_a``, the component read through the *final* scale;
- an **LN-scale** part ``(logit_b − β) · (s_b / s_a − 1)``: what the change of the LayerNorm's scale does to
  the logit the residual already had. A component that grows the residual norm without writing along ``u``
  (Stolfo et al. 2024's *entropy neurons*, arXiv 2406.16254, e.g. GPT-2 small's 11.584) acts only here.

They sum to ``logit_a − logit_b`` identically (algebra, not a fit). The same split of the whole logit vector
gives the probability parts: ``P(answer)`` along the straight path from the before- to the after-logits,
integrated per part with Gauss–Legendre quadrature (integrated gradients on the logits, which are linear in the
parts), refined until the parts add up to ``ΔP`` to ``tol`` (1e-10 by default; float64).

``scale_sq`` says which component changes the scale: ``s_a² − s_b² = Σ_k ⟨centre(Δ_k), centre(x_a + x_b)⟩ / d``,
exactly; with ``neurons=True`` the MLP's part is split further over its neurons (``act_i · W_out[i]`` plus
``b_out``), direct and scale, to find entropy-neuron-like units.

Needs a model in TransformerLens compatibility mode, like every Lv analysis (``factlens.tiny(...,
compat=True)``, ``factlens.load(..., compat=True)``; otherwise :class:`~factlens.errors.ModeError`), on GPT-2 or
OPT (pre-norm LayerNorm models); :func:`final_layer_split` checks its reconstruction of the model's own logits
and raises if it does not hold.

Example:
    >>> import factlens
    >>> from factlens.recall.datasets import dataset_for
    >>> from factlens.recall.final_layer import final_layer_split
    >>> model = factlens.tiny("gpt2")
    >>> split = final_layer_split(model, dataset_for(model, n=16))
    >>> split.parts
    ['L1H0', 'L1H1', 'L1H2', 'L1H3', 'attn_bias', 'MLP1', 'ln_scale']
    >>> bool((split.logit.sum(1) - split.total_logit).abs().max() < 1e-9)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float

from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.inputs import at_least_fp32
from factlens.recall.datasets import RelationDataset
from factlens.recall.forward import EndRun, center, head_outputs, require_eval, reuse_run, unembed_params
from factlens.recall.metrics import answer_prob, answer_rank

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def _ln_eps(model) -> float:
    comp = getattr(model.ln_final, "original_component", None)
    eps = getattr(comp, "eps", None)
    if eps is None:
        eps = getattr(model.cfg, "eps", None)
    if eps is None:
        raise ConfigError("cannot find the final LayerNorm's eps (ln_final.original_component.eps or cfg.eps); "
                          "final_layer_split supports LayerNorm models such as GPT-2 and OPT")
    return float(eps)


def final_layer_hooks(model: TransformerBridge, neurons: bool = False) -> list[str]:
    """The hooks :func:`final_layer_effect` and :func:`final_layer_split` read at ``end`` (plus the logits).

    Example:
        >>> import factlens
        >>> from factlens.recall.final_layer import final_layer_hooks
        >>> final_layer_hooks(factlens.tiny("gpt2"))[0]
        'blocks.1.hook_resid_pre'
    """
    last = model.cfg.n_layers - 1
    return ([f"blocks.{last}.hook_resid_pre", f"blocks.{last}.attn.hook_z", f"blocks.{last}.hook_attn_out",
             f"blocks.{last}.hook_mlp_out", "ln_final.hook_scale"] + ([f"blocks.{last}.mlp.hook_post"] if neurons else []))


def last_layer_components(model: TransformerBridge, run: EndRun, dtype: torch.dtype | None = None
                          ) -> tuple[Float[torch.Tensor, "n d_model"], Float[torch.Tensor, "n component d_model"]]:
    """``(x_b, components)`` at ``end``: the residual entering the last layer and what each of its parts writes.

    Components, in order: each head's own output (``z·W_O[h]``), the attention biases (``hook_attn_out`` minus
    the heads), the MLP; ``x_b + components.sum(1)`` is the final residual.
    """
    last = model.cfg.n_layers - 1
    x_b, z, attn, mlp = (run[name] if dtype is None else run[name].to(dtype) for name in final_layer_hooks(model)[:4])
    heads = head_outputs(model, last, z)  # [n, H, d]
    return x_b, torch.cat([heads, (attn - heads.sum(1))[:, None], mlp[:, None]], 1)  # [n, H+2, d]


def direct_effects(components: Float[torch.Tensor, "n component d_model"], u: Float[torch.Tensor, "n d_model"],
                   scale: Float[torch.Tensor, " n"]) -> Float[torch.Tensor, "n component"]:
    """Each component's direct effect on the answer logit: ``⟨centre(component), u⟩ / scale``.

    ``u``: each prompt's answer column of :func:`~factlens.recall.forward.unembed_params`'s ``W_eff``;
    ``scale``: the final LayerNorm's scale of the final residual (``ln_final.hook_scale``).

    Example:
        >>> import torch
        >>> from factlens.recall.final_layer import direct_effects
        >>> comps = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])            # [n=1, component=2, d=2]
        >>> direct_effects(comps, torch.tensor([[0.0, 1.0]]), torch.tensor([2.0]))
        tensor([[0.5000, 0.0000]])
    """
    return (center(components) * u[:, None]).sum(-1) / scale[:, None]  # [n, component]


@dataclass
class FinalLayerEffect(ResultDisplay):
    """What the last layer does to the answer at ``end``.

    Attributes:
        prob_before / prob_after: ``[n]`` P(answer) after layer L−2 (logit lens) and the model's output.
        rank_before / rank_after: ``[n]`` 0-based ranks.
        dla: ``[n, component]`` direct effect on the answer logit (through the real final LN scale) of each
            last-layer head, the attention bias ``b_O`` and the last MLP.
        components: Component names (``L11H0``..., ``b_O``, ``MLP11``).
        promoted: Tokens with the largest mean change in log-probability across the last layer (and the most
            demoted, ``direction`` column).
    """

    prob_before: Float[torch.Tensor, " n"]
    prob_after: Float[torch.Tensor, " n"]
    rank_before: torch.Tensor
    rank_after: torch.Tensor
    dla: Float[torch.Tensor, "n component"]
    components: list[str]
    promoted: pd.DataFrame

    def summary(self) -> dict[str, float]:
        """Mean P and rank before/after the last layer."""
        return {"prob_before": float(self.prob_before.mean()), "prob_after": float(self.prob_after.mean()),
                "delta_prob": float((self.prob_after - self.prob_before).mean()),
                "rank_before": float(self.rank_before.float().mean()), "rank_after": float(self.rank_after.float().mean())}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per component: mean and std over prompts of its direct effect on the answer logit."""
        return pd.DataFrame({"component": self.components, "mean_dla": self.dla.mean(0).tolist(),
                             "std_dla": (self.dla.std(0) if len(self.dla) > 1 else self.dla[0] * 0).tolist()})

    def plot(self, title: str | None = None) -> go.Figure:
        """Bar chart of each last-layer component's mean direct effect on the answer logit."""
        df = self.to_dataframe()
        s = self.summary()
        fig = go.Figure(go.Bar(x=df["component"], y=df["mean_dla"], error_y={"array": df["std_dla"].tolist()},
                               hovertemplate="%{x}: %{y:.4g} logits<extra></extra>"))
        fig.update_layout(title=title or (f"Final layer: P(answer) {s['prob_before']:.3g} → {s['prob_after']:.3g}; "
                                          "direct effect on the answer logit"),
                          xaxis_title="last-layer component", yaxis_title="direct logit attribution (logits)")
        return fig


def final_layer_effect(model: TransformerBridge, dataset: RelationDataset, *, k: int = 10, max_batch: int = 64,
                       progress: bool = False, run: EndRun | None = None) -> FinalLayerEffect:
    """Answer P/rank before and after the last layer, per-component direct effects and promoted tokens.

    ``run``: a shared :class:`~factlens.recall.forward.EndRun` holding :func:`final_layer_hooks` and the logits.

    Example:
        >>> import factlens
        >>> from factlens.recall import dataset_for, final_layer_effect
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> ds = dataset_for(model)
        >>> eff = final_layer_effect(model, ds)
        >>> eff.summary()["delta_prob"] < 0          # anti-overconfidence           # doctest: +SKIP
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.cfg.d_vocab:
        raise ConfigError(f"k={k!r}; pass 1 <= k <= {model.cfg.d_vocab} (the vocabulary size) tokens to report")
    require_eval(model, "final_layer_effect")
    H, last = model.cfg.n_heads, model.cfg.n_layers - 1
    run = reuse_run(model, dataset, run, final_layer_hooks(model), logits=True, max_batch=max_batch,
                    progress=progress, desc="final layer")
    with torch.no_grad():
        x_b, comps = last_layer_components(model, run)  # [n, d], [n, H+2, d]
        before = model.unembed(model.ln_final(x_b[:, None]))[:, 0]  # [n, vocab]
        after = run.logits
        W_eff, _ = unembed_params(model)
        u = W_eff[:, dataset.answer_ids.to(W_eff.device)].T  # [n, d]
        dla = direct_effects(comps, u, run["ln_final.hook_scale"].reshape(-1))  # [n, H+2]
        delta = (torch.log_softmax(at_least_fp32(after), -1) - torch.log_softmax(at_least_fp32(before), -1)).mean(0)  # [vocab]
        tok = dataset.tokenizer
        rows = []
        for direction, vals in (("promoted", torch.topk(delta, k)), ("demoted", torch.topk(-delta, k))):
            for rank, (i, v) in enumerate(zip(vals.indices.tolist(), vals.values.tolist())):
                rows.append({"direction": direction, "rank": rank, "token_id": i, "token": tok.decode([i]),
                             "mean_delta_logprob": v if direction == "promoted" else -v})
    return FinalLayerEffect(
        prob_before=answer_prob(before, dataset).cpu(), prob_after=answer_prob(after, dataset).cpu(),
        rank_before=answer_rank(before, dataset).cpu(), rank_after=answer_rank(after, dataset).cpu(),
        dla=dla.cpu(), components=[f"L{last}H{h}" for h in range(H)] + ["b_O", f"MLP{last}"],
        promoted=pd.DataFrame(rows))


@dataclass
class FinalLayerSplit:
    """The last layer's effect on the answer at ``end``, split into parts that add up to the total.

    Attributes:
        parts: Part names: ``L{l}H{h}`` per last-layer head, ``attn_bias``, ``MLP{l}``, ``ln_scale``.
        logit: ``[n, part]`` change of the answer logit per part (float64); rows sum to ``total_logit``.
        prob: ``[n, part]`` change of P(answer) per part; rows sum to ``total_prob`` (to ``prob_error``).
        logprob: ``[n, part]`` the same for log P(answer).
        logit_before / logit_after, prob_before / prob_after: ``[n]`` (logit lens before the last layer; the
            model's output after it).
        scale_before / scale_after: ``[n]`` the final LayerNorm's scale of ``x_b`` and ``x_a``.
        scale_sq: ``[n, component]`` each component's exact share of ``s_a² − s_b²`` (no ``ln_scale`` column).
        neuron_logit / neuron_scale_sq: ``[n, d_mlp]`` per MLP neuron (``neurons=True``; else None); the MLP's
            output bias ``b_out`` is the remainder: ``neuron_logit.sum(1) + b_out part = logit[:, MLP]``.
        prob_error: Max over prompts of ``|Σ prob parts − ΔP|`` (quadrature error), and quadrature nodes used.
        axis_names: ``("prompt", "part")``.
    """

    parts: list[str]
    logit: Float[torch.Tensor, "n part"]
    prob: Float[torch.Tensor, "n part"]
    logprob: Float[torch.Tensor, "n part"]
    logit_before: Float[torch.Tensor, " n"]
    logit_after: Float[torch.Tensor, " n"]
    prob_before: Float[torch.Tensor, " n"]
    prob_after: Float[torch.Tensor, " n"]
    scale_before: Float[torch.Tensor, " n"]
    scale_after: Float[torch.Tensor, " n"]
    scale_sq: Float[torch.Tensor, "n component"]
    neuron_logit: Float[torch.Tensor, "n neuron"] | None
    neuron_scale_sq: Float[torch.Tensor, "n neuron"] | None
    layer: int
    prob_error: float
    nodes: int
    axis_names: tuple[str, ...] = ("prompt", "part")

    @property
    def total_logit(self) -> Float[torch.Tensor, " n"]:
        return self.logit_after - self.logit_before

    @property
    def total_prob(self) -> Float[torch.Tensor, " n"]:
        return self.prob_after - self.prob_before

    @property
    def suppresses(self) -> bool:
        """Whether the last layer lowers the mean P(answer) (Lv et al.'s anti-overconfidence signature)."""
        return float(self.total_prob.mean()) < 0

    def summary(self) -> dict[str, float]:
        """Mean over prompts of every part (``logit:<part>``, ``prob:<part>``) and of the totals."""
        out = {"prob_before": float(self.prob_before.mean()), "prob_after": float(self.prob_after.mean()),
               "delta_prob": float(self.total_prob.mean()), "delta_logit": float(self.total_logit.mean()),
               "scale_ratio": float((self.scale_after / self.scale_before).mean())}
        heads = [i for i, p in enumerate(self.parts) if "H" in p and p.startswith("L")]
        for kind, values in (("logit", self.logit), ("prob", self.prob)):
            mean = values.mean(0)
            out[f"{kind}:heads"] = float(mean[heads].sum())
            out.update({f"{kind}:{p}": float(v) for p, v in zip(self.parts, mean.tolist())})
        return out

    def to_dataframe(self):
        """One row per part: mean and std over prompts of its logit, probability and log-probability change,
        and (components only) its mean share of the squared-scale change."""
        import pandas as pd

        n = self.logit.shape[0]
        sd = (lambda t: t.std(0)) if n > 1 else (lambda t: t[0] * 0)
        sq = [*self.scale_sq.mean(0).tolist(), float("nan")]
        return pd.DataFrame({"part": self.parts, "logit": self.logit.mean(0).tolist(),
                             "logit_std": sd(self.logit).tolist(), "prob": self.prob.mean(0).tolist(),
                             "prob_std": sd(self.prob).tolist(), "logprob": self.logprob.mean(0).tolist(),
                             "scale_sq": sq, "layer": self.layer})

    def top_neurons(self, k: int = 10, by: str = "scale_sq"):
        """The k MLP neurons with the largest mean |``by``| (``"scale_sq"`` or ``"logit"``); needs ``neurons=True``."""
        import pandas as pd

        if self.neuron_logit is None:
            raise ConfigError("this split has no per-neuron parts; call final_layer_split(..., neurons=True)")
        if by not in ("scale_sq", "logit"):
            raise ConfigError(f"by={by!r}; use 'scale_sq' or 'logit'")
        logit, sq = self.neuron_logit.mean(0), self.neuron_scale_sq.mean(0)
        key = (sq if by == "scale_sq" else logit).abs()
        idx = torch.topk(key, min(k, key.numel())).indices.tolist()
        return pd.DataFrame({"neuron": [f"{self.layer}.{i}" for i in idx], "index": idx,
                             "logit": logit[idx].tolist(), "scale_sq": sq[idx].tolist()})

    def plot(self, title: str | None = None):
        """Bars: each part's mean change of the answer logit (left) and of P(answer) (right)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        df = self.to_dataframe()
        s = self.summary()
        fig = make_subplots(rows=1, cols=2, subplot_titles=("answer logit (logits)", "P(answer)"))
        for col, (name, err) in enumerate((("logit", "logit_std"), ("prob", "prob_std")), start=1):
            fig.add_trace(go.Bar(x=df["part"], y=df[name], error_y={"array": df[err].tolist()}, showlegend=False,
                                 hovertemplate=f"%{{x}}: %{{y:.4g}} ({name})<extra></extra>"), 1, col)
        fig.update_xaxes(title_text=f"part of layer {self.layer}")
        fig.update_yaxes(title_text="Δ answer logit (logits)", row=1, col=1)
        fig.update_yaxes(title_text="Δ P(first answer token)", row=1, col=2)
        fig.update_layout(title=title or (f"Final layer: P(answer) {s['prob_before']:.4f} → {s['prob_after']:.4f} "
                                          f"(Δ logit {s['delta_logit']:+.3f}); parts add up to the total"))
        return fig

    def __repr__(self) -> str:
        s = self.summary()
        return (f"FinalLayerSplit(layer={self.layer}, n={self.logit.shape[0]}, P(answer) {s['prob_before']:.4f} → "
                f"{s['prob_after']:.4f}, Δlogit {s['delta_logit']:+.4f} = heads {s['logit:heads']:+.4f} + "
                f"attn_bias {s['logit:attn_bias']:+.4f} + MLP {s[f'logit:MLP{self.layer}']:+.4f} + ln_scale "
                f"{s['logit:ln_scale']:+.4f})")


def _path_integrals(z0: torch.Tensor, D: torch.Tensor, answer: torch.Tensor, nodes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """∫₀¹ ∂f/∂z(z0 + tΣD)·D_k dt for f = P(answer) and log P(answer): ``[c, K]`` each (Gauss–Legendre)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    t = torch.tensor((x + 1) / 2, dtype=z0.dtype, device=z0.device)  # [T] on [0, 1]
    w = torch.tensor(w / 2, dtype=z0.dtype, device=z0.device)  # [T]
    total = D.sum(1)  # [c, V]
    rows = torch.arange(len(z0), device=z0.device)
    prob = torch.zeros(D.shape[:2], dtype=z0.dtype, device=z0.device)
    logprob = torch.zeros_like(prob)
    for ti, wi in zip(t, w):
        p = torch.softmax(z0 + ti * total, -1)  # [c, V]
        g = D[rows, :, answer] - torch.einsum("cv,ckv->ck", p, D)  # ∂ log P / ∂t per part: [c, K]
        logprob += wi * g
        prob += wi * p[rows, answer][:, None] * g
    return prob, logprob


def final_layer_split(model: TransformerBridge, dataset: RelationDataset, *, neurons: bool = False, tol: float = 1e-10,
                      max_batch: int = 64, chunk: int | None = None, progress: bool = False) -> FinalLayerSplit:
    """Split the last layer's change of the answer logit and P(answer) at ``end`` into exact parts.

    Args:
        neurons: Also split the MLP part over its neurons (``blocks.{L-1}.mlp.hook_post`` · ``W_out``).
        tol: The probability parts must add up to ΔP to within this (float64); quadrature nodes are doubled
            (16 → 1024) until they do.
        max_batch: Prompts per forward pass.
        chunk: Prompts per quadrature step (default: keeps ``chunk × parts × vocab`` near 2·10⁷ numbers).

    Raises:
        ModeError: The model is in training mode, or not in compatibility mode (load it with ``compat=True``).
        ConfigError: The model's final LayerNorm is not reproduced by ``(x − mean) / hook_scale`` (an RMSNorm or
            post-norm model), or the quadrature does not reach ``tol``.

    Example:
        >>> import factlens
        >>> from factlens.recall.datasets import dataset_for
        >>> from factlens.recall.final_layer import final_layer_split
        >>> model = factlens.tiny("opt", compat=True)
        >>> split = final_layer_split(model, dataset_for(model, n=8), neurons=True)
        >>> split.top_neurons(3).shape
        (3, 4)
    """
    require_eval(model, "final_layer_split")
    if tol <= 0:
        raise ConfigError(f"tol={tol}; pass a positive tolerance such as 1e-10")
    run = reuse_run(model, dataset, None, final_layer_hooks(model, neurons), logits=True, max_batch=max_batch,
                    progress=progress, desc="final layer split")
    return split_from_run(model, dataset, run, neurons=neurons, tol=tol, chunk=chunk)


def split_from_run(model: TransformerBridge, dataset: RelationDataset, run: EndRun, *, neurons: bool = False, tol: float = 1e-10,
                   chunk: int | None = None) -> FinalLayerSplit:
    """:func:`final_layer_split` on an :class:`~factlens.recall.forward.EndRun` that captured
    :func:`final_layer_hooks` and the logits (so one forward pass can serve several analyses)."""
    if tol <= 0:
        raise ConfigError(f"tol={tol}; pass a positive tolerance such as 1e-10")
    names = final_layer_hooks(model, neurons)
    run = reuse_run(model, dataset, run, names, logits=True, desc="final_layer_split")
    L, H, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model
    last = L - 1
    f64 = torch.float64
    W_eff, b_eff = (t.double() for t in unembed_params(model))  # [d, V], [V]
    with torch.no_grad():
        x_b, comps = last_layer_components(model, run, f64)  # [n, d], [n, H+2, d]
        x_a = x_b + comps.sum(1)  # [n, d]
        eps = _ln_eps(model)
        s_b = (center(x_b).pow(2).mean(-1) + eps).sqrt()  # [n]
        s_a = (center(x_a).pow(2).mean(-1) + eps).sqrt()
        hooked = run["ln_final.hook_scale"].reshape(-1).double()
        logits_b = (center(x_b) / s_b[:, None]) @ W_eff + b_eff  # [n, V]
        logits_a = (center(x_a) / s_a[:, None]) @ W_eff + b_eff
        model_logits = run.logits.double().to(logits_a.device)
        err = float((logits_a - model_logits).abs().max())
        bound = 1e-3 * max(1.0, float(model_logits.abs().max()))
        if float((s_a - hooked.to(s_a.device)).abs().max()) > 1e-4 * float(hooked.max()) or err > bound:
            raise ConfigError(f"the final LayerNorm is not reproduced by (x − mean)/hook_scale (logit error {err:.2e});"
                              " final_layer_split supports pre-norm LayerNorm models (GPT-2, OPT-1.3B), not "
                              "RMSNorm or post-norm ones (OPT-350m)")
        ans = dataset.answer_ids.to(W_eff.device)
        rows = torch.arange(len(ans), device=W_eff.device)
        u = W_eff[:, ans].T  # [n, d]
        direct = direct_effects(comps, u, s_a)  # [n, H+2]
        lb, la = logits_b[rows, ans], logits_a[rows, ans]
        scale_part = (lb - b_eff[ans]) * (s_b / s_a - 1)  # [n]
        logit = torch.cat([direct, scale_part[:, None]], 1)  # [n, H+3]
        both = center(x_a + x_b)  # [n, d]
        scale_sq = (center(comps) * both[:, None]).sum(-1) / d  # [n, H+2]

        V = W_eff.shape[1]
        K = H + 3
        chunk = chunk or max(1, int(2e7 // (K * V)))
        prob = torch.zeros(len(ans), K, dtype=f64)
        logprob = torch.zeros_like(prob)
        p_b = torch.softmax(logits_b, -1)[rows, ans]
        p_a = torch.softmax(logits_a, -1)[rows, ans]
        nodes, worst = 16, float("inf")
        for start in range(0, len(ans), chunk):
            sl = slice(start, start + chunk)
            D = torch.cat([(center(comps[sl]) / s_a[sl, None, None]) @ W_eff,
                           ((logits_b[sl] - b_eff) * (s_b[sl] / s_a[sl] - 1)[:, None])[:, None]], 1)  # [c, K, V]
            while True:
                pr, lp = _path_integrals(logits_b[sl], D, ans[sl], nodes)
                gap = float(((pr.sum(1) - (p_a[sl] - p_b[sl])).abs()).max())
                if gap <= tol or nodes >= 1024:
                    break
                nodes *= 2
            if gap > tol:
                raise ConfigError(f"the probability parts add up to ΔP only to {gap:.1e} after 1024 quadrature nodes "
                                  f"(tol={tol:g}); pass a larger tol")
            prob[sl], logprob[sl] = pr.cpu(), lp.cpu()
            worst = gap if worst == float("inf") else max(worst, gap)

        neuron_logit = neuron_sq = None
        if neurons:
            W_out = model.blocks[last].mlp.W_out.detach().double()  # [m, d]
            act = run[names[5]].double()  # [n, m]
            w_c = center(W_out)  # [m, d]
            neuron_logit = act * (u @ w_c.T) / s_a[:, None]  # [n, m]
            neuron_sq = act * (both @ w_c.T) / d
    return FinalLayerSplit(
        parts=[f"L{last}H{h}" for h in range(H)] + ["attn_bias", f"MLP{last}", "ln_scale"],
        logit=logit.cpu(), prob=prob, logprob=logprob, logit_before=lb.cpu(), logit_after=la.cpu(),
        prob_before=p_b.cpu(), prob_after=p_a.cpu(), scale_before=s_b.cpu(), scale_after=s_a.cpu(),
        scale_sq=scale_sq.cpu(), neuron_logit=None if neuron_logit is None else neuron_logit.cpu(),
        neuron_scale_sq=None if neuron_sq is None else neuron_sq.cpu(), layer=last,
        prob_error=0.0 if worst == float("inf") else worst, nodes=nodes)


__all__ = ["FinalLayerEffect", "FinalLayerSplit", "direct_effects", "final_layer_effect", "final_layer_hooks",
           "final_layer_split", "last_layer_components", "split_from_run"]
