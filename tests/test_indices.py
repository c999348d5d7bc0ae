"""factlens.indices: one rule for every layer, head and position index, checked against Python's own indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import factlens
from factlens.errors import ConfigError
from factlens.indices import check_index, head_indices, indices, layer_indices, position_indices


@given(n=st.integers(1, 40), i=st.integers(-60, 60))
def test_check_index_is_python_indexing_without_wraparound(n, i):
    """Golden reference: ``list(range(n))[i]`` (which raises IndexError exactly where we raise ConfigError)."""
    try:
        expected = list(range(n))[i]
    except IndexError:
        with pytest.raises(ConfigError, match="out of range"):
            check_index(i, n, "layer", "layers")
    else:
        assert check_index(i, n, "layer", "layers") == expected


@given(n=st.integers(1, 12), items=st.lists(st.integers(-12, 11), max_size=6))
def test_indices_match_python_and_refuse_duplicates(n, items):
    try:
        expected = [list(range(n))[i] for i in items]
    except IndexError:
        with pytest.raises(ConfigError, match="out of range"):
            indices(items, n, "head", "heads")
        return
    if len(set(expected)) < len(expected):
        with pytest.raises(ConfigError, match="once"):
            indices(items, n, "head", "heads")
    else:
        assert indices(items, n, "head", "heads") == expected
        assert indices(torch.tensor(items, dtype=torch.long), n, "head", "heads") == expected


@pytest.mark.usefixtures("unchecked")  # floats, bools and strings on purpose: factlens's own ConfigError
def test_index_kinds():
    assert layer_indices(4, None) == [0, 1, 2, 3] and head_indices(4, None) is None
    assert layer_indices(4, np.int64(-1)) == [3] and layer_indices(4, torch.tensor(2)) == [2]
    assert layer_indices(4, range(1, 3)) == [1, 2] and head_indices(4, []) == []
    for bad in (1.0, True, "1", [0.5], torch.tensor([1.0]), torch.tensor([True]), [[0]]):
        with pytest.raises(ConfigError):
            layer_indices(4, bad)


def test_positions_per_prompt_and_shared():
    rows, pos = position_indices(torch.tensor([4, -1, 0]), batch=3, seq=5)
    assert rows.tolist() == [0, 1, 2] and pos.tolist() == [4, 4, 0]
    rows, pos = position_indices([0, -1], batch=2, seq=5)  # a list: the same positions in every prompt
    assert rows.tolist() == [0, 0, 1, 1] and pos.tolist() == [0, 4, 0, 4]
    rows, pos = position_indices(None, batch=1, seq=3)
    assert pos.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="one position per prompt"):
        position_indices(torch.tensor([1, 2]), batch=3, seq=5)  # issue 14: not "two positions each"
    with pytest.raises(ConfigError, match="out of range"):
        position_indices(torch.tensor([99, 7]), batch=2, seq=5)  # issue 14: never [4, 2]


def test_attend_to_self_positions_never_wrap(tiny_models):
    model = tiny_models["gpt2"]
    tokens = model.to_tokens(["The capital of France is", "Keep in mind, the capital of Japan is"])
    with pytest.raises(ConfigError, match="out of range"), \
            factlens.intervene(model, factlens.attend_to_self(model, positions=torch.tensor([99, 7]))):
        model(tokens)
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())


def test_regressor_layers_never_wrap(tiny_models):
    """Issue 14: ``regressors=[(5, 0)]`` on a 2-layer model used to mean layer 1."""
    from factlens.recall.datasets import dataset_for
    from factlens.recall.mlp_decomposition import capture_mlp_activations

    model = tiny_models["gpt2"]
    ds = dataset_for(model).select(range(2))
    with pytest.raises(ConfigError, match="regressor layer 5 is out of range"):
        capture_mlp_activations(model, ds, -1, regressors=[(5, 0)])
    acts = capture_mlp_activations(model, ds, -1, regressors=[(-1, 0), (0, -1)])
    assert acts.names == ["L1H0", "L0H3"]


def test_attention_patcher_uses_the_same_rule():
    from factlens.bios.patching.training import AttentionPatcher

    model, ref = factlens.build_hf("gpt2", seed=0), factlens.build_hf("gpt2", seed=1)
    assert AttentionPatcher(model, ref, layers=[-1], heads=[-1, 0]).layers == [1]
    assert AttentionPatcher(model, ref, heads=[-1, 0]).heads == [3, 0]
    for kwargs in ({"layers": [2]}, {"heads": [4]}, {"layers": [0, -2]}):
        with pytest.raises(ConfigError):
            AttentionPatcher(model, ref, **kwargs)
