"""Attention stability during fine-tuning (Zucchet et al. 2025, §4, Fig O): attention stays, knowledge goes.

For every checkpoint of a fine-tuning run, each layer's attention patterns on a fixed set of old people's
biographies (held-out templates) are compared with the pre-trained checkpoint's patterns on the same tokens.
The distance is the **total variation** between the two attention distributions of each query:
``TV = ½ Σ_k |A[q, k] − A_ref[q, k]|`` (0: identical, 1: disjoint), averaged over heads, real (non-padding)
query positions and sequences, per layer. It is drawn beside the old people's accuracy, so a figure shows
whether the patterns move while the old facts are forgotten.

Example:
    >>> from factlens.bios.attention_drift import attention_drift
    >>> drift = attention_drift("runs/finetune", n_sequences=64)     # doctest: +SKIP
    >>> drift.plot().write_html("runs/finetune/attention_drift.html")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from factlens.bios.data.batches import eval_batches
from factlens.bios.patching.training import PatternRecorder
from factlens.bios.run import Run
from factlens.bios.task import people_slice
from factlens.checkpoints import load_checkpoint
from factlens.display import ResultDisplay
from factlens.errors import ConfigError, ShapeError
from factlens.inputs import default_device


def pattern_tv(pattern: Float[torch.Tensor, "batch head q k"], reference: Float[torch.Tensor, "batch head q k"],
               query_mask: Bool[torch.Tensor, "batch q"]) -> float:
    """Mean total-variation distance between two attention patterns over heads and the masked-in queries.

    Example:
        >>> import torch
        >>> from factlens.bios.attention_drift import pattern_tv
        >>> a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])   # [1 batch, 1 head, 2 queries, 2 keys]
        >>> b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
        >>> pattern_tv(a, b, torch.tensor([[True, True]]))     # queries: 0 and 0.5
        0.25
    """
    if pattern.shape != reference.shape or pattern.ndim != 4 or query_mask.shape != pattern.shape[::2]:
        raise ShapeError(f"patterns {tuple(pattern.shape)} / {tuple(reference.shape)} and query mask "
                         f"{tuple(query_mask.shape)}: pass [batch, head, q, k] patterns and a [batch, q] mask")
    tv = 0.5 * (pattern.double() - reference.double()).abs().sum(-1)  # [b, h, q]
    weight = query_mask[:, None, :].expand_as(tv).double()  # [b, h, q]
    return float((tv * weight).sum() / weight.sum())


@dataclass
class AttentionDrift(ResultDisplay):
    """Per-layer attention distance from the pre-trained checkpoint, beside old/new accuracy.

    Attributes:
        tv: one row per checkpoint step × layer (``step, layer, tv``): mean total-variation distance.
        accuracy: the run's evaluations (``step, old_attr_acc, new_attr_acc``).
        reference: the pre-trained checkpoint compared against. n_sequences: old people's biographies used.
    """

    tv: pd.DataFrame
    accuracy: pd.DataFrame
    reference: str
    n_sequences: int

    def to_dataframe(self) -> pd.DataFrame:
        """One row per step: ``tv_layer_0 ...`` and the accuracies at that step."""
        wide = self.tv.pivot(index="step", columns="layer", values="tv")
        wide.columns = [f"tv_layer_{c}" for c in wide.columns]
        return wide.reset_index().merge(self.accuracy, on="step", how="left")

    def plot(self):
        """Left: per-layer distance vs fine-tuning step. Right: old and new people's accuracy vs step."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=(
            "Attention distance from the pre-trained checkpoint (mean TV, old people)", "Attribute accuracy"))
        for layer, g in self.tv.groupby("layer"):
            fig.add_trace(go.Scatter(x=g["step"], y=g["tv"], mode="lines+markers", name=f"layer {layer}",
                                     hovertemplate=f"layer {layer}<br>step %{{x}}<br>TV %{{y:.4f}}<extra></extra>"),
                          1, 1)
        for col, name, colour in (("old_attr_acc", "old people", "#1f77b4"), ("new_attr_acc", "new people", "#2ca02c")):
            if col in self.accuracy:
                fig.add_trace(go.Scatter(x=self.accuracy["step"], y=self.accuracy[col], mode="lines+markers",
                                         name=name, line=dict(color=colour),
                                         hovertemplate=f"{name}<br>step %{{x}}<br>accuracy %{{y:.3f}}<extra></extra>"),
                              1, 2)
        fig.update_yaxes(title_text="total variation (0 = same pattern, 1 = disjoint)", rangemode="tozero",
                         row=1, col=1)
        fig.update_yaxes(title_text="fraction of values", range=[0, 1.02], row=1, col=2)
        fig.update_xaxes(title_text="fine-tuning step")
        fig.update_layout(template="plotly_white", height=420, width=1000,
                          title=f"Attention stays, knowledge goes? ({self.n_sequences} old people's biographies)")
        return fig


@torch.no_grad()
def attention_drift(run_dir: str | Path, *, n_sequences: int = 64, steps: list[int] | None = None,
                    device: str | torch.device | None = None, progress: bool = True) -> AttentionDrift:
    """Per-layer attention distance between a fine-tuning run's checkpoints and its pre-trained checkpoint.

    Args:
        run_dir: a fine-tuning run (``factlens bios finetune``).
        n_sequences: old people's biographies (held-out templates, fixed) the patterns are compared on.
        steps: checkpoint steps (default all).
        device: where the models run (default: CUDA when available, else CPU).
    """
    device = default_device(device)
    run = Run(run_dir)
    config = run.config
    if not config.finetune:
        raise ConfigError(f"{run_dir} is not a fine-tuning run; attention drift compares a fine-tuning run's "
                          "checkpoints with the checkpoint it started from (factlens bios finetune).")
    ft = config.finetune
    population, vocab = run.population(), run.vocab()
    seq_len = config.validate(vocab.max_biography_tokens())
    n_old = ft.seen_from if ft.seen_from is not None else config.n_people
    (batch,) = eval_batches(people_slice(population, 0, n_old), vocab, n_sequences, n_sequences, seq_len,
                            seed=config.data_seed + 7)
    batch = batch.trimmed()
    mask = batch.attention_mask.to(device)  # [b, p]: real tokens are the queries that count
    reference = load_checkpoint(ft.init_from).build_model(device).eval()
    ref_patterns = PatternRecorder(reference).run(batch.tokens)
    rows = []
    for step in tqdm(steps if steps is not None else run.steps, desc="attention drift", disable=not progress):
        model = run.hf(step, device)
        patterns = PatternRecorder(model).run(batch.tokens)
        rows += [{"step": step, "layer": layer, "tv": pattern_tv(patterns[layer], ref_patterns[layer], mask)}
                 for layer in sorted(patterns)]
    ev = run.history.evals
    accuracy = ev[[c for c in ("step", "old_attr_acc", "new_attr_acc") if c in ev]]
    return AttentionDrift(pd.DataFrame(rows), accuracy.reset_index(drop=True), ft.init_from, n_sequences)


__all__ = ["AttentionDrift", "attention_drift", "pattern_tv"]
