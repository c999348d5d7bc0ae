"""Attention sharpness (entropy / log attendable positions) against hand computations and TransformerLens."""

from __future__ import annotations

import math

import pytest
import torch

import factlens
from factlens.bios.config import TrainConfig
from factlens.bios.data.batches import eval_batches
from factlens.bios.patching.circuits import attention_to_name
from factlens.bios.patching.sharpness import (
    AttentionSharpnessResult,
    attention_sharpness,
    layer_sharpness,
    row_sharpness,
)
from factlens.bios.run import Run
from factlens.bios.trainer import train


def causal_uniform(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]  # [q, k]


def test_uniform_rows_score_one_and_one_hot_rows_zero():
    mask = torch.ones(1, 5, dtype=torch.bool)
    uniform = row_sharpness(causal_uniform(5)[None, None], mask)[0, 0]
    assert torch.isnan(uniform[0])  # <bos> attends to itself only: nothing to measure
    assert torch.allclose(uniform[1:], torch.ones(4))
    one_hot = torch.zeros(5, 5)
    one_hot[:, 0] = 1  # every query on <bos>
    assert torch.allclose(row_sharpness(one_hot[None, None], mask)[0, 0, 1:], torch.zeros(4))


def test_a_hand_computed_row_and_the_causal_count():
    # query 2 attends to 3 positions with (0.5, 0.25, 0.25): H = 1.5 ln 2, t = 3 (not the 4 of the sequence)
    p = causal_uniform(4)
    p[2, :3] = torch.tensor([0.5, 0.25, 0.25])
    r = row_sharpness(p[None, None], torch.ones(1, 4, dtype=torch.bool))
    assert math.isclose(float(r[0, 0, 2]), 1.5 * math.log(2) / math.log(3), rel_tol=1e-6)
    # padding queries are left out, and the count of attendable positions ignores them
    mask = torch.tensor([[True, True, True, False]])
    r = row_sharpness(p[None, None], mask)
    assert torch.isnan(r[0, 0, 3]) and math.isclose(float(r[0, 0, 1]), 1.0, rel_tol=1e-6)
    # two heads and two layers average over heads and valid queries
    patterns = {0: torch.stack([causal_uniform(4), torch.eye(4)])[None], 1: torch.eye(4)[None, None]}
    means, n = layer_sharpness(patterns, torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(means, torch.tensor([0.5, 0.0])) and n == 3


def test_non_causal_patterns_and_mismatched_shapes_are_refused():
    with pytest.raises(factlens.ConfigError, match="future positions"):
        row_sharpness(torch.full((1, 1, 3, 3), 1 / 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(factlens.ConfigError, match="do not match"):
        row_sharpness(causal_uniform(3)[None, None], torch.ones(1, 4, dtype=torch.bool))


def test_run_sharpness_matches_transformerlens_patterns(tmp_path):
    cfg = TrainConfig.preset("tiny", n_people=32, steps=6, checkpoint_every=3, resume_every=3, n_eval_sequences=16,
                             n_unseen=0, lr=3e-3, pools=dict(first_names=20, last_names=20, cities=10,
                                                             universities=10, majors=10, companies=10, years=2))
    train(cfg, tmp_path / "run", progress=False)
    result = attention_sharpness(tmp_path / "run", n_sequences=8, batch_size=8, progress=False)
    assert result.steps == [0, 3, 6] and result.values.shape == (3, cfg.model["n_layer"])
    assert ((result.values > 0) & (result.values <= 1)).all()
    # golden reference: TransformerLens's hook_pattern on the same biographies, entropy by hand
    run = Run(tmp_path / "run")
    batch = eval_batches(run.population(), run.vocab(), 8, 8, seq_len=run.checkpoint(6).manifest["extra"]["seq_len"],
                         seed=1234)[0]
    bridge = run.bridge(6)
    _, cache = bridge.run_with_cache(batch.tokens)
    for layer in range(cfg.model["n_layer"]):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [b, h, q, k]
        ent = -(pattern * pattern.clamp_min(1e-30).log()).sum(-1)  # [b, h, q]
        t = torch.arange(1, pattern.shape[-1] + 1).float()
        keep = batch.attention_mask & (t > 1)  # right-padded: t = position + 1 on real queries
        expected = (ent / t.log().clamp_min(1e-9))[keep[:, None, :].expand_as(ent)].mean()
        assert math.isclose(float(result.values[2, layer]), float(expected), rel_tol=1e-4)
    # drawn beside the attention-to-name curves
    attention = attention_to_name(tmp_path / "run", n_sequences=8, batch_size=8, progress=False)
    fig = result.plot(attention)
    assert len(fig.data) == cfg.model["n_layer"] + len(attention.plot().data)
    frame = result.to_dataframe()
    assert list(frame.columns) == ["step", "layer", "sharpness"] and len(frame) == 3 * cfg.model["n_layer"]
    assert "AttentionSharpnessResult" in repr(result)
    assert isinstance(result, AttentionSharpnessResult)
