"""Mover-head check (Lv et al. 2024 §4.2): does a head copy the subject token into the last position?

For head (l, h) and each prompt: x = attention probability from ``end`` to the subject position ``N``;
y = ⟨head output at ``end``, ``W_U[:, subject token]``⟩ (the head output is ``z·W_O[h]``, without ``b_O``).
A mover attends to the subject and writes its unembedding direction: high x and a large positive Pearson r
between x and y over prompts (the IOI name-mover check). The projection is onto the **subject** token
("France"), not the answer.

Example:
    >>> import factlens
    >>> from factlens.recall import mover_scores, dataset_for
    >>> model = factlens.tiny("gpt2")
    >>> res = mover_scores(model, dataset_for(model))
    >>> res.r.shape
    torch.Size([2, 4])
    >>> res.top(2)[["name", "r", "mean_attention"]]                    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float

from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.recall.datasets import RelationDataset
from factlens.recall.forward import EndRun, head_outputs, require_eval, reuse_run

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def pearson(x: Float[torch.Tensor, "n ..."], y: Float[torch.Tensor, "n ..."]) -> Float[torch.Tensor, "..."]:
    """Pearson r over the first axis (NaN where either side is constant)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    denom = (x.pow(2).sum(0) * y.pow(2).sum(0)).sqrt()
    return torch.where(denom > 0, (x * y).sum(0) / denom.clamp(min=1e-300), torch.full_like(denom, float("nan")))


@dataclass
class MoverResult(ResultDisplay):
    """Per-prompt attention to the subject and subject-direction projection of every head's output at ``end``.

    Attributes:
        attention: ``[n, layer, head]`` attention prob from ``end`` to ``position``.
        projection: ``[n, layer, head]`` ⟨head output, W_U[:, subject token]⟩ (logit units).
        r: ``[layer, head]`` Pearson r between the two over prompts.
        position: The key position (``"N"``).
        prompts, subjects: One per prompt.
    """

    attention: Float[torch.Tensor, "n layer head"]
    projection: Float[torch.Tensor, "n layer head"]
    r: Float[torch.Tensor, "layer head"]
    position: str
    prompts: list[str]
    subjects: list[str]

    @property
    def mean_attention(self) -> Float[torch.Tensor, "layer head"]:
        return self.attention.mean(0)

    @property
    def mean_projection(self) -> Float[torch.Tensor, "layer head"]:
        return self.projection.mean(0)

    @property
    def score(self) -> Float[torch.Tensor, "layer head"]:
        """``r × mean attention``: high only for heads that both attend to the subject and copy it."""
        return self.r.nan_to_num(0.0) * self.mean_attention.double()

    def to_dataframe(self, per_prompt: bool = False) -> pd.DataFrame:
        """One row per head (layer, head, name, r, mean_attention, mean_projection, score), or with
        ``per_prompt=True`` one row per (prompt, head) with attention and projection."""
        L, H = self.r.shape
        if per_prompt:
            n = self.attention.shape[0]
            return pd.DataFrame({
                "prompt_idx": [i for i in range(n) for _ in range(L * H)],
                "subject": [s for s in self.subjects for _ in range(L * H)],
                "layer": [layer for _ in range(n) for layer in range(L) for _ in range(H)],
                "head": [h for _ in range(n) for _ in range(L) for h in range(H)],
                "attention": self.attention.reshape(-1).tolist(), "projection": self.projection.reshape(-1).tolist()})
        return pd.DataFrame({
            "layer": [layer for layer in range(L) for _ in range(H)], "head": [h for _ in range(L) for h in range(H)],
            "name": [f"L{layer}H{h}" for layer in range(L) for h in range(H)], "r": self.r.reshape(-1).tolist(),
            "mean_attention": self.mean_attention.reshape(-1).tolist(),
            "mean_projection": self.mean_projection.reshape(-1).tolist(), "score": self.score.reshape(-1).tolist()})

    def top(self, k: int = 5, by: str = "score") -> pd.DataFrame:
        """The k heads with the highest ``by`` (``"score"``, ``"r"``, ``"mean_attention"``, ``"mean_projection"``)."""
        df = self.to_dataframe()
        if by not in ("score", "r", "mean_attention", "mean_projection"):
            raise ConfigError(f"by={by!r}; use 'score', 'r', 'mean_attention' or 'mean_projection'")
        return df.sort_values(by, ascending=False, na_position="last").head(k).reset_index(drop=True)

    def plot(self, layer: int | None = None, head: int | None = None) -> go.Figure:
        """Scatter of attention-to-subject vs. projection for head (layer, head), one point per prompt;
        without arguments, a heat-map of r over all heads (mean attention in the hover text)."""
        L, H = self.r.shape
        if layer is None or head is None:
            text = [[f"L{a}H{b}: r = {float(self.r[a, b]):.3f}, mean attn = {float(self.mean_attention[a, b]):.3f}"
                     for b in range(H)] for a in range(L)]
            fig = go.Figure(go.Heatmap(z=self.r.tolist(), x=[f"H{h}" for h in range(H)], y=[f"L{i}" for i in range(L)],
                                       text=text, hoverinfo="text", colorscale="RdBu", zmid=0, zmin=-1, zmax=1,
                                       colorbar_title="Pearson r"))
            fig.update_yaxes(autorange="reversed")
            fig.update_layout(title=f"Mover check: r(attention end→{self.position}, projection on W_U[subject])",
                              xaxis_title="head", yaxis_title="layer")
            return fig
        if not (0 <= layer < L and 0 <= head < H):
            raise ConfigError(f"head L{layer}H{head} does not exist; use 0 <= layer < {L}, 0 <= head < {H}")
        x, y = self.attention[:, layer, head], self.projection[:, layer, head]
        fig = go.Figure(go.Scatter(
            x=x.tolist(), y=y.tolist(), mode="markers",
            hovertext=[f"{p!r} ({s})" for p, s in zip(self.prompts, self.subjects)], hoverinfo="text+x+y"))
        fig.update_layout(title=f"L{layer}H{head}: r = {float(self.r[layer, head]):.3f}",
                          xaxis_title=f"attention prob end → {self.position}",
                          yaxis_title="⟨head output, W_U[:, subject]⟩ (logit units)")
        return fig


