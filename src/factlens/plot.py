"""Shared plotting helpers: an attention-pattern viewer with token labels.

Every factlens result type has its own ``.plot()``; this module holds the viewers that work on raw model
activations. Several biography training runs on one figure: :func:`factlens.bios.history.compare_runs`.

Example:
    >>> import torch, factlens
    >>> from factlens.plot import attention_patterns
    >>> model = factlens.tiny("gpt2", compat=True)
    >>> fig = attention_patterns(model, "The capital of France is", heads=[(0, 1), (1, 3)])
    >>> fig.layout.title.text
    'Attention patterns'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int

from factlens.edits import resolve_heads, resolve_layers

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def attention_patterns(model: TransformerBridge, text: str | Int[torch.Tensor, "1 pos"], heads: Sequence[tuple[int, int]],
                       *, prepend_bos: bool | None = None, title: str = "Attention patterns"):
    """Heat-maps of the post-softmax patterns of chosen ``(layer, head)`` pairs, with token labels.

    Rows are query (destination) tokens, columns key (source) tokens; hovering shows both tokens and the weight.

    Args:
        model: a factlens bridge (GPT-2 or OPT).
        text: a prompt, or a ``[1, pos]`` token tensor.
        heads: ``(layer, head)`` pairs (negative indices count from the end).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tokens = model.to_tokens(text, prepend_bos=prepend_bos) if isinstance(text, str) else text
    labels = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    pairs = [(resolve_layers(model, layer)[0], resolve_heads(model, head)[0]) for layer, head in heads]
    names = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in pairs}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=[f"L{layer}H{head}" for layer, head in pairs],
                        horizontal_spacing=0.18)
    for i, (layer, head) in enumerate(pairs):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head].float().cpu()  # [q, k]
        hover = [[f"query {labels[q]}<br>key {labels[k]}<br>weight {pattern[q, k]:.3f}" for k in range(len(labels))]
                 for q in range(len(labels))]
        fig.add_trace(go.Heatmap(z=pattern.numpy(), x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                                 text=hover, hoverinfo="text", showscale=i == len(pairs) - 1,
                                 colorbar=dict(title="weight")), 1, i + 1)
        fig.update_xaxes(title_text="key (source) token", tickangle=-45, row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
    fig.update_yaxes(title_text="query (destination) token", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=420 + 12 * len(labels),
                      width=max(500, 380 * len(pairs)))
    return fig
