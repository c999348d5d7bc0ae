"""Fast paths give the same answers as the slow ones (issue 19).

- OPT bridges take SDPA when no pattern/score hook is attached, the explicit path (with TL's hooks taking
  effect) when one is, layer by layer.
"""

from __future__ import annotations

import pytest
import torch

import factlens
from factlens.attention import PATH_COUNTS


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
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_analyze_shared_pass_equals_separate_passes(arch):
    from factlens.recall.report import analyze

    model = factlens.tiny(arch, compat=True)
    kw = dict(n=60, folds=3, progress=False)
    new = analyze(model, share=True, **kw)
    old = analyze(model, share=False, **kw)

    def close(a, b):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=1e-5, rtol=1e-4, equal_nan=True)

    close(new.lens.prob, old.lens.prob)
    close(new.lens.rank, old.lens.rank)
    close(new.path_patching.values, old.path_patching.values)
    close(new.path_patching.mlp, old.path_patching.mlp)
    close(new.movers.r, old.movers.r)
    close(new.movers.attention, old.movers.attention)
    assert new.top_mover == old.top_mover
    assert new.decompositions.keys() == old.decompositions.keys()
    for key in new.decompositions:
        close(new.decompositions[key].beta, old.decompositions[key].beta)
        close(new.decompositions[key].intercept, old.decompositions[key].intercept)
    close(new.final_layer.dla, old.final_layer.dla)
    close(new.final_layer.prob_before, old.final_layer.prob_before)
    a, b = new.mitigation.per_prompt, old.mitigation.per_prompt
    assert list(a[["method", "prompt_idx", "fold"]].itertuples(index=False)) == \
        list(b[["method", "prompt_idx", "fold"]].itertuples(index=False))
    close(a["prob"].to_numpy().copy(), b["prob"].to_numpy().copy())
    assert (a["rank"] == b["rank"]).mean() > 0.95  # ranks may swap on exact-tie rounding only
    close(new.mitigation.rows["mean_prob"].to_numpy().copy(), old.mitigation.rows["mean_prob"].to_numpy().copy())
    for key in new.mitigation.intercepts:
        close(new.mitigation.intercepts[key], old.mitigation.intercepts[key])