def mover_hooks(model: TransformerBridge) -> list[str]:
    """The hooks :func:`mover_scores` reads at ``end``: every head's pattern row and ``hook_z``.

    Example:
        >>> import factlens
        >>> from factlens.recall.movers import mover_hooks
        >>> len(mover_hooks(factlens.tiny("gpt2")))        # 2 layers x (pattern, z)
        4
    """
    L = model.cfg.n_layers
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)] + [f"blocks.{layer}.attn.hook_z"
                                                                          for layer in range(L)]


def mover_scores(model: TransformerBridge, dataset: RelationDataset, *, position: str = "N", max_batch: int = 64,
                 progress: bool = False, run: EndRun | None = None) -> MoverResult:
    """Attention from ``end`` to ``position`` vs. the subject-token projection of every head's output.

    Caches only ``hook_pattern`` rows for the query at ``end`` and ``hook_z`` at ``end``. Per-head outputs
    are ``z·W_O[h]`` (works on GPT-2 and OPT; no ``set_use_attn_result``). ``run``: a shared
    :class:`~factlens.recall.forward.EndRun` holding :func:`mover_hooks`.

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.movers import mover_scores
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> res = mover_scores(model, ds)
        >>> res.plot(9, 8)                                                 # doctest: +SKIP
    """
    require_eval(model, "the mover check")
    L = model.cfg.n_layers
    keys = dataset.position(position).to(model.cfg.device)  # [n]
    run = reuse_run(model, dataset, run, mover_hooks(model), max_batch=max_batch, progress=progress, desc="movers")
    rows = torch.arange(len(dataset), device=keys.device)
    W_U_subj = model.W_U.detach()[:, dataset.subject_ids.to(keys.device)].T  # [n, d]
    attention, projection = [], []
    for layer in range(L):
        pattern = run[f"blocks.{layer}.attn.hook_pattern"]  # [n, H, k]
        attention.append(pattern[rows, :, keys])  # [n, H]
        out = head_outputs(model, layer, run[f"blocks.{layer}.attn.hook_z"])  # [n, H, d]
        projection.append(torch.einsum("nhd,nd->nh", out, W_U_subj))
    att, proj = torch.stack(attention, 1).cpu(), torch.stack(projection, 1).cpu()  # [n, L, H]
    return MoverResult(attention=att, projection=proj, r=pearson(att, proj), position=position,
                       prompts=list(dataset.prompts), subjects=dataset.subjects)


__all__ = ["MoverResult", "mover_hooks", "mover_scores", "pearson"]
