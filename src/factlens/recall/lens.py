"""The logit lens (Lv et al. 2024 §2.3): P and rank of the answer after every layer, read at ``end``.

Example:
    >>> import torch, factlens
    >>> from factlens.recall.datasets import dataset_for
    >>> from factlens.recall.lens import logit_lens
    >>> model = factlens.tiny("gpt2")
    >>> lens = logit_lens(model, dataset_for(model))
    >>> bool(torch.allclose(lens.prob[-2], lens.prob[-1], atol=1e-5))   # last layer == the model's own P
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int

from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.recall.datasets import RelationDataset
from factlens.recall.forward import EndRun, reuse_run
from factlens.recall.metrics import answer_prob, answer_rank

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class LogitLensResult(ResultDisplay):
    """P and rank of the answer at ``end`` after every layer, read through ``ln_final`` + unembedding.

    Attributes:
        prob: ``[row, n]``: rows ``L0..L{L-1}`` (each ``blocks.L.hook_resid_post``) and, with
            ``include_final``, a last row ``model`` from the model's own logits (equal to row ``L{L-1}``).
        rank: ``[row, n]`` 0-based ranks.
        labels: Row labels.
        subjects: Subject of each prompt.
        n_layers: Layers of the model.
    """

    prob: Float[torch.Tensor, "row n"]
    rank: Int[torch.Tensor, "row n"]
    labels: list[str]
    subjects: list[str]
    n_layers: int

    @property
    def mean_prob(self) -> Float[torch.Tensor, " row"]:
        return self.prob.mean(1)

    @property
    def mean_rank(self) -> Float[torch.Tensor, " row"]:
        return self.rank.float().mean(1)

    def final_layer_effect(self) -> dict[str, float]:
        """Mean P and rank before (after layer L−2) and after (layer L−1) the last layer, and the change.

        A negative ``delta_prob`` is Lv et al.'s final-layer anti-overconfidence signature.
        """
        if self.n_layers < 2:
            raise ConfigError("a one-layer model has no 'before the last layer' readout; use n_layers >= 2")
        b, a = self.n_layers - 2, self.n_layers - 1
        return {"prob_before": float(self.mean_prob[b]), "prob_after": float(self.mean_prob[a]),
                "delta_prob": float(self.mean_prob[a] - self.mean_prob[b]),
                "rank_before": float(self.mean_rank[b]), "rank_after": float(self.mean_rank[a])}

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: row, layer (NaN for ``model``), prompt_idx, subject, prob, rank."""
        n = self.prob.shape[1]
        frames = []
        for i, label in enumerate(self.labels):
            frames.append(pd.DataFrame({
                "row": label, "layer": i if i < self.n_layers else float("nan"), "prompt_idx": range(n),
                "subject": self.subjects, "prob": self.prob[i].tolist(), "rank": self.rank[i].tolist()}))
        return pd.concat(frames, ignore_index=True)

    def plot(self, title: str | None = None) -> go.Figure:
        """Mean P(answer) per layer (± one standard deviation band), mean rank in the hover text."""
        L = self.n_layers
        x = list(range(L))
        mean, std = self.prob[:L].mean(1), self.prob[:L].std(1) if self.prob.shape[1] > 1 else self.prob[:L] * 0
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x + x[::-1], y=(mean + std).tolist() + (mean - std).clamp(min=0).tolist()[::-1],
                                 fill="toself", line={"width": 0}, opacity=0.2, hoverinfo="skip", name="± 1 sd"))
        fig.add_trace(go.Scatter(
            x=x, y=mean.tolist(), mode="lines+markers", name="mean P(answer)",
            hovertext=[f"after layer {i}: P = {float(mean[i]):.4g}, mean rank = {float(self.mean_rank[i]):.4g}"
                       for i in x], hoverinfo="text"))
        fig.update_layout(title=title or "Logit lens: P(answer) at end after each layer",
                          xaxis_title="layer l (residual stream after block l, 0-based)",
                          yaxis_title="P(first answer token) (probability)")
        fig.update_xaxes(dtick=1)
        return fig


def logit_lens_hooks(model: TransformerBridge) -> list[str]:
    """The hooks :func:`logit_lens` reads at ``end`` (every layer's ``hook_resid_post``; plus the logits).

    Example:
        >>> import factlens
        >>> from factlens.recall.lens import logit_lens_hooks
        >>> logit_lens_hooks(factlens.tiny("gpt2"))
        ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    return [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]


def logit_lens(model: TransformerBridge, dataset: RelationDataset, include_final: bool = True, *, max_batch: int = 64,
               progress: bool = False, run: EndRun | None = None) -> LogitLensResult:
    """P(answer) and rank at ``end`` after every layer: ``softmax(unembed(ln_final(resid_post_L)))``.

    Each layer's residual gets its own final-LayerNorm scale (the standard logit lens). Only ``end`` is
    cached (one ``[n, layer, d_model]`` tensor). The last layer's value equals the model's own probability.
    ``run``: a shared :class:`~factlens.recall.forward.EndRun` holding :func:`logit_lens_hooks` (and the
    logits with ``include_final``).

    Example:
        >>> import torch, factlens
        >>> from factlens.recall.lens import logit_lens
        >>> model = factlens.tiny("gpt2", compat=True)
        >>> from factlens.recall.datasets import dataset_for
        >>> ds = dataset_for(model)
        >>> lens = logit_lens(model, ds)
        >>> lens.final_layer_effect()["delta_prob"]                        # doctest: +SKIP
    """
    L = model.cfg.n_layers
    run = reuse_run(model, dataset, run, logit_lens_hooks(model), logits=include_final, max_batch=max_batch,
                    progress=progress, desc="logit lens")
    resid = run.stack("blocks.{}.hook_resid_post", L)  # [n, L, d]
    probs, ranks = [], []
    with torch.no_grad():
        for layer in range(L):
            lg = model.unembed(model.ln_final(resid[:, layer : layer + 1]))[:, 0]  # [n, vocab]
            probs.append(answer_prob(lg, dataset))
            ranks.append(answer_rank(lg, dataset))
        labels = [f"L{layer}" for layer in range(L)]
        if include_final:
            probs.append(answer_prob(run.logits, dataset))
            ranks.append(answer_rank(run.logits, dataset))
            labels.append("model")
    return LogitLensResult(torch.stack(probs).cpu(), torch.stack(ranks).cpu(), labels, dataset.subjects, L)


__all__ = ["LogitLensResult", "logit_lens", "logit_lens_hooks"]
