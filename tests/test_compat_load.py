"""factlens.compat: compatibility mode processed part by part equals TransformerLens's own processing (issue 19)."""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.compat import enable_compatibility_mode
from factlens.models import bridge_from_hf, build_hf
from factlens.recall.datasets import dataset_for
from factlens.recall.mlp_decomposition import decompose_mlp

SHAPES = {"gpt2": dict(n_layer=3), "opt": dict(num_hidden_layers=3)}


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def pair(request):
    """The same random twin twice: processed by TL (``low_memory=False``) and part by part."""
    hf = build_hf(request.param, **SHAPES[request.param]).eval()
    tl = bridge_from_hf(hf, compat=False)
    ours = bridge_from_hf(hf, compat=False)
    assert enable_compatibility_mode(tl, low_memory=False) == "tl"
    assert enable_compatibility_mode(ours) == "parts"
    return tl.eval(), ours.eval()


def test_weights_are_bit_identical_to_tl(pair):
    tl, ours = pair
    for a, b in ((tl.state_dict(), ours.state_dict()),
                 (tl.original_model.state_dict(), ours.original_model.state_dict())):
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, different
    # and processing did something: LayerNorm weights folded away, W_U centred
    assert torch.all(ours.blocks[0].ln1.weight == 1)
    assert float(ours.W_U.detach().mean(-1).abs().max()) < 1e-6


def test_same_logits_hooks_and_cache_as_tl(pair):
    tl, ours = pair
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    logits_tl, cache_tl = tl.run_with_cache(tokens)
    logits_ours, cache_ours = ours.run_with_cache(tokens)
    assert torch.equal(logits_tl, logits_ours)
    assert tl.hook_dict.keys() == ours.hook_dict.keys()
    assert cache_tl.keys() == cache_ours.keys()
    for name in list(cache_tl.keys()):
        assert torch.equal(cache_tl[name], cache_ours[name]), name
    assert tl.compatibility_mode and ours.compatibility_mode and ours._weights_processed


def test_same_decomposition_as_tl(pair):
    tl, ours = pair
    ds = dataset_for(tl, n=40)
    a = decompose_mlp(tl, ds, layer=-1)
    b = decompose_mlp(ours, ds, layer=-1)
    assert torch.equal(a.beta, b.beta)
    assert torch.equal(a.intercept, b.intercept)
    assert a.r2 == b.r2


def test_load_paths_use_it_and_processing_twice_is_refused_like_tl():
    model = factlens.tiny("opt", compat=True)
    assert model.compatibility_mode and model._weights_processed
    # a processed bridge goes to TL, which warns and skips rather than folding twice
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert enable_compatibility_mode(model) == "tl"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
