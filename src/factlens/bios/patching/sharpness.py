"""Attention sharpness per layer over training (Zucchet et al. 2025, App. D.2, Fig. F).

The sharpness of one attention row is its entropy divided by the largest entropy it could have,
``H(p) / log(t)``, where ``t`` is the number of positions the query may attend to (itself and every earlier
real token, under the causal mask). A uniform row scores 1, a row on a single position 0; queries with a single
attendable position (``t = 1``, e.g. ``<bos>``) have no spread to measure and are left out, and so are padding
queries. :func:`layer_sharpness` averages it over heads, queries and sequences; :func:`attention_sharpness`
measures it at a run's checkpoints, on the same held-out-template biographies as
:func:`~factlens.bios.patching.circuits.attention_to_name`, so both curves can be drawn side by side
(:meth:`AttentionSharpnessResult.plot` with ``attention=``).

Example:
    >>> import torch
    >>> from factlens.bios.patching.sharpness import row_sharpness
    >>> uniform = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4)[:, None]  # [q, k], causal
    >>> row_sharpness(uniform[None, None], torch.ones(1, 3, dtype=torch.bool))  # query 0 has 1 position: NaN
    tensor([[[nan, 1., 1.]]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Bool, Float

from factlens.bios.patching.circuits import AttentionToNameResult, probe_batches
from factlens.bios.patching.references import Reference
from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.inputs import default_device
from factlens.resources import track

CAUSAL_TOL = 1e-4  # attention mass on future keys above this is not a causal pattern


def row_sharpness(pattern: Float[torch.Tensor, "batch head q k"],
                  attention_mask: Bool[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch head q"]:
    """``H(row) / log(t)`` of every attention row; NaN where it is undefined (padding query, ``t = 1``).

    Args:
        pattern: post-softmax attention (``blocks.{l}.attn.hook_pattern``), right-padded sequences.
        attention_mask: True on real tokens.

    Raises:
        ConfigError: the pattern puts weight on future keys (not a causal pattern), or shapes disagree.
    """
    b, _, q, k = pattern.shape
    if q != k or attention_mask.shape != (b, q):
        raise ConfigError(f"pattern {tuple(pattern.shape)} and attention_mask {tuple(attention_mask.shape)} do not "
                          "match; pass [batch, head, pos, pos] patterns of the masked batch.")
    p = pattern.float()
    future = torch.triu(torch.ones(q, k, dtype=torch.bool, device=p.device), diagonal=1)  # [q, k]
    if float(p.masked_fill(~future, 0).sum(-1).max()) > CAUSAL_TOL:
        raise ConfigError("the pattern puts weight on future positions; sharpness is defined for causal patterns "
                          "(the post-softmax hook_pattern of a decoder).")
    real = attention_mask.to(p.device)
    attendable = real.long().cumsum(-1).float()  # [b, q]: real keys at or before each query (right padding)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [b, h, q]
    valid = real & (attendable > 1)  # [b, q]
    ratio = entropy / torch.log(attendable.clamp_min(2))[:, None, :]  # [b, h, q]
    return ratio.masked_fill(~valid[:, None, :], float("nan"))


def layer_sharpness(patterns: dict[int, Float[torch.Tensor, "batch head q k"]],
                    attention_mask: Bool[torch.Tensor, "batch pos"]) -> tuple[torch.Tensor, int]:
    """``([layers], n)``: the mean sharpness of each layer over heads, valid queries and sequences, and the
    number ``n`` of valid queries (sequence positions) it averaged, to weight batches."""
    means, count = [], 0
    for layer in sorted(patterns):
        r = row_sharpness(patterns[layer], attention_mask)  # [b, h, q]
        ok = ~torch.isnan(r)
        count = int(ok[:, 0].sum())
        means.append(r[ok].mean() if count else torch.tensor(float("nan")))
    return torch.stack(means).cpu(), count


@dataclass
class AttentionSharpnessResult(ResultDisplay):
    """Mean attention sharpness (entropy / log attendable positions) per checkpoint and layer.

    Attributes:
        values: ``[steps, layers]``, 1 = uniform attention, 0 = one position; axes ``("step", "layer")``.
        steps: the checkpoint steps. Layers are 0-based, as in TransformerLens hook names.
    """

    values: torch.Tensor
    steps: list[int]
    axis_names: tuple[str, ...] = ("step", "layer")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (step, layer): ``step``, ``layer``, ``sharpness``."""
        return pd.DataFrame([{"step": s, "layer": layer, "sharpness": float(self.values[i, layer])}
                             for i, s in enumerate(self.steps) for layer in range(self.values.shape[1])])

    def plot(self, attention: AttentionToNameResult | None = None):
        """Sharpness of every layer over training; with ``attention``, its attention-to-name curves beside it.

        Example:
            >>> import torch
            >>> from factlens.bios.patching.sharpness import AttentionSharpnessResult
            >>> result = AttentionSharpnessResult(torch.tensor([[1.0, 0.9], [0.7, 0.5]]), [0, 100])
            >>> len(result.plot().data)
            2
        """
        from plotly.subplots import make_subplots

        cols = 2 if attention is not None else 1
        fig = make_subplots(rows=1, cols=cols, subplot_titles=(
            "Attention sharpness (entropy / log attendable positions)",
            *(["Attention to the name"] if attention is not None else [])))
        for layer in range(self.values.shape[1]):
            fig.add_scatter(x=self.steps, y=self.values[:, layer].tolist(), mode="lines+markers",
                            name=f"sharpness, layer {layer}", row=1, col=1,
                            hovertemplate=f"layer {layer}<br>step %{{x}}<br>sharpness %{{y:.3f}}<extra></extra>")
        if attention is not None:
            for trace in attention.plot().data:
                fig.add_trace(trace, row=1, col=2)
            fig.update_xaxes(title_text="training step", row=1, col=2)
            fig.update_yaxes(title_text="attention mass", range=[0, 1], row=1, col=2)
        fig.update_xaxes(title_text="training step", row=1, col=1)
        fig.update_yaxes(title_text="sharpness (1 = uniform)", range=[0, 1.05], row=1, col=1)
        fig.update_layout(template="plotly_white", height=420, width=800 * cols)
        return fig


