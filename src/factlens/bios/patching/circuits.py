"""Attention-to-name analysis over a run's checkpoints (Zucchet et al. 2025 §2.2, App. D.2).

Two circuits, measured per layer, averaged over heads and sequences:

- **name grouping**: query = the last token of each occurrence of the person's full name; target = total
  attention on the *other* tokens of the person's name (every earlier name token, all occurrences). The paper
  reads it in the first layer, where it reaches ≈0.9 within a few hundred steps.
- **extraction**: query = the position that predicts an attribute value's first token (the last template token
  before the value); targets = total attention on name tokens vs on template text (real tokens that are
  neither name nor value nor ``<bos>``). The paper reads it in the last layer, where attention moves from text
  (≈0.5 → 0.1) onto the name (≈0.37 → 0.9) during the plateau.

Layers are numbered from 0 everywhere, as in TransformerLens's hook names: the paper's "layer 1" of its
8-layer model is layer 0 here, its "layer 8" is layer 7.

Example:
    >>> from factlens.bios.patching.circuits import attention_to_name
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
from factlens.bios.patching.references import Reference
from factlens.bios.run import Run
from factlens.display import ResultDisplay
from factlens.errors import ConfigError
from factlens.inputs import at_least_fp32, default_device
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
        p = at_least_fp32(patterns[layer]).mean(1).cpu()  # [b, q, k], averaged over heads
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
        """One row per (step, layer, circuit); layers are 0-based, as in TransformerLens (``blocks.0`` is 0)."""
        rows = [{"step": s, "layer": layer, "circuit": c, "attention": float(self.values[i, layer, j])}
                for i, s in enumerate(self.steps) for layer in range(self.values.shape[1])
                for j, c in enumerate(self.circuits)]
        return pd.DataFrame(rows)

    def plot(self, layers: Sequence[int] | None = None):
        """Attention mass over training steps.

        Args:
            layers: 0-based layers to draw every circuit of (``-1`` = the last). By default, the paper's reading:
                name grouping in the first layer (layer 0, the paper's "layer 1") and extraction in the last.
        """
        import plotly.graph_objects as go

        n_layers = self.values.shape[1]
        if layers is None:
            picks = [(0, self.circuits[:1]), (n_layers - 1, self.circuits[1:])]
        else:
            bad = [layer for layer in layers if not -n_layers <= int(layer) < n_layers]
            if bad or not len(layers):
                raise ConfigError(f"layer {bad[0] if bad else list(layers)} is not a layer of this "
                                  f"{n_layers}-layer model; pass 0-based layers 0..{n_layers - 1} (or -1 for the last), "
                                  "or omit layers for the paper's reading.")
            picks = [(int(layer) % n_layers, self.circuits) for layer in dict.fromkeys(layers)]
        colours = {"name_grouping→name": "#9467bd", "extraction→name": "#1f77b4", "extraction→text": "#ff7f0e"}
        dashes = ["solid", "dash", "dot", "dashdot"]
        fig = go.Figure()
        for i, (layer, circuits) in enumerate(picks):
            for circuit in circuits:
                j = self.circuits.index(circuit)
                fig.add_trace(go.Scatter(
                    x=self.steps, y=self.values[:, layer, j].tolist(), mode="lines+markers",
                    name=f"{circuit} (layer {layer})", line=dict(color=colours[circuit], dash=dashes[i % 4]),
                    hovertemplate=f"{circuit}, layer {layer}<br>step %{{x}}<br>attention %{{y:.3f}}<extra></extra>"))
        fig.update_layout(title="Attention to the name over training (layers numbered from 0)",
                          template="plotly_white", xaxis_title="training step",
                          yaxis_title="attention mass (sum of pattern weights, 0..1)",
                          yaxis_range=[0, 1], height=420, width=800)
        return fig


def probe_batches(run_dir: str | Path, steps: Sequence[int] | None, n_sequences: int,
                  batch_size: int) -> tuple[Run, list[int], list[BiographyBatch]]:
    """The run, its checked ``steps`` (default: every checkpoint) and the ``n_sequences`` held-out-template
    biographies that the attention measurements read (one fixed draw, so every measurement sees the same).

    Every step is checked (it must be a saved checkpoint) before any model is loaded.
    """
    run = Run(run_dir)
    if steps is not None and not len(steps):
        raise ConfigError("steps=[] measures nothing; omit steps to measure every checkpoint, or list the "
                          f"checkpoint steps to measure (available: {run.steps}).")
    steps = list(steps) if steps is not None else run.steps
    for step in steps:
        run.checkpoint_dir(step)  # a missing step is refused before any work, with the available ones
    batches = eval_batches(run.population(), run.vocab(), n_sequences, batch_size,
                           seq_len=_seq_len(run, steps[0]), seed=1234)
    return run, steps, batches


def _seq_len(run: Run, step: int) -> int:
    """The run's training sequence length (stored in every checkpoint), else the model's context."""
    ckpt = run.checkpoint(step, tensors=False)
    seq_len = ckpt.manifest.get("extra", {}).get("seq_len")
    if seq_len is None:
        hf = ckpt.manifest["hf_config"]
        seq_len = hf.get("n_positions") or hf["max_position_embeddings"]  # GPT-2 or OPT
    return int(seq_len)


def attention_to_name(run_dir: str | Path, steps: Sequence[int] | None = None, *, n_sequences: int = 512,
                      batch_size: int = 64, device: str | torch.device | None = None,
                      progress: bool = True) -> AttentionToNameResult:
    """Measure both circuits on ``n_sequences`` held-out-template biographies at every chosen checkpoint.

    Works on GPT-2 and OPT runs alike; ``steps`` defaults to every checkpoint of the run, and every step is
    checked (it must be a saved checkpoint) before any model is loaded. ``device``: default CUDA when available,
    else CPU.
    """
    device = default_device(device)
    run, steps, batches = probe_batches(run_dir, steps, n_sequences, batch_size)
    values = []
    for step in track(steps, device=device, disable=not progress, desc="checkpoints"):
        ref = Reference.from_model(run.hf(step, device))
        acc = torch.zeros(ref.n_layers, len(CIRCUITS))
        for batch in batches:
            acc += circuit_attention(ref.patterns(batch.tokens.to(device)), batch) * len(batch)
        values.append(acc / sum(len(b) for b in batches))
    return AttentionToNameResult(torch.stack(values), steps)
