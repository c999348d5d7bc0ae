"""Real-recall testbed: the Lv et al. analyses find real structure in a model trained by factlens.bios.

``tests/data/bios_demo_run`` is the demo preset's final checkpoint (400 people, 1,000 steps on CPU; 91%
attribute accuracy). On "<name> was born in" prompts (held-out templates):
path patching ranks highest a head that attends from the answer-predicting position to the name, and the
last MLP's intercept projects onto city tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factlens.bios.analysis import load_bridge, run_population
from factlens.bios.recall import bios_relation_dataset
from factlens.capitals.mlp_decomposition import decompose_mlp
from factlens.capitals.path_patching import path_patch
from factlens.capitals.recall import answer_prob

RUN = Path(__file__).parent / "data" / "bios_demo_run"


@pytest.fixture(scope="module")
def testbed():
    population, vocab = run_population(RUN)
    model = load_bridge(RUN)
    data = bios_relation_dataset(population, vocab, "birth_place", n=160)
    return population, vocab, model, data


def attention_to_name(model, data) -> torch.Tensor:
    """``[layers, heads]`` mean attention from ``end`` to the subject's name span."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(data.tokens, names_filter=lambda n: n in names)
    rows = torch.arange(len(data.end))
    keys = torch.arange(data.tokens.shape[1])
    span = (keys[None] >= data.positions["N"][:, None]) & (keys[None] <= data.positions["N_last"][:, None])
    return torch.stack([(cache[n][rows, :, data.end] * span[:, None]).sum(-1).mean(0) for n in names])


def test_the_trained_model_really_recalls(testbed):
    _, _, model, data = testbed
    with torch.no_grad():
        p = answer_prob(model(data.tokens), data)
    assert p.mean() > 0.3  # chance is 1/60 over the cities


def test_top_path_patching_head_attends_to_the_name(testbed):
    _, _, model, data = testbed
    result = path_patch(model, data, progress=False)
    heads = result.top(20)
    top = heads[heads["component"] == "head"].iloc[0]
    attn = attention_to_name(model, data)
    assert top["pct_change"] < -5  # removing it hurts recall
    assert attn[int(top["layer"]), int(top["head"])] > 0.8
    assert attn[int(top["layer"]), int(top["head"])] >= attn.mean()


def test_last_mlp_intercept_projects_onto_cities(testbed):
    population, vocab, model, data = testbed
    result = decompose_mlp(model, data, layer=-1, k=10)
    cities = set(vocab.token_ids(" ".join(population.pools.cities)))
    top = result.intercept_table().query("kind == 'top'")["token_id"].tolist()
    assert sum(t in cities for t in top) >= 8
