"""Fast paths give the same answers as the slow ones, and analyze's shared pass gives what each step gives alone.

- OPT bridges take SDPA when no pattern/score hook is attached, the explicit path (with TL's hooks taking
  effect) when one is, layer by layer.
"""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.attention import PATH_COUNTS
from factlens.recall import analyze


@pytest.fixture(scope="module")
def opt():
    return factlens.tiny("opt", num_hidden_layers=3, compat=False)  # raw weights: compared with plain HF


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))


def _counts(fn, grad: bool = False):
    PATH_COUNTS.clear()
    with torch.set_grad_enabled(grad):
        out = fn()
    return out, dict(PATH_COUNTS)


def _cached(model, tokens, names):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def test_opt_without_hooks_takes_sdpa_and_matches_eager_hf(opt, tokens):
    logits, counts = _counts(lambda: opt(tokens))
    assert counts == {"sdpa": opt.cfg.n_layers}
    hf = factlens.models.build_hf("opt", num_hidden_layers=3).eval()  # same seed: the same weights
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_pattern_hook_switches_only_its_layer_and_takes_effect(opt, tokens):
    fired = []

    def uniform(pattern, hook):  # every query attends uniformly to its causal prefix
        fired.append(hook.name)
        causal = torch.tril(torch.ones_like(pattern))
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        clean = opt(tokens)
    store = {}

    def keep(name):
        def fn(t, hook):
            store[name] = t.detach().clone()
        return fn

    hooks = [("blocks.1.attn.hook_pattern", uniform), ("blocks.1.attn.hook_v", keep("v")),
             ("blocks.1.attn.hook_z", keep("z"))]
    edited, counts = _counts(lambda: opt.run_with_hooks(tokens, fwd_hooks=hooks))
    assert fired == ["blocks.1.attn.hook_pattern"]
    assert counts == {"sdpa": opt.cfg.n_layers - 1, "explicit": 1}
    assert float((edited - clean).abs().max()) > 1e-4
    # the edit re-weighted the values: z at query q is the mean of v over keys 0..q
    v = store["v"]  # [b, p, h, dh]
    mean_v = v.cumsum(1) / torch.arange(1, v.shape[1] + 1)[None, :, None, None]
    torch.testing.assert_close(store["z"], mean_v, atol=1e-5, rtol=1e-5)
    _, counts = _counts(lambda: opt(tokens))
    assert counts == {"sdpa": opt.cfg.n_layers}  # hooks removed: back to SDPA


def test_score_hook_is_pre_softmax_and_takes_effect(opt, tokens):
    def only_self(scores, hook):  # the last query may attend only to itself
        out = scores.clone()
        out[:, :, -1, :-1] = torch.finfo(scores.dtype).min
        return out

    store = {}

    def keep(name):
        def fn(t, hook):
            store[name] = t.detach().clone()
        return fn

    hooks = [("blocks.2.attn.hook_attn_scores", keep("scores")), ("blocks.2.attn.hook_attn_scores", only_self),
             ("blocks.2.attn.hook_v", keep("v")), ("blocks.2.attn.hook_z", keep("z"))]
    with torch.no_grad():
        clean = opt(tokens)
    edited, counts = _counts(lambda: opt.run_with_hooks(tokens, fwd_hooks=hooks))
    assert counts == {"sdpa": opt.cfg.n_layers - 1, "explicit": 1}
    assert float(store["scores"].min()) < 0  # scores, not a pattern (patterns are never negative)
    torch.testing.assert_close(store["z"][:, -1], store["v"][:, -1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(edited[:, :-1], clean[:, :-1], atol=1e-5, rtol=1e-5)  # earlier positions unchanged
    assert float((edited[:, -1] - clean[:, -1]).abs().max()) > 1e-4


def test_run_with_cache_over_pattern_takes_explicit_path_and_caches_the_softmax(opt, tokens):
    names = [f"blocks.{layer}.attn.hook_{a}" for layer in range(opt.cfg.n_layers) for a in ("q", "k", "pattern")]
    cache, counts = _counts(lambda: _cached(opt, tokens, names))
    assert counts == {"explicit": opt.cfg.n_layers}
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(opt.cfg.n_layers):
        q = cache[f"blocks.{layer}.attn.hook_q"].transpose(1, 2)  # [b, h, p, dh]
        k = cache[f"blocks.{layer}.attn.hook_k"].transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        ref = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], ref, atol=1e-6, rtol=1e-5)
    # caching only hook_z needs no pattern: SDPA throughout
    _, counts = _counts(lambda: _cached(opt, tokens, ["blocks.0.attn.hook_z"]))
    assert counts == {"sdpa": opt.cfg.n_layers}


def test_backward_hook_on_pattern_takes_explicit_path(opt, tokens):
    grads = []
    point = opt.blocks[0].attn.hook_pattern
    point.add_hook(lambda g, hook: grads.append(g.shape), dir="bwd")
    try:
        logits, counts = _counts(lambda: opt(tokens), grad=True)
        logits.sum().backward()
    finally:
        point.remove_hooks("bwd")
        opt.zero_grad(set_to_none=True)
    assert counts == {"sdpa": opt.cfg.n_layers - 1, "explicit": 1}
    assert grads and grads[0] == (3, opt.cfg.n_heads, 7, 7)


# ------------------------------------------------------------------------------------ the shared analysis pass
@pytest.mark.slow  # the whole analysis, twice: .ci/run runs it in its slow step
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_analyze_shared_pass_equals_separate_passes(arch):
    """analyze's one shared clean pass and two-pass mitigation table give what every step gives on its own passes
    (tests/reference_recall.py: each analysis without run=, the mitigation table one hooked pass per method/fold)."""
    from factlens.recall.regression import fit_decomposition
    from reference_recall import analyze_unshared, mitigation_reference

    model = factlens.tiny(arch, compat=True)
    new = analyze(model, n=60, folds=3, progress=False)
    old = analyze_unshared(model, new.dataset)
    ref_frames, ref_intercepts = mitigation_reference(model, n=60, folds=3)

    def close(a, b):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=1e-5, rtol=1e-4, equal_nan=True)

    close(new.lens.prob, old["lens"].prob)
    close(new.lens.rank, old["lens"].rank)
    close(new.path_patching.values, old["path_patching"].values)
    close(new.path_patching.mlp, old["path_patching"].mlp)
    close(new.movers.r, old["movers"].r)
    close(new.movers.attention, old["movers"].attention)
    for key, dec in new.decompositions.items():
        if key.endswith("/pooled"):
            acts = old["acts"][dec.layer]
            close(dec.beta, fit_decomposition(acts.target, acts.regressors).beta)
    close(new.final_layer.dla, old["final_layer"].dla)
    close(new.final_layer.prob_before, old["final_layer"].prob_before)
    per = new.mitigation.per_prompt
    for method, ref in ref_frames.items():
        got = per[per["method"] == method].set_index("prompt_idx").sort_index()
        assert list(got["fold"]) == list(ref["fold"])
        close(got["prob"].to_numpy().copy(), ref["prob"].to_numpy().copy())
        assert (got["rank"].to_numpy() == ref["rank"].to_numpy()).mean() > 0.95  # ranks may swap on exact ties only
    for fold, c in ref_intercepts.items():
        close(new.mitigation.intercepts[(0, fold)], c)