def attention_sharpness(run_dir: str | Path, steps: Sequence[int] | None = None, *, n_sequences: int = 512,
                        batch_size: int = 64, device: str | torch.device | None = None,
                        progress: bool = True) -> AttentionSharpnessResult:
    """Per-layer attention sharpness at every chosen checkpoint of a run (default: all), on ``n_sequences``
    held-out-template biographies (the sequences :func:`~factlens.bios.patching.circuits.attention_to_name`
    reads). Every step is checked before any model is loaded. ``device``: default CUDA when available, else CPU.

    Example:
        >>> result = attention_sharpness("runs/demo", steps=[0, 200, 1000])    # doctest: +SKIP
        >>> result.plot(attention_to_name("runs/demo", steps=[0, 200, 1000]))  # doctest: +SKIP
    """
    device = default_device(device)
    run, steps, batches = probe_batches(run_dir, steps, n_sequences, batch_size)
    values = []
    for step in track(steps, device=device, disable=not progress, desc="checkpoints"):
        ref = Reference.from_model(run.hf(step, device))
        total, weight = torch.zeros(ref.n_layers), 0
        for batch in batches:
            means, n = layer_sharpness(ref.patterns(batch.tokens.to(device)), batch.attention_mask)
            total, weight = total + means * n, weight + n
        values.append(total / weight)
    return AttentionSharpnessResult(torch.stack(values), steps)


__all__ = ["AttentionSharpnessResult", "attention_sharpness", "layer_sharpness", "row_sharpness"]
