"""Attention-to-name analysis over a run's checkpoints (Zucchet et al. 2025 §2.2, App. D.2).

Two circuits, measured per layer, averaged over heads and sequences:

- **name grouping**: query = the last token of each occurrence of the person's full name; target = total
  attention on the *other* tokens of the person's name (every earlier name token, all occurrences). The paper
  reads it in layer 1, where it reaches ≈0.9 within a few hundred steps.
- **extraction**: query = the position that predicts an attribute value's first token (the last template token
  before the value); targets = total attention on name tokens vs on template text (real tokens that are
  neither name nor value nor ``<bos>``). The paper reads it in the last layer, where attention moves from text
  (≈0.5 → 0.1) onto the name (≈0.37 → 0.9) during the plateau.

Example:
    >>> result = attention_to_name("runs/demo", steps=[0, 200, 1000])      # doctest: +SKIP
    >>> result.plot().show()                                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float

from factlens.bios.data.batches import BiographyBatch, eval_batches
from factlens.bios.runs import checkpoint_path, load_hf, run_population
from factlens.checkpoints import list_checkpoints
from factlens.display import ResultDisplay
from factlens.patching.references import Reference
from factlens.resources import track

CIRCUITS = ("name_grouping→name", "extraction→name", "extraction→text")


def circuit_attention(patterns: dict[int, Float[torch.Tensor, "batch head q k"]], batch: BiographyBatch) -> torch.Tensor:
    """``[layers, 3]`` mean attention of the three circuits (see :data:`CIRCUITS`) for one batch."""
    name = batch.name_mask  # [b, p]
    real = batch.attention_mask
    text = real & ~name & (batch.value_attr < 0)
    text[:, 0] = False  # <bos>
    # queries: last token of each name occurrence = a name token followed by a non-name token
    nxt = torch.zeros_like(name)
    nxt[:, :-1] = name[:, 1:]
    name_last = name & ~nxt  # [b, p]
    starts = batch.value_start - 1  # [b, 6]: positions predicting each value's first token
    rows = torch.arange(len(batch))[:, None].expand_as(starts)
    out = []
    for layer in sorted(patterns):
        p = patterns[layer].float().mean(1).cpu()  # [b, q, k], averaged over heads
        # name grouping: attention from the last name token to the other (earlier) name tokens
        ng = (p * name[:, None, :].float()).sum(-1)  # [b, q] attention mass on name tokens
        self_w = torch.diagonal(p, dim1=1, dim2=2)  # the query attends to itself, a name token: exclude it
        grouping = ((ng - self_w)[name_last]).mean()
        ext = p[rows, starts]  # [b, 6, k]
        to_name = (ext * name[:, None, :].float()).sum(-1).mean()
        to_text = (ext * text[:, None, :].float()).sum(-1).mean()
        out.append(torch.stack([grouping, to_name, to_text]))
    return torch.stack(out)


@dataclass
class AttentionToNameResult(ResultDisplay):
    """Circuit attention per checkpoint and layer.

    Attributes:
        values: ``[steps, layers, 3]`` mean attention mass (0..1); axes ``("step", "layer", "circuit")``.
        steps: the checkpoint steps. circuits: :data:`CIRCUITS`.
    """

    values: torch.Tensor
    steps: list[int]
    circuits: tuple[str, ...] = CIRCUITS
    axis_names: tuple[str, ...] = ("step", "layer", "circuit")

    def to_dataframe(self) -> pd.DataFrame:
        rows = [{"step": s, "layer": layer + 1, "circuit": c, "attention": float(self.values[i, layer, j])}
                for i, s in enumerate(self.steps) for layer in range(self.values.shape[1])
                for j, c in enumerate(self.circuits)]
        return pd.DataFrame(rows)

    def plot(self, layers: Sequence[int] | None = None):
        """Attention mass over training steps: name grouping in layer 1, extraction in the last layer (default)."""
        import plotly.graph_objects as go

        n_layers = self.values.shape[1]
        picks = layers or [1, n_layers]
        colours = {"name_grouping→name": "#9467bd", "extraction→name": "#1f77b4", "extraction→text": "#ff7f0e"}
        dashes = ["solid", "dash", "dot", "dashdot"]
        fig = go.Figure()
        for i, layer in enumerate(picks):
            for j, circuit in enumerate(self.circuits):
                if layers is None and ((circuit.startswith("name") and layer != 1) or
                                       (circuit.startswith("extraction") and layer != n_layers)):
                    continue
                fig.add_trace(go.Scatter(
                    x=self.steps, y=self.values[:, layer - 1, j].tolist(), mode="lines+markers",
                    name=f"{circuit} (layer {layer})", line=dict(color=colours[circuit], dash=dashes[i % 4]),
                    hovertemplate=f"{circuit}, layer {layer}<br>step %{{x}}<br>attention %{{y:.3f}}<extra></extra>"))
        fig.update_layout(title="Attention to the name over training", template="plotly_white",
                          xaxis_title="training step", yaxis_title="attention mass (sum of pattern weights)",
                          yaxis_range=[0, 1], height=420, width=800)
        return fig


def attention_to_name(run_dir: str | Path, steps: Sequence[int] | None = None, *, n_sequences: int = 512,
                      batch_size: int = 64, device: str | torch.device = "cpu",
                      progress: bool = True) -> AttentionToNameResult:
    """Measure both circuits on ``n_sequences`` held-out-template biographies at every chosen checkpoint."""

    population, vocab = run_population(run_dir)
    config_seq = load_hf(run_dir, steps[0] if steps else None).config.n_positions
    batches = eval_batches(population, vocab, n_sequences, batch_size, seq_len=config_seq, seed=1234)
    steps = list(steps) if steps is not None else list_checkpoints(Path(run_dir) / "checkpoints")
    values = []
    for step in track(steps, device=device, disable=not progress, desc="checkpoints"):
        checkpoint_path(run_dir, step)
        ref = Reference.from_model(load_hf(run_dir, step, device))
        acc = torch.zeros(ref.n_layers, len(CIRCUITS))
        for batch in batches:
            acc += circuit_attention(ref.patterns(batch.tokens.to(device)), batch) * len(batch)
        values.append(acc / sum(len(b) for b in batches))
    return AttentionToNameResult(torch.stack(values), steps)
